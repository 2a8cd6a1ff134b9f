"""The Evaluate page's sections: the live job, the metrics, the precision-recall curves, the confusion matrix and the
paged error browser. Plain functions the page calls in order; the data comes from `backend.views.evaluate`,
`backend.evaluation.report` and `backend.evaluation.view`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd
import streamlit as st

from backend.evaluation import report, view
from backend.evaluation.coco_eval import load_evaluation
from backend.jobs import api as jobs
from backend.jobs import outcome
from backend.settings import Settings
from backend.views import evaluate as data

PER_PAGE = 8


@st.cache_data(show_spinner=False, max_entries=8)
def read_evaluation(path: str, mtime: float) -> dict:
    """An evaluation file, cached; `mtime` is part of the key so a new evaluation of the same file is read again."""
    del mtime
    return load_evaluation(path)


@st.cache_data(show_spinner=False, max_entries=256)
def error_picture(key: str, mtime: float, _item: report.ErrorItem, class_names: tuple[str, ...]) -> bytes:
    """One error drawn on its image as JPEG, cached per item (`key`, its repr) and its image's time."""
    return view.error_jpeg(_item, class_names, max_side=480)


def job_progress(job: jobs.JobView, settings: Settings, busy: bool) -> None:
    """The job's progress bar and its error, refreshed every 2 s while it is active; the whole page reruns once when
    it ends, so the evaluation appears."""

    @st.fragment(run_every=2.0 if busy else None)
    def progress() -> None:
        current = data.current_job(settings, job.id)
        st.progress(min(1.0, current.progress or 0.0), text=data.progress_text(current))
        if current.state == "failed":
            st.error(outcome.error_text(current) or "the evaluation failed")
        if busy and not current.active:
            st.rerun()

    progress()


def render_metrics(evaluation: dict[str, Any]) -> None:
    """The mAP table, the per-class table and its AP bars."""
    st.header("Metrics")
    value = {"value": st.column_config.NumberColumn(format="%.4f")}
    metrics = pd.DataFrame(report.metric_rows(evaluation))
    st.dataframe(metrics, key="evaluate_metrics", hide_index=True, column_config=value)
    per_class = report.per_class_rows(evaluation)
    st.subheader("Per class")
    st.dataframe(pd.DataFrame(per_class), key="evaluate_per_class", hide_index=True)
    st.plotly_chart(view.ap_bars(per_class), key="evaluate_ap_bars")


def render_curves(evaluation: dict[str, Any]) -> None:
    """The precision-recall curves at IoU 0.5 and the confusion matrix (counts, or each true class's shares)."""
    st.header("Precision-recall (IoU 0.5)")
    st.plotly_chart(view.pr_figure(evaluation), key="evaluate_pr_curves")
    st.header("Confusion matrix")
    confusion = report.confusion_view(evaluation)
    shares = st.toggle("Show shares of each true class", key="evaluate_shares")
    st.plotly_chart(view.confusion_figure(confusion, shares), key="evaluate_confusion")
    st.caption(view.confusion_caption(confusion))


def render_errors(evaluation: dict[str, Any], settings: Settings) -> None:
    """The errors of the chosen kinds, a page at a time, each drawn on its image with a link to fix it in Label
    Studio (or how to get one)."""
    st.header("Errors")
    class_names = tuple(evaluation["class_names"])
    kinds = list(report.ERROR_KINDS)
    kinds = st.multiselect("Show", kinds, default=kinds, key="evaluate_kinds", format_func=report.ERROR_LABELS.get)
    items = report.error_items(evaluation, kinds)
    if not items:
        st.success("No error of these kinds at this score threshold.")
        return
    pages = -(-len(items) // PER_PAGE)
    page = st.number_input(f"Page (of {pages}, {len(items)} errors)", 1, pages, 1, key="evaluate_page")
    shown, _ = report.page_of(items, int(page), PER_PAGE)
    links = data.error_links(settings, shown)
    columns = st.columns(2)
    for index, item in enumerate(shown):
        with columns[index % 2]:
            try:
                picture = error_picture(repr(item), Path(item.path).stat().st_mtime, item, class_names)
                st.image(picture, caption=report.describe_error(item, class_names))
            except (OSError, ValueError) as error:
                st.warning(f"{item.path}: cannot draw ({error})")
            link = links.get(item.store_image_id)
            if link:
                st.markdown(f"[Fix in Label Studio]({link})")
            else:
                st.caption("Not in Label Studio: sync the project on the Label page to fix it there.")
