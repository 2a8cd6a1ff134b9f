"""The `yolodex` command: one sub-command per step, each a thin call into the backend modules.

Exit status 0 on success, 1 on a failure with one clear line on stderr (`yolodex: error: ...`), 2 on bad usage.
`--json` prints machine-readable output on stdout.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from backend.models.checkpoints import CheckpointError
from backend.models.download import WeightsDownloadError
from backend.processing import ImageLoadError

EXPECTED_ERRORS = (CheckpointError, WeightsDownloadError, ImageLoadError, FileNotFoundError, ValueError)


def _print(payload: dict | list, as_json: bool, text: str) -> None:
    print(json.dumps(payload, indent=2) if as_json else text)


def cmd_info(args: argparse.Namespace) -> None:
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
    from backend.inference import Predictor
    from backend.processing import PostprocessConfig

    postprocess = PostprocessConfig(conf_threshold=args.conf, iou_threshold=args.iou, max_detections=args.max_det)
    predictor = Predictor.from_path(args.model, imgsz=args.imgsz, postprocess=postprocess)
    results = []
    lines = []
    for image in args.images:  # one at a time: images of different sizes, and one bad file names itself
        detections = predictor.predict([image])[0]
        results.append({"image": str(image), "detections": detections.to_dict(predictor.class_names)})
        lines.append(f"{image}: {len(detections)} detections")
        for found in results[-1]["detections"]:
            box = ", ".join(f"{value:.1f}" for value in found["box"])
            lines.append(f"  {found['class_name']} {found['score']:.3f} [{box}]")
    _print(results, args.json, "\n".join(lines))


def cmd_download(args: argparse.Namespace) -> None:
    from backend.models.download import OFFICIAL_COCO_WEIGHTS, WeightsSource, fetch_weights
    from backend.settings import get_settings

    source = OFFICIAL_COCO_WEIGHTS[args.size]
    if args.url:
        source = WeightsSource(source.name, args.url, args.sha256, source.licence)
    path = fetch_weights(source, get_settings().weights_dir, progress=not args.json)
    _print({"path": str(path), "licence": source.licence}, args.json, f"{path}\n{source.licence}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="yolodex", description="Build your own object detector with YOLO-NAS.")
    commands = parser.add_subparsers(dest="command", required=True)
    sizes = ["s", "m", "l"]

    info = commands.add_parser("info", help="parameters and GFLOPs of a model size, or of a weights file")
    info.add_argument("--size", choices=sizes)
    info.add_argument("--num-classes", type=int)
    info.add_argument("--weights", type=Path, help="load this file strictly and say what was loaded")
    info.add_argument("--imgsz", type=int, default=640)
    info.add_argument("--json", action="store_true")
    info.set_defaults(handler=cmd_info)

    export = commands.add_parser("export", help="fused model with decoding (and optionally NMS) to ONNX")
    export.add_argument("--size", choices=sizes)
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
    predict.add_argument("--json", action="store_true")
    predict.set_defaults(handler=cmd_predict)

    download = commands.add_parser("download", help="official COCO weights into storage/weights (non-commercial)")
    download.add_argument("--size", choices=sizes, default="s")
    download.add_argument("--url", help="another address for the same file")
    download.add_argument("--sha256")
    download.add_argument("--json", action="store_true")
    download.set_defaults(handler=cmd_download)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    try:
        args.handler(args)
    except EXPECTED_ERRORS as error:
        print(f"yolodex: error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
