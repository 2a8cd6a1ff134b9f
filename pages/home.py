"""yolodex home page: where to start (create a project, or continue with the current one), the workflow as steps
with the state of each, the next thing to do, and, lower down, the three YOLO-NAS sizes.

Thin on purpose: the steps come from `backend.overview`, the model figures from `backend.models.summary`.
"""

import pandas as pd
import plotly.graph_objects as go
import streamlit as st
from plotly.subplots import make_subplots

from app.navigation import LAYOUT
from app.widgets import page_link, page_settings, project_names, project_picker, store_engine
from backend.ingest.starter import STARTER_NAME
from backend.models.download import COCO_WEIGHTS_LICENCE_NOTE
from backend.models.summary import model_summary
from backend.overview import next_step, project_steps

SIZES = ("s", "m", "l")
IMGSZ = 640


@st.cache_data(show_spinner="Building the three YOLO-NAS sizes to count their parameters and FLOPs…")
def summaries(num_classes: int = 80, imgsz: int = IMGSZ) -> pd.DataFrame:
    rows = [model_summary(size, num_classes=num_classes, imgsz=imgsz) for size in SIZES]
    table = pd.DataFrame(rows)
    table.insert(0, "model", [f"YOLO-NAS {size.upper()}" for size in table["size"]])
    return table.drop(columns=["size"])


def models_section() -> None:
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


st.title("yolodex")
st.write(
    "Build your own object detector from the browser: bring your photos, label them in Label Studio, train a "
    "YOLO-NAS model on them, shrink it to INT8, and try it on the Pokédex page. Everything runs on your machine."
)
settings = page_settings()
engine = store_engine(settings.database_url)
own_projects = [name for name in project_names(engine) if name != STARTER_NAME]

if not own_projects:
    st.header("Create your project")
    st.write(
        "Give it a name and the classes you want to find (for example *raccoon*, or *Bulbasaur* and "
        "*Pikachu*), then add your photos on the Datasets page."
    )
    page_link("project", "Create your project", icon=":material/add_circle:")
    if project_names(engine):
        st.caption(f"Or look around the demo project, {STARTER_NAME} (synthetic shapes, already labeled).")

project_name = project_picker(engine, key="home_project") if project_names(engine) else None
if project_name is not None:
    st.header(f"Continue with {project_name}")
    steps = project_steps(settings, project_name)
    upcoming = next_step(steps)
    if upcoming is None:
        st.success("Every step is done: try your detector on the Pokédex.")
        page_link("pokedex", "Open the Pokédex", project_name, icon=":material/arrow_forward:")
    else:
        st.info(f"Next: {upcoming.todo}.", icon=":material/arrow_forward:")
        page_link(
            upcoming.page, f"Go to the {LAYOUT[upcoming.page][1]} page", project_name, icon=":material/arrow_forward:"
        )
    for number, step in enumerate(steps, start=1):
        mark = ":material/check_circle:" if step.done else ":material/radio_button_unchecked:"
        page_link(step.page, f"{number}. {step.name}: {step.detail}", project_name, icon=mark)

st.header("The models")
# Behind a toggle rather than an expander: an expander's content runs on every visit, and counting the three
# models' FLOPs builds all three (seconds on a CPU) before the page is done.
if st.toggle("Show YOLO-NAS S, M and L: parameters and compute", key="home_models"):
    models_section()
