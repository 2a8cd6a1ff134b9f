"""The Home page (alone and through the app's navigation): the workflow steps of a project and the model sizes."""

from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest

from backend.ingest.service import freeze, starter
from backend.settings import Settings

# Absolute: AppTest resolves a relative path against this test file, not the repository root.
ROOT = Path(__file__).resolve().parents[1]
HOME = ROOT / "pages" / "home.py"
MAIN = ROOT / "app" / "main.py"


@pytest.fixture
def storage(tmp_path, monkeypatch) -> Settings:
    monkeypatch.setenv("YOLODEX_STORAGE", str(tmp_path))
    return Settings.from_env({"YOLODEX_STORAGE": str(tmp_path)})


def page_text(app: AppTest) -> str:
    return " ".join(element.value for element in [*app.markdown, *app.warning, *app.info, *app.success])


@pytest.mark.slow
def test_home_page_shows_the_three_models_and_the_licence(storage):
    app = AppTest.from_file(str(HOME), default_timeout=120).run()

    assert not app.exception, [exception.value for exception in app.exception]
    table = app.dataframe[0].value
    assert list(table["model"]) == ["YOLO-NAS S", "YOLO-NAS M", "YOLO-NAS L"]
    assert table.loc[0, "params_total"] == 19_053_888
    assert (table["params_fused"] < table["params_total"]).all()
    assert (table["gflops"].diff().dropna() > 0).all()  # S < M < L
    assert "non-commercial" in page_text(app)
    assert "No project yet" in page_text(app)  # an empty storage says where to start


@pytest.mark.slow
def test_home_steps_follow_the_project(storage):
    starter(storage)
    app = AppTest.from_file(str(MAIN), default_timeout=120).run()  # through st.navigation: Home is the default
    assert not app.exception, [exception.value for exception in app.exception]
    text = page_text(app)
    assert "64 images, 3 classes" in text and "64 of 64 labeled" in text
    assert "0 frozen versions" in text
    assert "Next: freeze the labeled images" in text  # ingest and label are done, the version is next

    freeze("Starter Pokédex", "v1", settings=storage)
    app.run()
    text = page_text(app)
    assert "1 frozen versions" in text and "Next: train YOLO-NAS" in text
    assert app.query_params["project"] == "Starter Pokédex"
