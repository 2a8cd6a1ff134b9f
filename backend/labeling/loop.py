"""The active-learning loop: after N new annotations, retrain from the project's best run, then pre-label the rest.

Polling, not webhooks. Label Studio 1.23.2 sends webhooks synchronously inside the annotation request with a 1 s
timeout and never retries (docs/label_studio.md, Webhooks), refuses 127.0.0.1 receivers unless its SSRF protection
is switched off, and needs a receiver that is up whenever a person labels: a webhook missed while the app or the
worker was down is lost for good. Polling counts labeled tasks from Label Studio's own state (`pull_annotations`),
so nothing is missed across restarts of Label Studio, the worker or the app; the cost is up to one poll interval (a
minute) of delay.

The counter: `annotations_at_retrain` is the labeled-task count when the last retrain was queued; the next one is
due at that count + `retrain_every`. A retrain is claimed with one conditional UPDATE (`loop_state` "idle" →
"queued"), so two pollers (two workers, or a poll racing the CLI) can never start two retrains; the state goes back
to "idle" when the retrain ends, fails, or its worker was restarted mid-way (`recover_interrupted`).

Nothing runs unasked (issue 17): a synced project's loop is off (`retrain_every` 0) until the user turns it on, and
turning it on counts from the labels that exist then, so only labels made afterwards start a retrain. Each retrain
starts from weights that are on this machine (`resolve_start`), and its job says who started it (`STARTED_BY`).
"""

from __future__ import annotations

import logging
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from sqlalchemy import CursorResult, inspect, select, update
from sqlalchemy.orm import Session

from backend.catalog import run_info
from backend.labeling.client import LabelStudioClient
from backend.labeling.sync import labeled_count, prelabel, pull_annotations
from backend.settings import Settings
from backend.store.models import LabelingProject, Project, Run, utc_now
from backend.store.versions import freeze_version, safe_name, version_folder
from backend.training.config import TrainConfig

if TYPE_CHECKING:  # for annotations only: the trainer imports torch, which the Label page must not load
    from backend.training.trainer import FitResult

logger = logging.getLogger(__name__)

STARTED_BY = "retrain loop"  # the `started_by` param of the jobs the loop queues (backend.jobs.api)
BEST_RUN = "best"  # start_weights: the project's best finished run, else random initialisation
CHECKPOINT_NAMES = ("best.pt", "last.pt")


@dataclass(frozen=True)
class LoopSettings:
    """How the loop retrains (stored per project in `labeling_projects.loop_settings`).

    Attributes:
        size: YOLO-NAS size each retrain trains ("s", "m", "l"); only runs of this size can be its start.
        imgsz: training and pre-label input side, a multiple of 32.
        epochs: epochs per retrain at most (a fine-tune from an earlier run: few are needed).
        time_minutes: wall-clock cap per retrain; None for none.
        batch_size: images per step.
        min_samples: samples per epoch at least (small labeled sets are resampled).
        start_weights: where each retrain starts: "best" (the project's best finished run of this size, else
            random initialisation), None (random initialisation), "coco" (the official weights, only when their
            file is on this machine: nothing is downloaded), or a run folder / checkpoint. A start that is not on
            disk falls back to "best" (`resolve_start` says so).
        box_threshold: detection score from which pre-label boxes are sent.
        uncertainty: "least_confident" or "margin".
        val_fraction: the frozen version's validation share.
    """

    size: str = "s"
    imgsz: int = 320
    epochs: int = 10
    time_minutes: float | None = 15.0
    batch_size: int = 8
    min_samples: int = 128
    start_weights: str | None = BEST_RUN
    box_threshold: float = 0.25
    uncertainty: str = "least_confident"
    val_fraction: float = 0.2

    @classmethod
    def from_dict(cls, values: dict[str, Any] | None) -> LoopSettings:
        known = {item.name for item in fields(cls)}
        return cls(**{key: value for key, value in (values or {}).items() if key in known})


@dataclass
class LoopCheck:
    """What one poll decided.

    Attributes:
        labeled: tasks labeled in Label Studio now.
        due_at: the labeled count at which the next retrain starts (None when the loop is off).
        started: a retrain was queued by this poll.
        state: the loop's state after the poll ("idle", "queued", "running").
        reason: one sentence for the user.
    """

    labeled: int
    due_at: int | None
    started: bool
    state: str
    reason: str


