"""The app's pages in workflow order: `app/main.py` hands them to `st.navigation`, and pages link to one another
through them (`app.widgets.page_link`), so a link opens its page in the same tab and session.

Built per call, inside a script run: `st.Page` needs the run's context (outside one it returns a half-made page).
"""

from pathlib import Path

import streamlit as st

PAGES_DIR = Path(__file__).resolve().parents[1] / "pages"
# url path: (file, title, icon). Home is the default page, served at "/" (its url path is only a unique name).
LAYOUT = {
    "start": ("home.py", "Home", ":material/home:"),
    "project": ("project.py", "Project", ":material/category:"),
    "datasets": ("datasets.py", "Datasets", ":material/photo_library:"),
    "label": ("label.py", "Label", ":material/draw:"),
    "train": ("train.py", "Train", ":material/model_training:"),
    "evaluate": ("evaluate.py", "Evaluate", ":material/analytics:"),
    "quantize": ("quantize.py", "Quantize", ":material/compress:"),
    "pokedex": ("pokedex.py", "Pokédex", ":material/photo_camera:"),
    "jobs": ("jobs.py", "Jobs", ":material/work_history:"),
}
HOME = "start"


def app_pages() -> dict[str, st.Page]:
    """url path → the page, in workflow order."""
    return {
        url_path: st.Page(PAGES_DIR / file, title=title, icon=icon, url_path=url_path, default=url_path == HOME)
        for url_path, (file, title, icon) in LAYOUT.items()
    }
