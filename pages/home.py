"""yolodex home page: the workflow as steps with the state of each for a project, the next thing to do, and the
three YOLO-NAS sizes.

Thin on purpose: the steps come from `backend.overview`, the model figures from `backend.models.summary`.
"""

import pandas as pd
import plotly.graph_objects as go
import streamlit as st
from plotly.subplots import make_subplots
from sqlalchemy import select

from app.widgets import page_settings, project_picker, store_engine
from backend.models.download import COCO_WEIGHTS_LICENCE_NOTE
from backend.models.summary import model_summary
from backend.overview import next_step, workflow_steps
from backend.store.db import session_scope
from backend.store.models import Project

SIZES = ("s", "m", "l")
IMGSZ = 640


@st.cache_data(show_spinner="Building the three YOLO-NAS sizes to count their parameters and FLOPs…")
def summaries(num_classes: int = 80, imgsz: int = IMGSZ) -> pd.DataFrame:
    rows = [model_summary(size, num_classes=num_classes, imgsz=imgsz) for size in SIZES]
    table = pd.DataFrame(rows)
    table.insert(0, "model", [f"YOLO-NAS {size.upper()}" for size in table["size"]])
    return table.drop(columns=["size"])


st.title("yolodex")
st.write(
    "yolodex lets you build your own object detector from the browser: bring your photos, label them in "
    "Label Studio, fine-tune a YOLO-NAS model on them, check how good it is, shrink it to INT8, and try it on "
    "the Pokédex page. Everything runs on your machine, and your images and models stay in its storage folder."
)

st.header("Workflow")
settings = page_settings()
engine = store_engine(settings.database_url)
project_name = project_picker(engine, key="home_project")
if project_name is not None:
    with session_scope(engine) as session:
        project = session.scalars(select(Project).where(Project.name == project_name)).one()
        steps = workflow_steps(session, settings, project)
    for number, step in enumerate(steps, start=1):
        mark = ":material/check_circle:" if step.done else ":material/radio_button_unchecked:"
        st.markdown(f"{mark} **{number}. [{step.name}](/{step.page})**: {step.detail}")
    upcoming = next_step(steps)
    if upcoming is None:
        st.success("Every step is done: try your detector on the [Pokédex](/pokedex) page.")
    else:
        st.info(f"Next: {upcoming.todo} ([{upcoming.name}](/{upcoming.page})).", icon=":material/arrow_forward:")

st.header("The models")
table = summaries()
st.dataframe(
    table,
    key="home_models_table",
    hide_index=True,
    column_config={
        "model": "model",
        "num_classes": st.column_config.NumberColumn("classes"),
        "imgsz": st.column_config.NumberColumn("input size (px)"),
        "params_total": st.column_config.NumberColumn("parameters (training)", format="localized"),
        "params_fused": st.column_config.NumberColumn("parameters (fused)", format="localized"),
        "gflops": st.column_config.NumberColumn("GFLOPs (fused, batch 1)", format="%.2f"),
    },
)
st.caption(
    "Training form counts every parameter, including the re-parameterisation placeholders; fused is the "
    "deployed form after folding each QARepVGG block and its BatchNorms into one convolution."
)

chart = make_subplots(rows=1, cols=2, subplot_titles=("Parameters (millions)", f"GFLOPs at {IMGSZ}×{IMGSZ}"))
chart.add_trace(go.Bar(x=table["model"], y=table["params_total"] / 1e6, name="training form"), row=1, col=1)
chart.add_trace(go.Bar(x=table["model"], y=table["params_fused"] / 1e6, name="fused"), row=1, col=1)
chart.add_trace(go.Bar(x=table["model"], y=table["gflops"], name="GFLOPs (fused)"), row=1, col=2)
chart.update_layout(barmode="group", height=380, margin={"t": 40, "b": 0})
st.plotly_chart(chart, key="home_models_chart")

st.warning(COCO_WEIGHTS_LICENCE_NOTE, icon=":material/gavel:")
