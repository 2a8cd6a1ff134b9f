"""The `yolodex` command: one sub-command per step, each a thin call into the backend modules.

Exit status 0 on success, 1 on a failure with one clear line on stderr (`yolodex: error: ...`), 2 on bad usage.
`--json` prints machine-readable output on stdout. `import`, `crawl`, `eval`, `predict` (and `train`) draw a
progress bar on stderr when stderr is a terminal, and never with `--json`.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy.exc import OperationalError

from backend import catalog
from backend.labeling.server import LabelStudioError
from backend.models.checkpoints import CheckpointError
from backend.models.download import WeightsDownloadError
from backend.processing import ImageLoadError
from backend.runs import RunFolder, RunFolderError
from backend.store.db import BUSY_ADVICE, database_locked, describe_error, disk_full
from backend.training.config import TrainConfig, TrainingError

if TYPE_CHECKING:  # annotations only: the quantization and training modules load with their own commands
    from backend.quantization.pipeline import QuantizeOptions
    from backend.training.trainer import FitResult

SIZES = ["s", "m", "l"]

EXPECTED_ERRORS = (
    CheckpointError,
    WeightsDownloadError,
    ImageLoadError,
    TrainingError,
    FileNotFoundError,
    ValueError,
    LabelStudioError,
    RunFolderError,
)


def _print(payload: dict | list, as_json: bool, text: str) -> None:
    print(json.dumps(payload, indent=2) if as_json else text)


class _ProgressBar:
    """A tqdm bar on stderr fed as an `on_progress(done, total)` callback; nothing at all with `--json` or when
    stderr is not a terminal (a pipe, a log file, a script), so the output there is the report alone."""

    def __init__(self, description: str, unit: str, as_json: bool) -> None:
        self.description, self.unit = description, unit
        self.enabled = not as_json and sys.stderr.isatty()
        self.bar: Any = None

    def __call__(self, done: int, total: int) -> None:
        if not self.enabled:
            return
        if self.bar is None:
            # Imported per command: `yolodex --help` and the light commands start without torch.
            from tqdm import tqdm

            try:  # a terminal that reports no size (0 x 0, e.g. under `script`) gets no bar from tqdm's defaults
                size = os.get_terminal_size(sys.stderr.fileno())
                columns, lines = size.columns or 80, size.lines or 24
            except OSError:
                columns, lines = 80, 24
            self.bar = tqdm(
                total=total,
                desc=self.description,
                unit=self.unit,
                file=sys.stderr,
                leave=False,
                ncols=columns,
                nrows=lines,
            )
        if total != self.bar.total:
            self.bar.total = total
        self.bar.update(done - self.bar.n)
        if done >= total:  # tqdm skips draws within 0.1 s of the last one: show the end before close() clears it
            self.bar.refresh()

    def __enter__(self) -> _ProgressBar:
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def cmd_info(args: argparse.Namespace) -> None:
    # Imported per command: `yolodex --help` and the light commands start without torch.
    from backend.models import build_model, load_model
    from backend.models.summary import summarise_model

    loaded = None
    if args.weights:
        model, report = load_model(args.weights, size=args.size, num_classes=args.num_classes)
        loaded = report.describe()
    else:
        model = build_model(args.size or "s", args.num_classes or 80)
    summary = summarise_model(model, args.imgsz)
    gflops = summary.pop("gflops")
    info = {**summary, "gflops_fused": gflops, "loaded": loaded}
    size, num_classes, total = info["size"], info["num_classes"], info["params_total"]
    text = (
        f"YOLO-NAS {size.upper()}, {num_classes} classes: {total:,} parameters ({info['params_fused']:,} fused), "
        f"{info['gflops_fused']} GFLOPs at {args.imgsz}x{args.imgsz}"
    )
    _print(info, args.json, text + (f"\n{loaded}" if loaded else ""))


def cmd_export(args: argparse.Namespace) -> None:
    # Imported per command: `yolodex --help` and the light commands start without torch.
    from backend.export.onnx_export import export_onnx
    from backend.models import build_model, load_model
    from backend.processing import PostprocessConfig

    if args.weights:
        model, report = load_model(args.weights, size=args.size)
        class_names = report.class_names
        print(report.describe(), file=sys.stderr)
    else:
        print("no --weights: exporting a randomly initialised model (for benchmarks only)", file=sys.stderr)
        model = build_model(args.size or "s", args.num_classes or 80)
        class_names = [f"class{i}" for i in range(model.num_classes)]
    postprocess = PostprocessConfig(
        conf_threshold=args.conf, iou_threshold=args.iou, top_k=args.top_k, max_detections=args.max_det
    )
    path = export_onnx(
        model, args.output, imgsz=args.imgsz, with_nms=args.nms, postprocess=postprocess, class_names=class_names
    )
    payload = {"path": str(path), "imgsz": args.imgsz, "with_nms": args.nms, "size": model.config.size}
    _print(payload, args.json, f"wrote {path}")


def cmd_predict(args: argparse.Namespace) -> None:
    # Imported per command: `yolodex --help` and the light commands start without torch.
    from backend.inference import Predictor
    from backend.processing import PostprocessConfig

    postprocess = PostprocessConfig(conf_threshold=args.conf, iou_threshold=args.iou, max_detections=args.max_det)
    predictor = Predictor.from_path(args.model, imgsz=args.imgsz, postprocess=postprocess, runtime=args.runtime)
    predictor.warm_up()  # the first run sets the runtime up; the times below are the steady state
    results: list[dict[str, Any]] = []
    lines = [f"{args.model.name} in {predictor.runtime_label}"]
    with _ProgressBar("predict", "img", args.json) as bar:
        for image in args.images:  # one at a time: images of different sizes, and one bad file names itself
            start = time.perf_counter()
            detections = predictor.predict([image])[0]
            milliseconds = round(1000 * (time.perf_counter() - start), 1)
            results.append(
                {
                    "image": str(image),
                    "detections": detections.to_dict(predictor.class_names),
                    "runtime": predictor.runtime_label,
                    "ms": milliseconds,  # decode + pre-processing + model + post-processing
                }
            )
            lines.append(f"{image}: {len(detections)} detections in {milliseconds:.0f} ms")
            for found in results[-1]["detections"]:
                box = ", ".join(f"{value:.1f}" for value in found["box"])
                lines.append(f"  {found['class_name']} {found['score']:.3f} [{box}]")
            bar(len(results), len(args.images))
    _print(results, args.json, "\n".join(lines))


def cmd_download(args: argparse.Namespace) -> None:
    # Imported per command: `yolodex --help` and the light commands start without torch.
    from backend.models.download import OFFICIAL_COCO_WEIGHTS, WeightsSource, fetch_weights
    from backend.settings import get_settings

    source = OFFICIAL_COCO_WEIGHTS[args.size]
    if args.url:
        source = WeightsSource(source.name, args.url, args.sha256, source.licence)
    path = fetch_weights(source, get_settings().weights_dir, progress=not args.json)
    _print({"path": str(path), "licence": source.licence}, args.json, f"{path}\n{source.licence}")


def cmd_train(args: argparse.Namespace) -> None:
    # Imported per command: `yolodex --help` and the light commands start without torch.
    from tqdm import tqdm

    from backend.training.launch import train

    if args.gpus and args.nproc:
        raise ValueError("--gpus N (one process per GPU) or --nproc N (processes on --device), not both")
    processes = args.gpus or args.nproc or 1  # more than 1: torchrun processes; --batch stays the global batch
    on_log = None if args.quiet else (lambda line: print(line, file=sys.stderr))
    bar = _TrainProgress(tqdm, quiet=args.quiet)
    if not args.resume and not args.data:
        raise ValueError("--data is required (a dataset folder or COCO json), or --resume RUN_DIR")
    for flag, value in (("--epochs", args.epochs), ("--time", args.time)):
        if value is not None and value <= 0:
            raise ValueError(f"{flag} must be above 0 (got {value:g})")
    if args.measure_speed or not args.quiet:
        # Advice only: training itself says what is wrong with these settings or data.
        with contextlib.suppress(OSError, ValueError, KeyError, TrainingError):
            _print_estimate(args, processes)
    if args.resume and args.augment:
        raise ValueError(
            "--augment cannot change a run's augmentation on --resume (it trains with the recorded "
            "one): start a new run with --augment instead"
        )
    try:
        if args.resume:
            result = _resume(args, processes, bar, on_log)
        else:
            config = _train_config(args)
            out = args.out or _default_run_dir(args.size)
            result = train(config, out, processes=processes, gpus=bool(args.gpus), on_event=bar, on_log=on_log)
    finally:
        bar.close()
    payload = result.to_dict()
    end = {**bar.events.get("train_end", {}), **payload}
    text = (
        f"{result.run_dir}: {catalog.training_end_text(end, bar.events.get('train_start'))}"
        + (f" at epoch {result.best_epoch + 1}" if result.best_epoch is not None else "")
        + f", in {result.elapsed_s:.0f} s"
    )
    _print(payload, args.json, text)


def _resume(
    args: argparse.Namespace, processes: int, bar: _TrainProgress, on_log: Callable[[str], None] | None
) -> FitResult:
    """`train --resume RUN_DIR`: continues the run; an error names the flags or the command that goes on from it."""
    # Imported per command: `yolodex --help` and the light commands start without torch.
    from backend.training.launch import resume
    from backend.training.trainer import DamagedLastCheckpoint, RunFinished

    # On --resume, --time and --epochs are MORE minutes / epochs from where the run stopped (a run that
    # ended is continued: trainer.resume's more_minutes / more_epochs); without them it goes on to its totals.
    overrides = {
        "more_minutes": args.time,
        "more_epochs": args.epochs,
        "patience": args.patience,
        "device": args.device,
        "num_workers": args.workers,
        "amp": False if args.no_amp else None,
        "checkpoint_minutes": args.checkpoint_minutes,
        "compile": args.compile or None,
    }
    try:
        return resume(args.resume, processes=processes, gpus=bool(args.gpus), on_event=bar, on_log=on_log, **overrides)
    except RunFinished as error:  # the flags that continue it
        raise RunFinished(f"{error} (--resume {args.resume} with --epochs N or --time MINUTES)") from None
    except DamagedLastCheckpoint as error:  # the command that starts from best.pt
        recorded = error.train
        raise CheckpointError(
            f"{error}: yolodex train --data {recorded.get('data')} --size {recorded.get('size')} "
            f"--imgsz {recorded.get('imgsz')} --weights {error.best}"
        ) from None


def _train_config(args: argparse.Namespace) -> TrainConfig:
    """The new run's config from the flags (the unset ones take TrainConfig's defaults or the ones named here)."""
    augment_pipeline = None
    if args.augment is not None:  # checked before anything is written
        # Imported per command: `yolodex --help` and the light commands start without torch.
        from backend.data.augment import load_pipeline_file

        augment_pipeline = load_pipeline_file(args.augment, args.imgsz)
    return TrainConfig(
        data=str(args.data),
        size=args.size,
        imgsz=args.imgsz,
        epochs=args.epochs or 100,
        batch_size=args.batch,
        time_minutes=args.time,
        weights=args.weights,
        lr=args.lr,
        patience=args.patience if args.patience is not None else 30,
        device=args.device or "auto",
        amp=False if args.no_amp else None,
        num_workers=args.workers,
        seed=args.seed,
        min_samples=args.min_samples,
        compile=args.compile,
        augment_pipeline=augment_pipeline,
        **({} if args.close_mosaic is None else {"close_mosaic": args.close_mosaic}),
        checkpoint_minutes=args.checkpoint_minutes if args.checkpoint_minutes is not None else 5.0,
    )


def _default_run_dir(size: str) -> Path:
    # Imported per command: `yolodex --help` and the light commands start without torch.
    from backend.settings import get_settings

    return get_settings().runs_dir / time.strftime(f"{size}-%Y%m%d-%H%M%S")


def _print_estimate(args: argparse.Namespace, processes: int) -> None:
    """The expected time per epoch and the recommended budget (`training.estimate`), on stderr, from an earlier run's
    or a cached probe's speed; `--measure-speed` probes when neither exists. Nothing when there is no measured speed
    (or several processes: their speed is not measured)."""

    # Imported per command: `yolodex --help` and the light commands start without torch.
    from backend.settings import get_settings
    from backend.training import estimate

    settings = get_settings()
    if processes > 1:
        return
    if args.resume:
        train = RunFolder(args.resume).train()
        size, imgsz, batch, data = train["size"], train["imgsz"], train["batch_size"], train["data"]
        min_samples, device = train.get("min_samples", args.min_samples), args.device or train["device"]
        amp = False if args.no_amp or train.get("amp") is False else None
    else:
        size, imgsz, batch, data = args.size, args.imgsz, args.batch, args.data
        min_samples, device, amp = args.min_samples, args.device or "auto", False if args.no_amp else None
    if not Path(data).exists():
        return  # training says what is wrong with the data, first
    key = estimate.speed_key(size, imgsz, batch, device, amp)
    speed = estimate.measured_speed(settings.storage, settings.runs_dir, key)
    if speed is None and args.measure_speed:
        print(
            f"measuring this machine's speed: {estimate.PROBE_STEPS} training steps of YOLO-NAS {size.upper()} at "
            f"{imgsz} px, batch {batch}...",
            file=sys.stderr,
        )
        speed = estimate.measure_speed(settings.storage, key)
    train_images, val_images = estimate.version_images(data)
    if speed is None:
        print(
            "no time estimate: no earlier run with these settings and no speed measured on this machine "
            "(--measure-speed measures it first)",
            file=sys.stderr,
        )
    elif train_images:
        print(estimate.recommend(speed, train_images, val_images, batch, min_samples).text(), file=sys.stderr)


class _TrainProgress:
    """A terminal progress bar per epoch, fed by the trainer's events (on stderr, so --json stays clean)."""

    def __init__(self, tqdm_class: type, quiet: bool = False):
        self.tqdm_class = tqdm_class
        self.quiet = quiet
        self.bar: Any = None
        self.events: dict[str, dict[str, Any]] = {}

    def __call__(self, name: str, **data: Any) -> None:
        if name in ("train_start", "train_end"):
            self.events[name] = data  # the closing line's epoch count (`catalog.training_end_text`)
        if self.quiet:
            return
        if name == "train_start":
            print(
                f"training on {data['device']} ({data['precision']}), {data['train_images']} train / "
                f"{data['val_images']} val images; start: {data['start']}",
                file=sys.stderr,
            )
            for note in data.get("notes") or []:
                print(f"note: {note}", file=sys.stderr)
        elif name == "step":
            if self.bar is None:
                self.bar = self.tqdm_class(
                    total=data["steps_per_epoch"],
                    initial=data["step"] - 1,
                    desc=f"epoch {data['epoch'] + 1}",
                    file=sys.stderr,
                    leave=False,
                    dynamic_ncols=True,
                )
            self.bar.update(1)
            self.bar.set_postfix(
                loss=f"{data['loss']:.3f}",
                cls=f"{data['loss_cls']:.3f}",
                iou=f"{data['loss_iou']:.3f}",
                dfl=f"{data['loss_dfl']:.3f}",
                lr=f"{data['lr']:.2e}",
                img_s=f"{data['images_per_s']:.1f}",
            )
        elif name == "epoch":
            self.close()
            val = data.get("val") or {}
            train = data.get("train") or {}
            shown = f"mAP50-95 {val.get('mAP50-95')}, mAP50 {val.get('mAP50')}" if val else "not evaluated"
            print(
                f"epoch {data['epoch'] + 1}: loss {train.get('loss', float('nan')):.4f}, {shown}, "
                f"best {data['best_map']:.4f}, {data['elapsed_s']:.0f} s",
                file=sys.stderr,
            )
        elif name == "early_stop":
            print(f"early stop: no better mAP50-95 for {data['patience']} epochs", file=sys.stderr)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def cmd_eval(args: argparse.Namespace) -> None:
    # Imported per command: `yolodex --help` and the light commands start without torch.
    from backend.run_evaluation import evaluate_run

    with _ProgressBar("eval", "img", args.json) as bar:
        evaluation = evaluate_run(
            args.model,
            args.data,
            args.split,
            imgsz=args.imgsz,
            batch=args.batch,
            conf=args.conf,
            device=args.device,
            out=args.output,
            on_progress=bar,
        )
    _print(evaluation.result.to_dict(), args.json, evaluation.text())


