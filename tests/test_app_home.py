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
    texts = [element.value for element in [*app.markdown, *app.warning, *app.info, *app.success]]
    return " ".join(texts + [link.proto.label for link in app.get("page_link")])


def links(app: AppTest) -> dict[str, tuple[str, str]]:
    """The page's links to other pages: label → (url path, query string)."""
    return {link.proto.label: (link.proto.page, link.proto.query_string) for link in app.get("page_link")}


@pytest.mark.slow
def test_home_page_starts_with_create_your_project_and_keeps_the_models_lower(storage):
    app = AppTest.from_file(str(HOME), default_timeout=120).run()

    assert not app.exception, [exception.value for exception in app.exception]
    assert app.header[0].value == "Create your project"  # the first thing a newcomer reads
    assert links(app)["Create your project"] == ("project", "")  # opens the Project page in the same tab
    assert app.header[-1].value == "The models"  # the model table is last, behind a toggle
    assert not app.dataframe  # and not built until asked for
    app.toggle(key="home_models").set_value(True).run()
    table = app.dataframe[0].value
    assert list(table["model"]) == ["YOLO-NAS S", "YOLO-NAS M", "YOLO-NAS L"]
    assert table.loc[0, "params_total"] == 19_053_888
    assert (table["params_fused"] < table["params_total"]).all()
    assert (table["gflops"].diff().dropna() > 0).all()  # S < M < L
    assert "non-commercial" in page_text(app)


@pytest.mark.slow
def test_home_steps_follow_the_project(storage):
    starter(storage)
    app = AppTest.from_file(str(MAIN), default_timeout=120).run()  # through st.navigation: Home is the default
    assert not app.exception, [exception.value for exception in app.exception]
    text = page_text(app)
    # Only the demo exists: the page still invites the user to create their own, and shows the demo's steps.
    assert [header.value for header in app.header][:2] == ["Create your project", "Continue with Starter Pokédex"]
    assert "64 images, 3 classes" in text and "64 of 64 labeled" in text
    assert "0 frozen versions" in text
    assert "Next: freeze the labeled images" in text  # ingest and label are done, the version is next

    freeze("Starter Pokédex", "v1", settings=storage)
    app.run()
    text = page_text(app)
    assert "1 frozen versions" in text and "Next: train YOLO-NAS" in text
    # The next step's link opens its page on this project.
    assert links(app)["Go to the Train page"] == ("train", "project=Starter+Pok%C3%A9dex")
    assert app.query_params["project"] == "Starter Pokédex"


def _add_project(settings: Settings, name: str, classes: tuple[str, ...] = ("raccoon",)) -> None:
    from backend.ingest.service import open_store
    from backend.store.db import session_scope
    from backend.store.models import ensure_class, get_or_create_project

    engine, _ = open_store(settings)
    with session_scope(engine) as session:
        project = get_or_create_project(session, name)
        for class_name in classes:
            ensure_class(session, project, class_name)


def test_the_last_project_worked_on_is_the_default_and_the_demo_only_when_alone(storage):
    from backend.ingest.service import import_into, open_store
    from backend.overview import last_active_project
    from backend.store.db import session_scope
    from tests.conftest import encode_image, textured_image

    engine, _ = open_store(storage)
    with session_scope(engine) as session:
        assert last_active_project(session) is None
    starter(storage)
    with session_scope(engine) as session:
        assert last_active_project(session) == "Starter Pokédex"  # the only project
    _add_project(storage, "Raccoons")
    _add_project(storage, "Plushies")
    with session_scope(engine) as session:
        assert last_active_project(session) == "Plushies"  # the newest; the demo's images are older still
    photo = storage.storage / "photo.png"
    photo.write_bytes(encode_image(textured_image(3)))
    import_into([photo], "Raccoons", settings=storage)  # work on Raccoons makes it the last worked on
    with session_scope(engine) as session:
        assert last_active_project(session) == "Raccoons"


@pytest.mark.slow
def test_one_current_project_across_pages_defaulting_to_the_last_worked_on(storage):
    starter(storage)
    _add_project(storage, "Raccoons")
    app = AppTest.from_file(str(MAIN), default_timeout=120).run()
    assert not app.exception, [exception.value for exception in app.exception]
    assert app.selectbox(key="home_project").value == "Raccoons"  # not the demo
    assert app.header[0].value == "Continue with Raccoons"  # the user has a project: no "Create your project"

    app.selectbox(key="home_project").select("Starter Pokédex").run()
    assert app.query_params["project"] == "Starter Pokédex"
    for page, key in (("../pages/train.py", "train_project"), ("../pages/evaluate.py", "evaluate_project")):
        app.switch_page(page).run()
        assert not app.exception, [exception.value for exception in app.exception]
        assert app.selectbox(key=key).value == "Starter Pokédex"  # the choice made on Home follows the user

    app.selectbox(key="evaluate_project").select("Raccoons").run()
    app.switch_page("../pages/home.py").run()
    assert app.selectbox(key="home_project").value == "Raccoons"
    assert app.header[0].value == "Continue with Raccoons"

    # A link (or a reload) carries ?project=, which wins over what the tab remembered.
    linked = AppTest.from_file(str(MAIN), default_timeout=120)
    linked.query_params["project"] = "Starter Pokédex"
    linked.run()
    assert linked.selectbox(key="home_project").value == "Starter Pokédex"


def test_the_train_step_counts_only_the_projects_runs_with_trained_weights(storage):
    import json

    from backend.ingest.service import open_store
    from backend.overview import workflow_steps
    from backend.store.db import session_scope
    from backend.store.models import Project

    starter(storage)
    _add_project(storage, "Raccoons")
    runs = storage.storage / "runs"
    for name, classes, stopped in (
        ("cancelled", ["circle", "square", "triangle"], "cancelled"),
        ("raccoons", ["raccoon"], "time"),
    ):
        (runs / name).mkdir(parents=True)
        (runs / name / "config.json").write_text(json.dumps({"class_names": classes, "train": {"size": "s"}}))
        (runs / name / "last.pt").write_bytes(b"")
        (runs / name / "metrics.jsonl").write_text(json.dumps({"event": "train_end", "stopped": stopped}))
    engine, _ = open_store(storage)

    def train_step(project: str) -> str:
        with session_scope(engine) as session:
            chosen = session.query(Project).filter_by(name=project).one()
            return next(step.detail for step in workflow_steps(session, storage, chosen) if step.name == "Train")

    assert train_step("Starter Pokédex") == "0 trained runs"  # cancelled before it learned anything
    assert train_step("Raccoons") == "0 trained runs"
    (runs / "cancelled" / "best.pt").write_bytes(b"")  # an evaluated run: trained weights
    assert train_step("Starter Pokédex") == "1 trained runs"
    assert train_step("Raccoons") == "0 trained runs"  # another project's run is not this one's
