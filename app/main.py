"""The yolodex app: `streamlit run app/main.py` (what `make run` does). One page per workflow step, in `pages/`."""

from pathlib import Path

import streamlit as st

PAGES = Path(__file__).resolve().parents[1] / "pages"

st.set_page_config(page_title="yolodex", page_icon=":material/search:", layout="wide")
home = st.Page(PAGES / "home.py", title="Home", icon=":material/home:", url_path="start", default=True)
navigation = st.navigation(
    [
        home,
        st.Page(PAGES / "project.py", title="Project", icon=":material/category:", url_path="project"),
        st.Page(PAGES / "datasets.py", title="Datasets", icon=":material/photo_library:", url_path="datasets"),
        st.Page(PAGES / "label.py", title="Label", icon=":material/draw:", url_path="label"),
        st.Page(PAGES / "train.py", title="Train", icon=":material/model_training:", url_path="train"),
        st.Page(PAGES / "evaluate.py", title="Evaluate", icon=":material/analytics:", url_path="evaluate"),
        st.Page(PAGES / "quantize.py", title="Quantize", icon=":material/compress:", url_path="quantize"),
        st.Page(PAGES / "pokedex.py", title="Pokédex", icon=":material/photo_camera:", url_path="pokedex"),
        st.Page(PAGES / "jobs.py", title="Jobs", icon=":material/work_history:", url_path="jobs"),
        # The default page is served at "/", so "/home" (a natural guess, or an old link) would be "Page not found":
        # a hidden page there sends the browser on to Home.
        st.Page(lambda: st.switch_page(home), title="Home", url_path="home", visibility="hidden"),
    ]
)
navigation.run()