def cmd_quantize(args: argparse.Namespace) -> None:
    # Imported per command: `yolodex --help` and the light commands start without torch.
    from backend.quantization.pipeline import quantize_run

    report = quantize_run(args.run, args.out, _quantize_options(args), on_event=_quantize_progress(args))
    _print(report, args.json, _quantize_text(report))


def _quantize_options(args: argparse.Namespace) -> QuantizeOptions:
    # Imported per command: `yolodex --help` and the light commands start without torch.
    from backend.quantization.pipeline import QuantizeOptions

    return QuantizeOptions(
        method=args.method,
        calibration=args.calibration,
        calib_images=args.calib,
        budget=args.budget,
        compare_calibrations=not args.no_compare,
        scan_images=args.scan_images,
        qat_epochs=args.qat_epochs,
        threads=args.threads,
        data=str(args.data) if args.data else None,
        imgsz=args.imgsz,
        openvino_ir=args.format == "openvino",
    )


def _quantize_progress(args: argparse.Namespace) -> Callable[..., None]:
    """The stages, the scan's progress, the policy and QAT's epochs on stderr (nothing with --json or --quiet)."""

    def progress(name: str, **data: Any) -> None:
        if args.json or args.quiet:
            return
        if name == "stage":
            print(f"[{data['stage']}] {data.get('calibration', '')}".rstrip(), file=sys.stderr, flush=True)
        elif name == "scan" and (data["done"] % 10 == 0 or data["done"] == data["total"]):
            print(f"  sensitivity scan {data['done']}/{data['total']}", file=sys.stderr, flush=True)
        elif name == "policy":
            print(
                f"  {data['float_layers']} layers in float: mAP50-95 {data['map']:.4f} (FP32 {data['fp32_map']:.4f})",
                file=sys.stderr,
                flush=True,
            )
        elif name == "epoch":
            print(f"  QAT epoch {data['epoch'] + 1}: {data.get('val') or ''}", file=sys.stderr, flush=True)

    return progress