def configure_loop(
    session: Session, project: Project, *, retrain_every: int | None = None, **changes: Any
) -> LoopSettings:
    """Sets the loop's trigger (`retrain_every` new annotations; 0 turns it off) and any `LoopSettings` field.

    Turning the loop on (from 0) counts from the labels there are now: the first retrain comes after
    `retrain_every` new ones.

    Raises:
        ValueError: the project was never synced, a negative count, or an unknown setting.
    """
    row = session.get(LabelingProject, project.id)
    if row is None:
        raise ValueError(f"project {project.name!r} is not in Label Studio yet: sync it first")
    unknown = set(changes) - {item.name for item in fields(LoopSettings)}
    if unknown:
        raise ValueError(f"unknown loop settings {sorted(unknown)}: use {[item.name for item in fields(LoopSettings)]}")
    if retrain_every is not None:
        if retrain_every < 0:
            raise ValueError("retrain_every must be 0 (off) or a positive number of annotations")
        if row.retrain_every <= 0 < retrain_every:
            # Turned on: count from the labels there are now, so only new ones start a retrain (labels imported
            # with the images, or made before, never start one by themselves).
            row.annotations_at_retrain = labeled_count(session, project)
        row.retrain_every = retrain_every
    merged = LoopSettings.from_dict({**(row.loop_settings or {}), **changes})
    row.loop_settings = asdict(merged)
    session.flush()
    return merged


def check_loop(session: Session, project: Project, client: LabelStudioClient, enqueue: Callable[[], Any]) -> LoopCheck:
    """Pulls the annotations and queues a retrain (through `enqueue`) when enough new ones arrived; a loop that is
    off does neither (it reads only our database).

    The claim is committed before `enqueue` runs, so a crash in between leaves "queued" with no job: that state
    is cleared by `recover_interrupted` when a worker starts. An `enqueue` that raises puts the loop back to idle.

    Raises:
        LabelStudioError: Label Studio is down or refuses the token (the loop's state is not touched).
    """
    row = session.get(LabelingProject, project.id)
    if row is not None and row.retrain_every <= 0:  # off: not even a pull (it would rewrite boxes unasked)
        state, labeled = row.loop_state, labeled_count(session, project)
        return LoopCheck(labeled, None, False, state, "the loop is off (retrain_every = 0)")
    pull_annotations(session, project, client)
    labeled = labeled_count(session, project)
    row = session.get(LabelingProject, project.id)
    assert row is not None  # pull_annotations checked it
    due_at = row.annotations_at_retrain + row.retrain_every
    if row.loop_state != "idle":
        return LoopCheck(labeled, due_at, False, row.loop_state, f"a retrain is already {row.loop_state}")
    if labeled < due_at:
        return LoopCheck(labeled, due_at, False, "idle", f"{due_at - labeled} more annotations until the next retrain")
    # An UPDATE's result is a CursorResult (the one that has rowcount); Session.execute is typed with its base class.
    claimed = cast(
        CursorResult[Any],
        session.execute(
            update(LabelingProject)
            .where(LabelingProject.project_id == project.id, LabelingProject.loop_state == "idle")
            .values(loop_state="queued", annotations_at_retrain=labeled, loop_started_at=utc_now())
        ),
    ).rowcount
    session.commit()
    if claimed != 1:
        session.refresh(row)
        return LoopCheck(labeled, due_at, False, row.loop_state, "another poll queued the retrain first")
    try:
        enqueue()
    except Exception:
        _set_state(session, project.id, "idle", "could not queue the retrain")
        raise
    session.refresh(row)
    return LoopCheck(labeled, labeled + row.retrain_every, True, row.loop_state, f"{labeled} labeled: retrain queued")


def _set_state(session: Session, project_id: int, state: str, event: str) -> None:
    session.execute(
        update(LabelingProject)
        .where(LabelingProject.project_id == project_id)
        .values(loop_state=state, last_event=event, loop_started_at=utc_now() if state != "idle" else None)
    )
    session.commit()


def recover_interrupted(session: Session) -> int:
    """Puts loops whose retrain died with its worker back to idle; returns how many. Call when a worker starts.

    Only "running" loops are reset: a "queued" retrain is still in the (persistent) queue and will run.
    """
    reset = cast(
        CursorResult[Any],
        session.execute(
            update(LabelingProject)
            .where(LabelingProject.loop_state == "running")
            .values(loop_state="idle", loop_started_at=None, last_event="the retrain was interrupted (worker restart)")
        ),
    ).rowcount
    session.commit()
    return int(reset or 0)


