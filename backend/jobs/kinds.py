"""One handler per job kind: (params, settings, context) -> a JSON-ready result. The runner (`backend.jobs.runner`)
claims the row, calls the kind's handler and records how it ended; a handler only calls the backend and reports.

Params per kind (JSON), and the backend function each calls:

- `import`: project, paths → `ingest.service.import_into`
- `crawl`: project, one of query / urls / page, limit, depth, crawl_settings → `ingest.service.crawl_into`
- `labeling_sync`: project → `labeling.service.sync`
- `labeling_prelabel`: project, model (default: the catalog's default model), only_unlabeled, imgsz →
  `labeling.service.prelabel`
- `labeling_retrain`: project → `labeling.loop.run_retrain`
- `train`: project, config (`TrainConfig.to_dict()`, as `api.submit` queues it), run_dir; or resume (a run folder)
  and overrides (`resume`'s keyword arguments; more_minutes / more_epochs continue a run that ended:
  `api.continue_training`); gpus / nproc (training processes) → `training.launch.train` / `resume`; the run's `Run`
  row is created or updated (`store.runs`)
- `evaluate`: model, data, split ("val"), out, imgsz, batch (16), conf (0.25), device → `run_evaluation.evaluate_run`,
  what `yolodex eval` runs
- `quantize`: run_dir, options (QuantizeOptions fields), out → `quantization.pipeline.quantize_run`

Each handler imports its backend inside it: the worker loads torch, the Label Studio SDK or onnxruntime only for
the kinds it runs, and the app (which imports the jobs package to read jobs) never does.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy import update
from sqlalchemy.orm import Session

from backend.catalog import best_model, project_runs, trained_runs, training_end_text
from backend.jobs.context import JobContext
from backend.jobs.lifecycle import job_engine, write_when_free
from backend.jobs.queue import huey
from backend.models.download import WeightsDownloadError
from backend.runs import RunFolder
from backend.settings import Settings
from backend.store.db import session_scope
from backend.store.models import Job, utc_now
from backend.store.runs import set_run_status, start_run
from backend.training.config import TrainConfig

if TYPE_CHECKING:  # for annotations only: the trainer imports torch, which only a training worker loads
    from backend.training.trainer import FitResult

Handler = Callable[[dict[str, Any], Settings, JobContext], dict[str, Any]]


def _run_import(params: dict[str, Any], settings: Settings, context: JobContext) -> dict[str, Any]:
    # the ingest pipeline (image decoders, hashing) loads only in a worker that imports
    from backend.ingest.service import import_into

    # import_into is one transaction over every path: a cancel lets it finish (half an import is worse). On SQLite
    # that transaction holds the write lock, so its progress reaches the app through the pending file.
    context.progress(message=f"importing {len(params['paths'])} path(s)")
    return import_into(
        list(params["paths"]),
        params["project"],
        settings,
        on_progress=lambda done, total: context.progress_of(done, total, "imported files"),
    )


def _run_crawl(params: dict[str, Any], settings: Settings, context: JobContext) -> dict[str, Any]:
    # the crawler loads only in a worker that crawls
    from backend.ingest.crawl import CrawlSettings
    from backend.ingest.service import crawl_into

    crawl_settings = CrawlSettings(**params["crawl_settings"]) if params.get("crawl_settings") else None
    context.progress(message="crawling")
    result = crawl_into(
        project=params["project"],
        query=params.get("query"),
        limit=int(params.get("limit", 50)),
        urls=params.get("urls"),
        page=params.get("page"),
        depth=int(params.get("depth", 1)),
        crawl_settings=crawl_settings,
        settings=settings,
        stop_requested=context.stop_requested,  # each image is committed as it comes: a cancel keeps them
        on_progress=lambda done, total: context.progress_of(done, total, "crawled"),
    )
    context.cancelled = bool(result.get("cancelled"))
    return result


def _run_labeling_sync(params: dict[str, Any], settings: Settings, context: JobContext) -> dict[str, Any]:
    # the Label Studio SDK loads only in a worker that labels
    from backend.labeling import service

    context.progress(message="syncing with Label Studio")
    return service.sync(params["project"], settings)


def _run_labeling_prelabel(params: dict[str, Any], settings: Settings, context: JobContext) -> dict[str, Any]:
    # the Label Studio SDK loads only in a worker that labels
    from backend.labeling import service

    model = params.get("model")
    if not model:
        with session_scope(job_engine(settings)) as session:
            runs = project_runs(session, settings, params["project"], trained_runs(settings))
        chosen = best_model(runs)
        if chosen is None:
            raise ValueError(
                f"no trained model of project {params['project']!r} to pre-label with: train one first, or give a model"
            )
        model = str(chosen.model.path)

    def on_progress(done: int, total: int) -> None:
        context.progress(done / total if total else 1.0, message=f"pre-labeled {done}/{total} tasks")

    context.progress(0.0, message=f"pre-labeling with {Path(model).name}")
    return service.prelabel(
        model,
        params["project"],
        only_unlabeled=bool(params.get("only_unlabeled", True)),
        imgsz=params.get("imgsz"),
        settings=settings,
        on_progress=on_progress,
    )


def _run_labeling_retrain(params: dict[str, Any], settings: Settings, context: JobContext) -> dict[str, Any]:
    # the Label Studio SDK loads only in a worker that labels
    from backend.labeling.loop import run_retrain
    from backend.labeling.service import labeling_session

    project_name = params["project"]
    context.progress(0.0, message="retraining on the labeled images")
    with (
        huey.lock_task(f"labeling-retrain-{project_name}"),
        labeling_session(project_name, settings) as (session, resolved, project, client),
    ):
        result = run_retrain(
            session,
            resolved,
            project,
            client,
            on_event=context.on_training_event,
            stop_requested=context.stop_requested,
        )
        return {**result.__dict__, "run_dir": str(result.run_dir)}


def _run_train(params: dict[str, Any], settings: Settings, context: JobContext) -> dict[str, Any]:
    # gpus N (one process per GPU) or nproc N (on the config's device, gloo on a CPU); 1 trains in this process
    processes = int(params.get("gpus") or params.get("nproc") or 1)
    gpus = bool(params.get("gpus"))
    resuming = bool(params.get("resume"))
    run_dir = Path(params["resume"] if resuming else params["run_dir"])
    # The queued config is TrainConfig's serialised form (`api.submit` checked and resolved it): the Run row records
    # it as it came, and it becomes the dataclass once, here.
    recorded = RunFolder(run_dir).train() if resuming else dict(params["config"])
    config = None if resuming else TrainConfig.from_dict(recorded)
    engine = job_engine(settings)
    run_id = write_when_free(
        engine,
        lambda session: _start_run(session, settings, params.get("project"), run_dir, recorded, context.job_id),
        f"job {context.job_id}'s run row",
    )
    if run_id is None:
        context.log("no project matches this dataset: the run is not listed in the project's runs")
    status = "failed"
    try:
        result = _train_or_resume(params, run_dir, config, processes, gpus, context)
        status = "cancelled" if result.stopped == "cancelled" else "succeeded"
        context.cancelled = result.stopped == "cancelled"
        if resuming:  # a continuation wrote its new totals there: the end is counted against them
            recorded = RunFolder(run_dir).train()
        end = {**result.to_dict(), "epochs": recorded.get("epochs"), "time_budget_s": _budget_s(recorded)}
        return {**end, "run_id": run_id, "summary": training_end_text(end)}
    except WeightsDownloadError as error:
        status = "failed"
        raise WeightsDownloadError(_weights_advice(error)) from error
    except KeyboardInterrupt:
        status = "interrupted"
        raise
    except Exception:
        status = "cancelled" if context.stop_seen else "failed"
        raise
    finally:
        if not context.lost:  # a lost job's run may already go on elsewhere: its status is not ours to set
            write_when_free(
                engine,
                lambda session: set_run_status(session, settings, run_dir, status),
                f"job {context.job_id}'s run status",
            )


def _train_or_resume(
    params: dict[str, Any],
    run_dir: Path,
    config: TrainConfig | None,
    processes: int,
    gpus: bool,
    context: JobContext,
) -> FitResult:
    """A new run of `config` in `run_dir`, or (`config` None) the run there resumed with the job's overrides,
    through the one training entry (`training.launch`)."""
    # torch loads only in a worker that trains
    from backend.training.launch import resume, train

    if config is None:
        context.log(f"resuming {run_dir} from its last.pt")
        return resume(
            run_dir,
            processes=processes,
            gpus=gpus,
            on_event=context.on_training_event,
            stop_requested=context.stop_requested,
            **(params.get("overrides") or {}),
        )
    return train(
        config,
        run_dir,
        processes=processes,
        gpus=gpus,
        on_event=context.on_training_event,
        stop_requested=context.stop_requested,
    )


def _start_run(
    session: Session, settings: Settings, project: str | None, run_dir: Path, train: dict[str, Any], job_id: int
) -> int | None:
    # Write first, so this transaction holds the write lock before it reads (see api.cancel).
    session.execute(update(Job).where(Job.id == job_id).values(updated_at=utc_now()))
    return start_run(session, settings, project, run_dir, train, job_id)


def _budget_s(config: dict[str, Any]) -> float | None:
    minutes = config.get("time_minutes")
    return float(minutes) * 60 if minutes else None


def _weights_advice(error: WeightsDownloadError) -> str:
    """The start weights' download failure in words for wherever the job is shown (the Train page, the Jobs page,
    `yolodex jobs`): what failed and what to do instead, without the CLI's "run the command again"."""
    if error.destination is None:
        return str(error)
    return (
        f"The start weights {error.destination.name} are not on this machine and could not be downloaded "
        f"({error.reason}). Start the training again with other start weights (random initialisation or an earlier "
        f"run), or put the file at {error.destination} first."
    )