def _quantize_text(report: dict[str, Any]) -> str:
    """The report as a table: one row per model, then each measured runtime, the fallbacks and the files."""
    # Imported per command: `yolodex --help` and the light commands start without torch.
    from backend.runtimes import runtime_label

    lines = [
        f"{report['run']}: method {report['method']}, chosen {report['chosen']} "
        f"({'within' if report['within_budget'] else 'NOT within' if report['within_budget'] is False else 'no'} "
        f"budget of {report['budget_points']} point), {report['threads']} threads, "
        f"shipped for {report['runtime_label']}",
        f"  {'model':15s} {'mAP50-95':>8s} {'delta':>8s} {'p50 ms':>8s} {'p95 ms':>8s} {'b8 img/s':>9s} {'MB':>6s} "
        f"{'agree':>6s}  float layers",
    ]
    for name, row in report["models"].items():
        deltas = row.get("deltas", {})
        agreement = row.get("agreement", {}).get("mean_agreement")
        lines.append(
            f"  {name:15s} {_fmt(row.get('metrics', {}).get('mAP50-95')):>8s} "
            f"{_fmt(deltas.get('metrics', {}).get('mAP50-95')):>8s} {row['latency_ms_p50']:8.1f} "
            f"{row['latency_ms_p95']:8.1f} {row['throughput_b8_images_per_s']:9.1f} {row['bytes'] / 1e6:6.1f} "
            f"{_fmt(agreement, 2):>6s}  {len(row.get('float_layers', [])) if name != 'fp32' else '-'}"
        )
    for runtime in report["runtimes"]:
        on = {name: row["runtimes"][runtime] for name, row in report["models"].items()}
        lines.append(
            f"  {runtime_label(runtime)}: "
            + ", ".join(
                f"{name} mAP50-95 {_fmt(item.get('mAP50-95'))} p50 {item['latency_ms_p50']:.1f} ms"
                for name, item in on.items()
            )
        )
    for fallback in report["models"][report["chosen"]].get("float_fallbacks", []):
        lines.append(f"  ran in float (no int8 kernel here): {fallback['node']} ({fallback['kernel']})")
    lines += [f"  not measured: {item}" for item in report["not_measured"]]
    lines.append(f"  INT8 model: {report['model_int8']}")
    if report.get("model_int8_openvino"):
        lines.append(f"  OpenVINO IR: {report['model_int8_openvino']}")
    return "\n".join(lines)