@dataclass(frozen=True)
class StartWeights:
    """Where a retrain starts.

    Attributes:
        weights: what `TrainConfig.weights` takes: None (random initialisation), "coco", or a run folder.
        description: in plain words, for the page and the run's log ("run X (best mAP50-95 0.412)").
        note: why the asked-for start is not used (its weights are not on disk), else "".
    """

    weights: str | None
    description: str
    note: str = ""


def _folder(settings: Settings, folder: str) -> Path:
    path = Path(folder)
    return path if path.is_absolute() else settings.storage / path


def best_finished_run(session: Session, settings: Settings, project: Project, size: str) -> Path | None:
    """The project's finished run of YOLO-NAS `size` with the highest validation mAP50-95 (the newest on a tie).

    Finished: its Run row says "succeeded" and its folder holds a best.pt, written only after an evaluated epoch;
    so a cancelled run, or one that ended before its first epoch, is never a start. Another size cannot be loaded.
    """
    rows = session.scalars(
        select(Run).where(Run.project_id == project.id, Run.status == "succeeded").order_by(Run.id.desc())
    )
    candidates: list[tuple[float, int, Path]] = []
    for row in rows:
        folder = _folder(settings, row.folder)
        info = run_info(folder)
        if info is None or info.config.get("size") != size or not (folder / "best.pt").is_file():
            continue
        candidates.append((info.best_map if info.best_map is not None else -1.0, -len(candidates), folder))
    return max(candidates)[2] if candidates else None


def coco_weights_file(settings: Settings, size: str) -> Path:
    """Where the official COCO weights of `size` are kept once downloaded (`backend.models.download`)."""
    return settings.weights_dir / f"yolo_nas_{size}_coco.pth"


def _has_checkpoint(path: Path) -> bool:
    return any((path / name).is_file() for name in CHECKPOINT_NAMES) if path.is_dir() else path.is_file()


def _run_label(folder: Path) -> str:
    info = run_info(folder)
    score = "" if info is None or info.best_map is None else f" (best mAP50-95 {info.best_map:.3f})"
    return f"run {folder.name}{score}"


def resolve_start(session: Session, settings: Settings, project: Project, options: LoopSettings) -> StartWeights:
    """The weights the next retrain starts from, only ever from files on this machine (see `LoopSettings`)."""
    asked, note = options.start_weights, ""
    if asked is None:
        return StartWeights(None, "random initialisation")
    if asked == "coco":
        if coco_weights_file(settings, options.size).is_file():
            return StartWeights("coco", "the official COCO weights")
        note = f"the COCO weights chosen are not on this machine ({coco_weights_file(settings, options.size)})"
    elif asked != BEST_RUN:
        path = _folder(settings, asked)
        if _has_checkpoint(path):
            return StartWeights(str(path), _run_label(path) if path.is_dir() else str(path))
        note = f"the start chosen, {path}, holds no checkpoint"
    best = best_finished_run(session, settings, project, options.size)
    if best is not None:
        return StartWeights(str(best), f"the project's best {_run_label(best)}", note)
    return StartWeights(None, "random initialisation (the project has no finished run of this size yet)", note)


RANDOM = "random"  # how a choice list spells start_weights None (a select box cannot hold None as a value)


def start_choices(settings: Settings, options: LoopSettings) -> dict[str, str]:
    """The starts a user can pick (value → words): the best run, random, COCO only when its file is here, and the
    current setting whatever it is (a run folder set from the CLI)."""
    choices = {
        BEST_RUN: "the project's best finished run (random initialisation while there is none)",
        RANDOM: "random initialisation",
    }
    coco = coco_weights_file(settings, options.size)
    if coco.is_file():
        choices["coco"] = "the official COCO weights (non-commercial licence)"
    current = start_choice_of(options.start_weights)
    if current not in choices:
        here = current != "coco" and _has_checkpoint(_folder(settings, current))
        words = "the official COCO weights" if current == "coco" else current
        choices[current] = words if here else f"{words} (not on this machine: the best finished run is used instead)"
    return choices


def start_choice_of(start_weights: str | None) -> str:
    """`LoopSettings.start_weights` as a choice of `start_choices`."""
    return RANDOM if start_weights is None else start_weights


def start_weights_of(choice: str) -> str | None:
    """A choice of `start_choices` as `LoopSettings.start_weights`."""
    return None if choice == RANDOM else choice


