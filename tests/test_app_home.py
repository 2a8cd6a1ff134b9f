from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest

# Absolute: AppTest resolves a relative path against this test file, not the repository root.
HOME = Path(__file__).resolve().parents[1] / "app" / "Home.py"


@pytest.mark.slow
def test_home_page_shows_the_three_models_and_the_licence():
    app = AppTest.from_file(str(HOME), default_timeout=120).run()

    assert not app.exception, [exception.value for exception in app.exception]
    table = app.dataframe[0].value
    assert list(table["model"]) == ["YOLO-NAS S", "YOLO-NAS M", "YOLO-NAS L"]
    assert table.loc[0, "params_total"] == 19_053_888
    assert (table["params_fused"] < table["params_total"]).all()
    assert (table["gflops"].diff().dropna() > 0).all()  # S < M < L
    page_text = " ".join(element.value for element in [*app.markdown, *app.warning])
    assert "non-commercial" in page_text
    assert page_text.count("(coming)") == 8
