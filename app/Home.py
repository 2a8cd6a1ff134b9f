"""yolodex home page: what it is, the workflow, and the three YOLO-NAS sizes.

Thin on purpose: every figure comes from `backend.models.summary.model_summary`.
"""

import pandas as pd
import plotly.graph_objects as go
import streamlit as st
from plotly.subplots import make_subplots

from backend.models.download import COCO_WEIGHTS_LICENCE_NOTE
from backend.models.summary import model_summary

SIZES = ("s", "m", "l")
IMGSZ = 640
WORKFLOW = (
    ("Ingest", "upload photos or an archive, deduplicate, split"),
    ("Label", "draw boxes in Label Studio, least confident images first"),
    ("Dataset version", "freeze the labels into a COCO dataset with a fixed split"),
    ("Train", "fine-tune YOLO-NAS S, M or L as a background job"),
    ("Evaluate", "COCO mAP, PR curves, confusion matrix, the worst images"),
    ("Export", "ONNX FP32"),
    ("INT8", "quantize, and compare accuracy and speed against FP32"),
    ("Pokédex", "drop a photo and see what your detector finds in it"),
)

st.set_page_config(page_title="yolodex", page_icon=":material/search:", layout="wide")


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
st.markdown("\n".join(f"1. **{step}**: {what} *(coming)*" for step, what in WORKFLOW))

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