def describe_plan(retrain_every: int, options: LoopSettings, start: StartWeights) -> str:
    """What the loop does, in plain words with its real values (the Label page shows it)."""
    if options.time_minutes:
        budget = f"for at most {options.time_minutes:g} minutes ({options.epochs} epochs at most)"
    else:
        budget = f"for {options.epochs} epochs"
    steps = (
        f"freeze a version, train YOLO-NAS {options.size.upper()} from {start.description} {budget}, "
        "then pre-label the unlabeled images"
    )
    if start.note:
        steps += f" ({start.note})"
    if retrain_every <= 0:
        return f"The loop is off: nothing is trained until you turn it on. Once on, every N new labels: {steps}."
    return f"Every {retrain_every} new labels: {steps}."


@dataclass
class RetrainResult:
    """A finished retrain: the version it trained on, its run, how it ended, and the pre-label that followed."""

    version: str
    run_dir: Path
    stopped: str
    best_map: float
    prelabeled_tasks: int
    seconds: float


def run_retrain(
    session: Session,
    settings: Settings,
    project: Project,
    client: LabelStudioClient,
    *,
    on_event: Callable[..., None] | None = None,
    stop_requested: Callable[[], bool] | None = None,
) -> RetrainResult:
    """The retrain job: freeze the labeled images, fine-tune from `resolve_start`, pre-label the unlabeled tasks.

    A retrain that fails before its first checkpoint leaves no run behind (its folder and Run row are removed);
    one that saved a checkpoint keeps its run, marked "failed", "cancelled" or "interrupted".

    Raises:
        ValueError: nothing labeled, or the project was never synced.
        TrainingError / LabelStudioError: training or Label Studio failed; the loop goes back to idle either way.
    """
    started = time.monotonic()
    project_id = project.id  # kept: a commit expires `project`, and reading it again opens a read transaction
    row = session.get(LabelingProject, project_id)
    if row is None:
        raise ValueError(f"project {project.name!r} is not in Label Studio yet: sync it first")
    _set_state(session, project_id, "running", "retraining")
    run: Run | None = None
    run_dir: Path | None = None
    try:
        options = LoopSettings.from_dict(row.loop_settings)
        start = resolve_start(session, settings, project, options)
        if start.note:
            logger.warning("retrain of %r: %s; starting from %s", project.name, start.note, start.description)
        stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
        version_id, version_name, data = _freeze_labeled(session, settings, project, client, options, stamp)
        config = _retrain_config(options, data, start)
        run_dir = _new_run_folder(settings, project, stamp)
        run = _run_row(settings, project_id, version_id, run_dir, config, start)
        session.add(run)
        session.commit()
        result = _train(config, run_dir, on_event, stop_requested)
        run.status = "cancelled" if result.stopped == "cancelled" else "succeeded"
        session.commit()
        if result.stopped == "cancelled":
            raise RuntimeError("the retrain was cancelled; the loop will try again after the next annotations")
        tasks = _prelabel_with_run(session, settings, project, client, run_dir, options)
        _set_state(
            session,
            project_id,
            "idle",
            f"retrained on {version_name} ({result.best_map:.3f} mAP50-95); pre-labeled {tasks} tasks",
        )
        return RetrainResult(version_name, run_dir, result.stopped, result.best_map, tasks, time.monotonic() - started)
    except BaseException as error:
        session.rollback()
        _settle_failed_run(session, run, run_dir, "interrupted" if isinstance(error, KeyboardInterrupt) else "failed")
        _set_state(session, project_id, "idle", f"the retrain failed: {error}")
        raise


def _freeze_labeled(
    session: Session,
    settings: Settings,
    project: Project,
    client: LabelStudioClient,
    options: LoopSettings,
    stamp: str,
) -> tuple[int, str, Path]:
    """Pulls Label Studio's annotations and freezes them as version "loop-<stamp>"; returns its id, name and
    folder (read before the commit expires the row)."""
    pull_annotations(session, project, client)
    version = freeze_version(
        session,
        settings.storage,
        project,
        f"loop-{stamp}",
        fractions=(1.0 - options.val_fraction, options.val_fraction),
    )
    frozen = (version.id, version.name, version_folder(settings.storage, version))
    session.commit()
    return frozen


def _retrain_config(options: LoopSettings, data: Path, start: StartWeights) -> TrainConfig:
    """The retrain's TrainConfig: the loop's settings on the frozen version, from `start`, without early stopping."""
    return TrainConfig(
        data=str(data),
        size=options.size,
        imgsz=options.imgsz,
        epochs=options.epochs,
        time_minutes=options.time_minutes,
        batch_size=options.batch_size,
        min_samples=options.min_samples,
        weights=start.weights,
        patience=None,
    )