def _run_evaluate(params: dict[str, Any], settings: Settings, context: JobContext) -> dict[str, Any]:
    # torch loads only in a worker that evaluates
    from backend.run_evaluation import evaluate_run

    evaluation = evaluate_run(
        params["model"],
        params["data"],
        params.get("split") or "val",
        imgsz=params.get("imgsz"),
        batch=int(params.get("batch", 16)),
        conf=float(params.get("conf", 0.25)),
        device=params.get("device") or settings.device,
        out=params.get("out"),
        on_start=lambda text: context.progress(0.0, message=text),
        on_progress=lambda done, total: context.progress_of(done, total, "evaluated images"),
    )
    context.log(f"{evaluation.model} on {params['data']} [{evaluation.split}]: {evaluation.summary}")
    return evaluation.to_dict()


QUANTIZE_STAGES = {
    "export": 0.05,
    "calibrate": 0.15,
    "scan": 0.3,
    "policy": 0.6,
    "qat": 0.65,
    "measure": 0.9,
    "done": 1.0,
}


def _run_quantize(params: dict[str, Any], settings: Settings, context: JobContext) -> dict[str, Any]:
    # torch and onnxruntime load only in a worker that quantizes
    from backend.quantization.pipeline import QuantizeCancelled, QuantizeOptions, quantize_run

    options = dict(params.get("options") or {})
    context.training_drives_progress = False
    if options.get("scan_layers") is not None:
        options["scan_layers"] = tuple(options["scan_layers"])

    def on_event(name: str, **data: Any) -> None:
        if name == "stage":
            stage = data.get("stage")
            context.log(f"quantize: {stage}" + (f" ({data['calibration']})" if data.get("calibration") else ""))
            context.progress(QUANTIZE_STAGES.get(str(stage)), message=f"quantize: {stage}")
        elif name == "scan" and data.get("total"):
            fraction = QUANTIZE_STAGES["scan"] + 0.3 * data["done"] / data["total"]
            context.progress(fraction, message=f"sensitivity scan: layer {data['done']}/{data['total']}")
        if name in ("train_start", "step", "epoch", "train_end"):
            context.on_training_event(name, **data)  # QAT: its own messages; progress stays at the QAT stage
            return
        context.metric(name, **data)
        context.flush()

    try:
        return quantize_run(
            params["run_dir"],
            params.get("out"),
            QuantizeOptions(**options),
            on_event=on_event,
            stop_requested=context.stop_requested,
        )
    except QuantizeCancelled:
        context.cancelled = True
        return {"run_dir": params["run_dir"], "cancelled": True}


HANDLERS: dict[str, Handler] = {
    "import": _run_import,
    "crawl": _run_crawl,
    "labeling_sync": _run_labeling_sync,
    "labeling_prelabel": _run_labeling_prelabel,
    "labeling_retrain": _run_labeling_retrain,
    "train": _run_train,
    "evaluate": _run_evaluate,
    "quantize": _run_quantize,
}
