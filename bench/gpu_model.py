"""YOLO-NAS on a CUDA GPU: correctness under AMP/channels_last and latency, measured side by side in one run.

Prints, for each size: fused-vs-unfused and AMP-vs-FP32 output differences (boxes in px, scores), then median
latency of unfused FP32, fused FP32, fused FP16 autocast and fused FP16 autocast + channels_last, and the ratios
between them. With --reference DIR (../shared/reference), also the official-output parity on the GPU.
Without CUDA it says so and exits 0 (CI machines have no GPU).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from backend.models import build_model, decode_predictions, load_model


def median_ms(fn, runs: int, warmup: int = 5) -> float:
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def reference_parity(reference: Path) -> dict:
    import numpy as np
    from PIL import Image

    expected = np.load(reference / "yolo_nas_s_expected_320.npz")
    rgb = np.asarray(Image.open(reference / "input_320.png").convert("RGB"), dtype=np.float32) / 255.0
    images = torch.from_numpy(rgb).permute(2, 0, 1)[None].cuda()
    model, _ = load_model(reference / "yolo_nas_s_random_fp16.pth")
    model = model.cuda().eval()
    result = {}
    with torch.no_grad():
        for form in ("none", "partial", "full"):
            if form != "none":
                model.fuse(full=form == "full")
            boxes, scores = model.predict_boxes(images)
            result[form] = {
                "max_box_px": float(np.abs(boxes.cpu().numpy() - expected["boxes"]).max()),
                "max_score": float(np.abs(scores.cpu().numpy() - expected["scores"]).max()),
            }
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--sizes", nargs="+", default=["s", "m", "l"])
    parser.add_argument("--imgsz", type=int, default=640)
    parser.add_argument("--batch", nargs="+", type=int, default=[1, 16])
    parser.add_argument("--runs", type=int, default=50)
    parser.add_argument("--reference", type=Path)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("gpu_model: no CUDA device here, skipped")
        return 0
    torch.backends.cudnn.benchmark = True
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}, imgsz {args.imgsz}")
    results: dict = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": []}
    if args.reference:
        results["reference_parity"] = reference_parity(args.reference)
        print("official-output parity on GPU:", json.dumps(results["reference_parity"]))
    for size in args.sizes:
        torch.manual_seed(0)
        model = build_model(size).cuda().eval()
        for batch in args.batch:
            images = torch.rand(batch, 3, args.imgsz, args.imgsz, device="cuda")
            with torch.no_grad():
                unfused = model.predict_boxes(images)
                t_unfused = median_ms(lambda: model(images), args.runs)  # noqa: B023
                fused = build_model(size).cuda().eval()
                fused.load_state_dict(model.state_dict())
                fused.fuse(full=True)
                fused_out = fused.predict_boxes(images)
                t_fused = median_ms(lambda: fused(images), args.runs)  # noqa: B023
                with torch.autocast("cuda", dtype=torch.float16):
                    cls_logits, reg = fused(images)
                    amp_out = decode_predictions(cls_logits.float(), reg.float(), (args.imgsz,) * 2, fused.strides)
                    t_amp = median_ms(lambda: fused(images), args.runs)  # noqa: B023
                fused_cl = fused.to(memory_format=torch.channels_last)
                images_cl = images.contiguous(memory_format=torch.channels_last)
                with torch.autocast("cuda", dtype=torch.float16):
                    t_amp_cl = median_ms(lambda: fused_cl(images_cl), args.runs)  # noqa: B023
            row = {
                "size": size,
                "batch": batch,
                "fuse_max_box_px": float((fused_out[0] - unfused[0]).abs().max()),
                "fuse_max_score": float((fused_out[1] - unfused[1]).abs().max()),
                "amp_max_box_px": float((amp_out[0] - unfused[0]).abs().max()),
                "amp_max_score": float((amp_out[1] - unfused[1]).abs().max()),
                "amp_finite": bool(torch.isfinite(amp_out[0]).all() and torch.isfinite(amp_out[1]).all()),
                "ms_unfused_fp32": round(t_unfused, 3),
                "ms_fused_fp32": round(t_fused, 3),
                "ms_fused_fp16": round(t_amp, 3),
                "ms_fused_fp16_channels_last": round(t_amp_cl, 3),
            }
            row["speedup_fuse"] = round(t_unfused / t_fused, 2)
            row["speedup_fp16"] = round(t_fused / t_amp, 2)
            row["speedup_fp16_cl"] = round(t_fused / t_amp_cl, 2)
            results["rows"].append(row)
            print(json.dumps(row))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
