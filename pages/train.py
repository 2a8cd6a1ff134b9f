"""Train page: a preset with its settings on a frozen dataset version → a "train" job, with the time an epoch takes
here and the recommended budget, start weights checked before anything is queued, the augmentation and a preview;
the job's live progress and curves, cancel and resume; Continue training (`?continue=<run>`); the runs. Data and
actions come from `backend.views.train`, the longer sections from `app.train_sections`; the chosen job stays in
`?job=` so a reload keeps it."""

import streamlit as st

from app import train_sections as sections
from app.widgets import page_settings, project_picker, show_outcome, store_engine
from backend.training import presets
from backend.views import train as view

st.title("Train")
settings = page_settings()
show_outcome(sections.OUTCOME)
project = project_picker(store_engine(settings.database_url), key="train_project")
data = view.train_data(settings, project)

st.header("New run")
if project is not None and not data.versions:
    st.info("This project has no frozen dataset version yet: freeze one on the [Datasets](/datasets) page.")
# Keys carry the project (its own versions and runs) and the preset (choosing another brings back its values).
version = st.selectbox("Dataset version", data.versions, format_func=lambda v: v.label, key=f"train_version_{project}")
name = st.radio("Preset", list(presets.PRESETS), horizontal=True, key="train_preset")
preset = presets.PRESETS[name]
st.caption(preset.description)
left, middle, right = st.columns(3)
sizes = view.IMAGE_SIZES
imgsz = left.selectbox("Image size (px)", sizes, index=sizes.index(preset.imgsz), key=f"train_imgsz_{name}")
epochs = middle.number_input("Epochs", 1, 1000, preset.epochs, key=f"train_epochs_{name}")
batch = right.number_input("Batch size", 1, 256, preset.batch_size, key=f"train_batch_{name}")
budget, device = sections.time_budget(settings, preset, imgsz, batch, version, left, middle)
start_weights, weights_problem, coco_problem = sections.start_weights(settings, data, preset, project, right)
gpus = 1
if (gpu_count := view.gpu_count()) > 1:  # several GPUs: DDP, one process each; the batch above is the global batch
    gpus = left.number_input("GPUs", 1, gpu_count, 1, key="train_gpus", disabled=device == "cpu")

st.subheader("Augmentation")
pipeline, augment_problem = sections.augmentation(version, imgsz)

form = {"imgsz": imgsz, "epochs": epochs, "batch": batch, "budget": budget, "device": device, "gpus": gpus}
form |= {"weights": start_weights, "pipeline": pipeline, "coco_problem": coco_problem}
blocked = version is None or bool(weights_problem) or bool(augment_problem)
if st.button("Start training", type="primary", disabled=blocked, key="train_start"):
    sections.start_job("Training job", lambda: view.launch(settings, project, version, name, form))

st.header("Training job")
sections.training_job(settings, project)

states = view.run_states(settings)
st.header("Continue training")
sections.continue_training(settings, data, states)

st.header("Runs")
sections.runs_table(project, data, states)