def cmd_import(args: argparse.Namespace) -> None:
    # Imported per command: `yolodex --help` and the light commands start without torch.
    from backend.ingest.service import import_into

    with _ProgressBar("import", "file", args.json) as bar:
        report = import_into(args.paths, args.project, on_progress=bar)
    keys = ("accepted", "duplicates", "near_duplicates", "rejected", "skipped", "annotations")
    counts = {key: len(report[key]) if isinstance(report[key], list) else report[key] for key in keys if key in report}
    lines = [f"{report['project']}: " + ", ".join(f"{value} {key.replace('_', ' ')}" for key, value in counts.items())]
    lines += [f"  rejected {item['name']}: {item['reason']}" for item in report.get("rejected", [])[:20]]
    lines += [f"  skipped {item['name']}: {item['reason']}" for item in report.get("skipped", [])[:20]]
    _print(report, args.json, "\n".join(lines))


def cmd_crawl(args: argparse.Namespace) -> None:
    # Imported per command: `yolodex --help` and the light commands start without torch.
    from backend.ingest.crawl import CrawlSettings
    from backend.ingest.service import crawl_into

    urls = None
    if args.urls:
        urls = [
            line.strip() for line in args.urls.read_text().splitlines() if line.strip() and not line.startswith("#")
        ]
    settings = CrawlSettings(allow_private_addresses=args.allow_private)
    unit = "hit" if args.query is not None else "url" if urls is not None else "page"
    with _ProgressBar("crawl", unit, args.json) as bar:
        report = crawl_into(
            project=args.project,
            query=args.query,
            limit=args.limit,
            urls=urls,
            page=args.page,
            depth=args.depth,
            crawl_settings=settings,
            on_progress=bar,
        )
    text = (
        f"{report['project']}: kept {report['kept']} of {report['fetched']} fetched, stored {report['stored']}, "
        f"{len(report['skipped'])} skipped, {len(report['rejected'])} rejected, {report['pages_visited']} pages"
    )
    _print(report, args.json, text)