def _new_run_folder(settings: Settings, project: Project, stamp: str) -> Path:
    """The retrain's run folder: a new one, never an earlier run's."""
    run_dir = settings.runs_dir / f"{safe_name(project.name, 'project')}-loop-{stamp}"
    if run_dir.exists():
        raise ValueError(f"{run_dir} already exists: the next poll retrains into a new folder")
    return run_dir


def _run_row(
    settings: Settings, project_id: int, version_id: int, run_dir: Path, config: TrainConfig, start: StartWeights
) -> Run:
    """The retrain's Run row ("running"), its folder relative to the storage when it lies inside."""
    return Run(
        project_id=project_id,
        dataset_version_id=version_id,
        folder=str(run_dir.relative_to(settings.storage)) if run_dir.is_relative_to(settings.storage) else str(run_dir),
        status="running",
        config={"train": config.to_dict(), "origin": "labeling loop", "start": start.description},
    )


def _train(
    config: TrainConfig,
    run_dir: Path,
    on_event: Callable[..., None] | None,
    stop_requested: Callable[[], bool] | None,
) -> FitResult:
    """Trains the retrain's run through the one training entry (`training.launch.train`), in the worker's process:
    the loop's settings name no processes."""
    # torch (2-3 s to import) only when the loop trains: the Label page imports this module on every rerun.
    from backend.training.launch import train

    return train(config, run_dir, processes=1, on_event=on_event, stop_requested=stop_requested)


def _prelabel_with_run(
    session: Session,
    settings: Settings,
    project: Project,
    client: LabelStudioClient,
    run_dir: Path,
    options: LoopSettings,
) -> int:
    """Pre-labels the project's tasks with the new run's best.pt (its last.pt when no epoch was evaluated);
    returns the number of tasks pre-labeled."""
    model = run_dir / "best.pt" if (run_dir / "best.pt").is_file() else run_dir / "last.pt"
    report = prelabel(
        session,
        settings,
        project,
        client,
        model,
        box_threshold=options.box_threshold,
        uncertainty=options.uncertainty,
        imgsz=options.imgsz,
    )
    session.commit()
    return report.tasks


def _settle_failed_run(session: Session, run: Run | None, run_dir: Path | None, status: str) -> None:
    """A retrain that stopped early: without a checkpoint its folder and Run row are removed (an empty run folder
    offered nothing and misled the runs list), with one its Run row says how it ended."""
    if run is None or run_dir is None:
        return
    try:
        saved = inspect(run).persistent  # the failure may have come before its row was committed
        if not any((run_dir / name).is_file() for name in CHECKPOINT_NAMES):
            shutil.rmtree(run_dir, ignore_errors=True)
            if saved:
                session.delete(run)
        elif saved and run.status == "running":
            run.status = status
        session.commit()
    except Exception:  # the database may be what failed: the loop's state is still reset by the caller
        logger.exception("could not settle the failed retrain's run %s", run_dir)
        session.rollback()


def loop_status(session: Session, settings: Settings, project: Project) -> dict[str, Any]:
    """The loop's settings and state for the app and the CLI, with where the next retrain would start and what the
    loop does in plain words ("plan")."""
    row = session.get(LabelingProject, project.id)
    if row is None:
        return {"synced": False}
    options = LoopSettings.from_dict(row.loop_settings)
    start = resolve_start(session, settings, project, options)
    return {
        "synced": True,
        "ls_project_id": row.ls_project_id,
        "retrain_every": row.retrain_every,
        "annotations_at_retrain": row.annotations_at_retrain,
        "labeled": labeled_count(session, project),
        "state": row.loop_state,
        "last_model": row.last_model,
        "last_event": row.last_event,
        "settings": asdict(options),
        "start": asdict(start),
        "plan": describe_plan(row.retrain_every, options, start),
    }


def synced_projects(session: Session, *, loop_on: bool = False) -> list[Project]:
    """Projects with a Label Studio project; with `loop_on`, only those whose loop is on (what the poller visits)."""
    query = select(Project).join(LabelingProject, LabelingProject.project_id == Project.id).order_by(Project.id)
    if loop_on:
        query = query.where(LabelingProject.retrain_every > 0)
    return list(session.scalars(query))
