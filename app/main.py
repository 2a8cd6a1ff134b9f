"""The yolodex app: `streamlit run app/main.py` (what `make run` does). One page per workflow step, in `pages/`."""

from pathlib import Path

import streamlit as st

PAGES = Path(__file__).resolve().parents[1] / "pages"

st.set_page_config(page_title="yolodex", page_icon=":material/search:", layout="wide")
navigation = st.navigation(
    [
        st.Page(PAGES / "home.py", title="Home", icon=":material/home:", url_path="home", default=True),
        st.Page(PAGES / "datasets.py", title="Datasets", icon=":material/photo_library:", url_path="datasets"),
        st.Page(PAGES / "label.py", title="Label", icon=":material/draw:", url_path="label"),
        st.Page(PAGES / "train.py", title="Train", icon=":material/model_training:", url_path="train"),
        st.Page(PAGES / "evaluate.py", title="Evaluate", icon=":material/analytics:", url_path="evaluate"),
        st.Page(PAGES / "quantize.py", title="Quantize", icon=":material/compress:", url_path="quantize"),
        st.Page(PAGES / "pokedex.py", title="Pokédex", icon=":material/photo_camera:", url_path="pokedex"),
        st.Page(PAGES / "jobs.py", title="Jobs", icon=":material/work_history:", url_path="jobs"),
    ]
)
navigation.run()