def cmd_dataset(args: argparse.Namespace) -> None:
    # Imported per command: `yolodex --help` and the light commands start without torch.
    from backend.ingest import service

    if args.action == "freeze":
        fractions = (1.0 - args.val - args.test, args.val) + ((args.test,) if args.test else ())
        report = service.freeze(args.project, args.name, fractions, args.seed)
        text = f"{report['project']} / {report['version']}: {report['folder']} {report['counts']}"
    elif args.action == "export":
        report = service.export(args.project, args.name, args.format, args.out)
        text = f"{report['project']} / {report['version']} as {report['format']}: {report['path']}"
    elif args.action == "stats":
        report = service.stats(args.project, args.name)
        text = json.dumps(report, indent=2)
    else:
        report = service.starter()
        text = f"{report['project']}: {'created' if report['created'] else 'already there'}"
    _print(report, args.json, text)


def cmd_project(args: argparse.Namespace) -> None:
    # Imported per command: `yolodex --help` and the light commands start without torch.
    from backend.ingest import service

    names = [name.strip() for name in (args.classes or "").split(",") if name.strip()]
    report = service.create_project(args.name, names)
    _print(report, args.json, report["summary"])


def cmd_classes(args: argparse.Namespace) -> None:
    # Imported per command: `yolodex --help` and the light commands start without torch.
    from backend.ingest import service
    from backend.store.classes import KEEP

    if args.action == "list":
        report = service.list_classes(args.project)
        lines = [f"{report['project']}: {len(report['classes'])} classes"]
        for row in report["classes"]:
            number = "-" if row["dex_number"] is None else row["dex_number"]
            described = f": {row['description']}" if row["description"] else ""
            lines.append(
                f"  {row['index']}: {row['name']} (dex #{number}, colour {row['colour'] or 'default'}, "
                f"{row['boxes']} boxes){described}"
            )
        _print(report, args.json, "\n".join(lines))
        return
    if args.action == "add":
        report = service.add_class(
            args.project, args.name, dex_number=args.dex_number, description=args.description or "", colour=args.colour
        )
    elif args.action == "rename":
        report = service.rename_class(args.project, args.name, args.new_name)
    elif args.action == "describe":
        given = {key: getattr(args, key) for key in ("dex_number", "description", "colour")}
        if all(value is None for value in given.values()):
            raise ValueError("describe needs --dex-number, --description or --colour (an empty value clears it)")
        changes = {key: KEEP if value is None else value for key, value in given.items()}
        report = service.describe_class(args.project, args.name, **changes)
    else:
        report = service.remove_class(args.project, args.name)
    _print(report, args.json, report["summary"])


def cmd_labelstudio(args: argparse.Namespace) -> int:
    # Imported per command: `yolodex --help` and the light commands start without torch.
    from backend.labeling import server

    flags = [
        flag
        for flag, on in (("--no-wait", args.no_wait), ("--quiet", args.quiet), ("--foreground", args.foreground))
        if on
    ]
    return server.main([args.action, *flags])


def cmd_label(args: argparse.Namespace) -> None:
    # Imported per command: `yolodex --help` and the light commands start without torch.
    from backend.labeling import service

    if args.action == "sync":
        report = service.sync(args.project)
        text = f"{report['summary']}\nopen {report['url']}"
    elif args.action == "pull":
        report = service.pull(args.project)
        text = report["summary"] + "".join(f"\n  {line}" for line in report["details"][:20])
    elif args.action == "prelabel":
        if not args.model:
            raise ValueError("prelabel needs --model: a run folder, a checkpoint or a yolodex ONNX file")
        report = service.prelabel(args.model, args.project, only_unlabeled=not args.all, imgsz=args.imgsz)
        text = report["summary"]
    elif args.action == "queue":
        report = service.queue(args.project, args.limit)
        lines = [
            f"{'-' if item['uncertainty'] is None else format(item['uncertainty'], '.3f'):>6}  {item['url']}"
            for item in report["items"]
        ]
        text = "uncertainty  task (most uncertain first)\n" + "\n".join(lines) if lines else "nothing left to label"
    else:
        changes = {key: value for key, value in (("epochs", args.epochs), ("imgsz", args.imgsz)) if value is not None}
        report = service.loop(args.project, retrain_every=args.every, **changes)
        text = json.dumps(report, indent=2)
    _print(report, args.json, text)


def _fmt(value: float | None, digits: int = 4) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _add_model_commands(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """`info`, `export`, `predict` and `download`: a model's size, its ONNX file, its detections and its weights."""
    info = commands.add_parser("info", help="parameters and GFLOPs of a model size, or of a weights file")
    info.add_argument("--size", choices=SIZES)
    info.add_argument("--num-classes", type=int)
    info.add_argument("--weights", type=Path, help="load this file strictly and say what was loaded")
    info.add_argument("--imgsz", type=int, default=640)
    info.add_argument("--json", action="store_true")
    info.set_defaults(handler=cmd_info)

    export = commands.add_parser("export", help="fused model with decoding (and optionally NMS) to ONNX")
    export.add_argument("--size", choices=SIZES)
    export.add_argument("--num-classes", type=int, help="only without --weights")
    export.add_argument("--weights", type=Path)
    export.add_argument("--imgsz", type=int, default=640)
    export.add_argument("--nms", action="store_true", help="NonMaxSuppression inside the graph")
    export.add_argument("--conf", type=float, default=0.25)
    export.add_argument("--iou", type=float, default=0.7)
    export.add_argument("--top-k", type=int, default=1000)
    export.add_argument("--max-det", type=int, default=300)
    export.add_argument("-o", "--output", type=Path, required=True)
    export.add_argument("--json", action="store_true")
    export.set_defaults(handler=cmd_export)

    predict = commands.add_parser("predict", help="detections in original-image pixels")
    predict.add_argument("model", type=Path, help="a checkpoint (.pt/.pth) or an ONNX file")
    predict.add_argument("images", type=Path, nargs="+")
    predict.add_argument("--imgsz", type=int, help="input side for checkpoints (default: the checkpoint's, or 640)")
    predict.add_argument("--conf", type=float, default=0.25)
    predict.add_argument("--iou", type=float, default=0.7)
    predict.add_argument("--max-det", type=int, default=300)
    predict.add_argument(
        "--runtime",
        choices=("auto", "onnxruntime", "openvino"),
        default="auto",
        help="for ONNX files: auto = OpenVINO where it runs, else onnxruntime (docs/runtimes.md)",
    )
    predict.add_argument("--json", action="store_true")
    predict.set_defaults(handler=cmd_predict)

    download = commands.add_parser("download", help="official COCO weights into storage/weights (non-commercial)")
    download.add_argument("--size", choices=SIZES, default="s")
    download.add_argument("--url", help="another address for the same file")
    download.add_argument("--sha256")
    download.add_argument("--json", action="store_true")
    download.set_defaults(handler=cmd_download)


def _add_train(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """`train`: a new run, or more of an earlier one (`--resume`)."""
    train = commands.add_parser("train", help="train YOLO-NAS on a dataset folder, or resume a run")
    train.add_argument("--data", type=Path, help="COCO folder (images/, train.json, val.json), YOLO folder, or json")
    train.add_argument("--size", choices=SIZES, default="s")
    train.add_argument("--imgsz", type=int, default=640)
    train.add_argument("--epochs", type=int, help="default 100; on --resume: this many MORE epochs")
    train.add_argument("--time", type=float, help="budget in minutes from the first step; on --resume: MORE minutes")
    train.add_argument("--batch", type=int, default=16, help="images per step, over all processes (--gpus/--nproc)")
    train.add_argument("--weights", help="'coco' (official, non-commercial licence), or an earlier run/checkpoint")
    train.add_argument("--lr", type=float, help="peak lr (default: 5e-4 S, 4e-4 M/L; x2 from scratch)")
    train.add_argument("--patience", type=int, help="early stop after this many epochs without a better mAP (30)")
    train.add_argument("--min-samples", type=int, default=512, help="samples per epoch at least (resampling)")
    train.add_argument("--device", choices=["auto", "cpu", "cuda"], help="default auto")
    train.add_argument("--workers", type=int, help="data-loading processes (default: from the core count)")
    train.add_argument("--no-amp", action="store_true", help="train in float32 (no fp16/bf16 mixed precision)")
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--compile", action="store_true", help="torch.compile the model (kernels cached in storage/)")
    train.add_argument("--close-mosaic", type=float, help="the last fraction of the run trains without mosaic")
    train.add_argument(
        "--augment",
        type=Path,
        metavar="FILE",
        help="augmentation pipeline, JSON or YAML in albumentations' A.to_dict form (default: the recipe's)",
    )
    train.add_argument("--gpus", type=int, help="train on N GPUs (DDP, one process each; torchrun)")
    train.add_argument("--nproc", type=int, help="N processes on --device (DDP; gloo on a CPU, for testing)")
    train.add_argument("--checkpoint-minutes", type=float, help="also save last.pt mid-epoch this often (5)")
    train.add_argument("--out", type=Path, help="run folder (default: storage/runs/<size>-<time>)")
    train.add_argument(
        "--resume",
        type=Path,
        metavar="RUN_DIR",
        help="continue this run where it stopped; with --time/--epochs, train it that much longer",
    )
    train.add_argument(
        "--measure-speed",
        action="store_true",
        help="time a few training steps first when no earlier run gives the time per epoch",
    )
    train.add_argument("--quiet", action="store_true", help="no progress output")
    train.add_argument("--json", action="store_true")
    train.set_defaults(handler=cmd_train)


def _add_evaluate_and_quantize(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """`eval` and `quantize`: what a run's model is worth, and its INT8 copy."""
    evaluate = commands.add_parser("eval", help="COCO mAP of a run or checkpoint on a dataset split")
    evaluate.add_argument("model", type=Path, help="a run folder (its best.pt) or a checkpoint")
    evaluate.add_argument("--data", type=Path, required=True)
    evaluate.add_argument("--split", default="val")
    evaluate.add_argument("--imgsz", type=int, help="default: the checkpoint's")
    evaluate.add_argument("--batch", type=int, default=16)
    evaluate.add_argument("--conf", type=float, default=0.25, help="score threshold of the confusion matrix/errors")
    evaluate.add_argument("--device", default="auto")
    evaluate.add_argument("--output", type=Path, help="also write the evaluation JSON here")
    evaluate.add_argument("--json", action="store_true")
    evaluate.set_defaults(handler=cmd_eval)

    quantize = commands.add_parser("quantize", help="INT8 (onnxruntime PTQ) of a run, with a FP32-vs-INT8 report")
    quantize.add_argument("run", type=Path, help="a training run folder")
    quantize.add_argument(
        "--method",
        choices=["auto", "ptq", "qat"],
        default="auto",
        help="auto: selective PTQ, then QAT only if it misses the budget",
    )
    quantize.add_argument("--calib", type=int, default=64, help="calibration images from the training split")
    quantize.add_argument("--calibration", choices=["percentile", "minmax", "entropy"], default="percentile")
    quantize.add_argument("--budget", type=float, default=0.5, help="largest mAP50-95 drop, in points")
    quantize.add_argument("--no-compare", action="store_true", help="calibrate with --calibration only")
    quantize.add_argument("--scan-images", type=int, default=16, help="validation images of the sensitivity scan")
    quantize.add_argument("--qat-epochs", type=int, help="QAT epochs (default: a tenth of the run's)")
    quantize.add_argument("--data", type=Path, help="the run's dataset, if it moved")
    quantize.add_argument("--imgsz", type=int, help="input size to quantize and measure at (default: the run's)")
    quantize.add_argument("--threads", type=int, default=2, help="runtime threads for evaluation and latency")
    quantize.add_argument("--out", type=Path, help="output folder (default: the run folder)")
    quantize.add_argument(
        "--format",
        choices=["onnx", "openvino"],
        default="onnx",
        help="openvino: also write the INT8 model as OpenVINO IR (model_int8.xml/.bin)",
    )
    quantize.add_argument("--quiet", action="store_true")
    quantize.add_argument("--json", action="store_true")
    quantize.set_defaults(handler=cmd_quantize)


def _add_data_commands(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """`import`, `crawl` and `dataset`: images into a project, and its frozen versions."""
    ingest = commands.add_parser("import", help="import images, folders, zips or labeled COCO/YOLO sets into a project")
    ingest.add_argument("paths", nargs="+", type=Path)
    ingest.add_argument("--project", default="My Pokédex")
    ingest.add_argument("--json", action="store_true")
    ingest.set_defaults(handler=cmd_import)

    crawl = commands.add_parser("crawl", help="crawl images from a search, a URL list or a page into a project")
    source = crawl.add_mutually_exclusive_group(required=True)
    source.add_argument("--query", help="keyword image search (DuckDuckGo)")
    source.add_argument("--urls", type=Path, help="a file with one image URL per line")
    source.add_argument("--page", help="a web page whose images (and same-site pages, to --depth) are taken")
    crawl.add_argument("--limit", type=int, default=50, help="images to keep from a search")
    crawl.add_argument("--depth", type=int, default=1, help="same-site link depth for --page")
    crawl.add_argument("--project", default="My Pokédex")
    crawl.add_argument("--allow-private", action="store_true", help="allow private/loopback addresses (SSRF guard off)")
    crawl.add_argument("--json", action="store_true")
    crawl.set_defaults(handler=cmd_crawl)

    dataset = commands.add_parser("dataset", help="freeze, export and describe dataset versions")
    dataset.add_argument("action", choices=["freeze", "export", "stats", "starter"])
    dataset.add_argument("--project", default="My Pokédex")
    dataset.add_argument("--name", help="the version (freeze: its new name; export/stats: which one)")
    dataset.add_argument("--val", type=float, default=0.2, help="validation fraction (freeze)")
    dataset.add_argument("--test", type=float, default=0.0, help="test fraction (freeze)")
    dataset.add_argument("--seed", type=int, default=0)
    dataset.add_argument("--format", choices=["coco", "yolo"], default="coco")
    dataset.add_argument("--out", type=Path, help="export folder")
    dataset.add_argument("--json", action="store_true")
    dataset.set_defaults(handler=cmd_dataset)


def _add_project_commands(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """`project` and `classes`: a project and the classes it detects."""
    project = commands.add_parser("project", help="create a project with its classes")
    project.add_argument("action", choices=["create"])
    project.add_argument("name", help="the new project's name")
    project.add_argument("--classes", required=True, help="its classes, comma-separated (at least one): 'Raccoon,Fox'")
    project.add_argument("--json", action="store_true")
    project.set_defaults(handler=cmd_project)

    classes = commands.add_parser("classes", help="list, add, rename, describe (dex entry, colour) or remove classes")
    class_actions = classes.add_subparsers(dest="action", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--project", required=True)
    common.add_argument("--json", action="store_true")
    entry = argparse.ArgumentParser(add_help=False)
    entry.add_argument("--dex-number", help="the Pokédex number, 0 or more ('' clears it)")
    entry.add_argument("--description", help="the dex entry's text ('' clears it)")
    entry.add_argument("--colour", "--color", dest="colour", help="box colour #rrggbb ('' for the default)")
    class_actions.add_parser("list", parents=[common], help="the classes with their dex entries and box counts")
    class_actions.add_parser("add", parents=[common, entry], help="add a class").add_argument("name")
    rename = class_actions.add_parser("rename", parents=[common], help="rename a class (its boxes stay)")
    rename.add_argument("name")
    rename.add_argument("new_name")
    describe = class_actions.add_parser("describe", parents=[common, entry], help="set dex number, description, colour")
    describe.add_argument("name")
    class_actions.add_parser("remove", parents=[common], help="remove a class no box uses").add_argument("name")
    classes.set_defaults(handler=cmd_classes)


def _add_labeling_commands(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """`labelstudio` and `label`: the Label Studio server, and the labeling loop on it."""
    labelstudio = commands.add_parser("labelstudio", help="start, stop or check yolodex's Label Studio server")
    labelstudio.add_argument("action", choices=["start", "stop", "status", "repair"])
    labelstudio.add_argument("--no-wait", action="store_true", help="start: return once the server is spawned")
    labelstudio.add_argument("--quiet", action="store_true", help="status: print nothing, exit 0 only when running")
    labelstudio.add_argument(
        "--foreground", action="store_true", help="start: run the server in this process until it stops (containers)"
    )
    labelstudio.set_defaults(handler=cmd_labelstudio)

    label = commands.add_parser("label", help="sync a project to Label Studio, pull its labels, pre-label, the loop")
    label.add_argument("action", choices=["sync", "pull", "prelabel", "queue", "loop"])
    label.add_argument("--project", default="My Pokédex")
    label.add_argument("--model", help="prelabel: a run folder, checkpoint or yolodex ONNX file")
    label.add_argument("--all", action="store_true", help="prelabel: labeled tasks too")
    label.add_argument("--imgsz", type=int, help="prelabel: input size of a checkpoint; loop: training size")
    label.add_argument("--limit", type=int, default=20, help="queue: how many tasks")
    label.add_argument("--every", type=int, help="loop: retrain after this many new annotations (0: off)")
    label.add_argument("--epochs", type=int, help="loop: epochs per retrain")
    label.add_argument("--json", action="store_true")
    label.set_defaults(handler=cmd_label)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="yolodex", description="Build your own object detector with YOLO-NAS.")
    commands = parser.add_subparsers(dest="command", required=True)
    _add_model_commands(commands)
    _add_train(commands)
    _add_evaluate_and_quantize(commands)
    _add_data_commands(commands)
    _add_project_commands(commands)
    _add_labeling_commands(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    try:
        status = args.handler(args)
    except EXPECTED_ERRORS as error:
        print(f"yolodex: error: {error}", file=sys.stderr)
        return 1
    except OperationalError as error:
        if not database_locked(error) and not disk_full(error):
            raise
        print(f"yolodex: error: {BUSY_ADVICE if database_locked(error) else describe_error(error)}", file=sys.stderr)
        return 1
    except Exception as error:  # a full disk (store.db.DiskFullError, ENOSPC) is one line; anything else a bug
        if not disk_full(error):
            raise
        print(f"yolodex: error: {describe_error(error)}", file=sys.stderr)
        return 1
    return status if isinstance(status, int) else 0


if __name__ == "__main__":
    sys.exit(main())
