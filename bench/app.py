"""Pokédex speed: from the upload of a 4000x3000 photo to the rendered result, YOLO-NAS S INT8 at 640, this CPU.

The target is at most 2 s. The model is YOLO-NAS S with random weights (latency does not depend on their
values), with its class biases zeroed and class weights widened so that it does find boxes: drawing and the entry
cards then cost what they cost on a real photo. It is exported to FP32 ONNX (backend/export) and quantized to INT8
by static PTQ (backend.quantization.ptq.quantize_onnx, a few synthetic calibration images), as `yolodex quantize`
does.

Measured, side by side in one run:
  (a) the backend path, the Pokédex's `backend.pokedex.detect` (reduced-scale JPEG decode, model, drawing on a
      display copy) plus the JPEG encoding of the display image, against a naive path that decodes the full photo,
      runs the same predictor and draws and encodes at full size: median ms and the ratio;
  (b) the real page, pages/pokedex.py under AppTest: time around `AppTest.run()` after setting the uploader to a new
      photo (the model already loaded, as when the user has the page open), then the same with the FP32/INT8
      comparison on. AppTest runs the whole script (widgets, caches, the media file store) but not the browser, the
      websocket or the HTTP upload of the file (about 4 MB over the local network).
The server's memory with several browser sessions needs a browser and is not measured here.

    .venv/bin/python bench/app.py [--runs 5] [--imgsz 640] [--keep DIR]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np
import torch
from onnxruntime.quantization import CalibrationDataReader
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from backend.export.onnx_export import export_onnx  # noqa: E402
from backend.inference import Predictor  # noqa: E402
from backend.models import build_model  # noqa: E402
from backend.pokedex import detect, draw_detections, encode_display, palette_colour  # noqa: E402
from backend.processing import load_image, preprocess  # noqa: E402
from backend.quantization.ptq import quantize_onnx  # noqa: E402

PAGE = ROOT / "pages" / "pokedex.py"
CLASS_NAMES = ["bulbasaur", "charmander", "squirtle", "pikachu", "eevee"]
PHOTO_SIZE = (4000, 3000)  # (W, H), a phone's 12 MP photo
CALIBRATION_IMAGES = 4
TARGET_S = 2.0
CANDIDATES = 60


def photo_jpeg(seed: int, orientation: int | None = None) -> bytes:
    """A 4000x3000 photo-like JPEG (smooth colour regions plus sensor-like noise, quality 90: ~3-4 MB)."""
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 256, (12, 16, 3)).astype(np.uint8)
    pixels = cv2.resize(coarse, PHOTO_SIZE, interpolation=cv2.INTER_CUBIC).astype(np.int16)
    pixels += rng.normal(0, 6, (PHOTO_SIZE[1], PHOTO_SIZE[0], 1)).astype(np.int16)
    image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
    options = {"quality": 90}
    if orientation is not None:
        exif = Image.Exif()
        exif[0x0112] = orientation
        options["exif"] = exif.tobytes()
        image = image.transpose(Image.Transpose.ROTATE_90)  # stored turned, so that orientation 6 shows it upright
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", **options)
    return buffer.getvalue()


class Calibration(CalibrationDataReader):
    def __init__(self, batches: list[np.ndarray]):
        self.batches = iter(batches)

    def get_next(self) -> dict | None:
        batch = next(self.batches, None)
        return None if batch is None else {"images": batch}


def build_models(folder: Path, imgsz: int) -> tuple[Path, Path]:
    """model_fp32.onnx and model_int8.onnx of a random YOLO-NAS S that finds boxes, in a run folder `folder`."""
    fp32, int8 = folder / "model_fp32.onnx", folder / "model_int8.onnx"
    if fp32.is_file() and int8.is_file():
        return fp32, int8
    torch.manual_seed(0)
    model = build_model("s", len(CLASS_NAMES)).eval()
    heads = (model.heads.head1, model.heads.head2, model.heads.head3)
    with torch.no_grad():
        # A fresh head scores everything at the class prior (~0.01): nothing to draw. Wider class weights spread
        # the scores, a DFL bias towards short distances gives boxes of a plausible size, and a class bias shifted
        # so that CANDIDATES (anchor, class) pairs of a photo pass 0.25 gives a photo's worth of boxes after NMS.
        for head in heads:
            head.cls_pred.weight.normal_(0.0, 0.5)
            head.cls_pred.bias.zero_()
            head.reg_pred.bias.copy_((-0.3 * torch.arange(17.0)).repeat(4))
        batch, _ = preprocess([load_image(photo_jpeg(99))], (imgsz, imgsz))
        _, scores = model.predict_boxes(torch.from_numpy(batch))  # (1, A, C) sigmoid
        logits = torch.logit(scores.flatten().double(), eps=1e-12)
        shift = float(torch.logit(torch.tensor(0.25)) - logits.topk(CANDIDATES).values[-1])
        for head in heads:
            head.cls_pred.bias.fill_(shift)
    start = time.perf_counter()
    export_onnx(model, fp32, imgsz=imgsz, class_names=CLASS_NAMES, run_id=folder.name)
    print(f"exported FP32 in {time.perf_counter() - start:.1f} s", flush=True)
    small = [cv2.resize(load_image(photo_jpeg(100 + seed)), (800, 600)) for seed in range(CALIBRATION_IMAGES)]
    batches = [preprocess([pixels], (imgsz, imgsz))[0] for pixels in small]
    start = time.perf_counter()
    quantize_onnx(fp32, int8, Calibration(batches))
    print(f"quantized INT8 (static PTQ, {CALIBRATION_IMAGES} images) in {time.perf_counter() - start:.1f} s")
    (folder / "config.json").write_text(
        json.dumps({"train": {"size": "s", "imgsz": imgsz}, "class_names": CLASS_NAMES})
    )
    return fp32, int8


def naive_path(predictor: Predictor, data: bytes, conf: float) -> bytes:
    """What the page would do without reduced decoding and a display copy: full-size decode, draw and encode."""
    pixels = load_image(data)
    found = predictor.predict([pixels])[0]
    keep = found.scores > conf
    image = Image.fromarray(pixels)
    labels = [f"{CLASS_NAMES[c]} {s:.2f}" for c, s in zip(found.class_ids[keep], found.scores[keep])]
    draw_detections(image, found.boxes[keep], labels, [palette_colour(int(c)) for c in found.class_ids[keep]])
    return encode_display(image)


def pokedex_path(predictor: Predictor, data: bytes, conf: float) -> tuple[bytes, dict[str, float], int]:
    start = time.perf_counter()
    result = detect(predictor, data, conf)
    encode_start = time.perf_counter()
    encoded = encode_display(result.display)
    timings = {**result.timings, "encode_ms": (time.perf_counter() - encode_start) * 1e3}
    timings["total_ms"] = (time.perf_counter() - start) * 1e3
    return encoded, timings, len(result)


def median_ms(samples: list[float]) -> str:
    return f"{statistics.median(samples):8.0f}"


def bench_backend(predictor: Predictor, photos: dict[str, bytes], conf: float, runs: int) -> None:
    print(f"\n(a) backend path, {predictor.input_size[0]} px INT8, conf {conf}: median of {runs} runs, ms")
    header = (
        "photo",
        "decode",
        "model run",
        "pre/post",
        "draw",
        "encode",
        "pokedex total",
        "naive total",
        "naive/pokedex",
    )
    print(f"{header[0]:<38}" + "".join(f"{name:>14}" for name in header[1:]))
    for name, data in photos.items():
        pokedex_path(predictor, data, conf)  # warm-up
        ours: list[dict[str, float]] = []
        naive: list[float] = []
        for _ in range(runs):  # alternate, so that load from other work on the machine falls on both alike
            _, timings, count = pokedex_path(predictor, data, conf)
            ours.append(timings)
            start = time.perf_counter()
            naive_path(predictor, data, conf)
            naive.append((time.perf_counter() - start) * 1e3)

        def column(key: str, ours: list[dict[str, float]] = ours) -> list[float]:
            return [timings[key] for timings in ours]

        prepost = [t["predict_ms"] - t["infer_ms"] for t in ours]
        total, naive_total = statistics.median(column("total_ms")), statistics.median(naive)
        cells = [
            median_ms(column("decode_ms")),
            median_ms(column("infer_ms")),
            median_ms(prepost),
            median_ms(column("draw_ms")),
            median_ms(column("encode_ms")),
            f"{total:8.0f}",
            f"{naive_total:8.0f}",
            f"{naive_total / total:8.2f}x",
        ]
        print(f"{name + f' ({count} boxes)':<38}" + "".join(f"{cell:>14}" for cell in cells))


def bench_page(storage: Path, photo_seeds: list[int], runs: int) -> None:
    from streamlit.testing.v1 import AppTest

    os.environ["YOLODEX_STORAGE"] = str(storage)
    start = time.perf_counter()
    app = AppTest.from_file(str(PAGE), default_timeout=600)
    app.run()  # imports, loads the INT8 model into the process-wide cache
    cold = time.perf_counter() - start
    assert not app.exception, [exception.value for exception in app.exception]
    photos = [photo_jpeg(seed) for seed in photo_seeds[: runs + 1]]

    def upload(index: int) -> float:
        app.file_uploader(key="pokedex_upload").set_value((f"photo{index}.jpg", photos[index], "image/jpeg"))
        start = time.perf_counter()
        app.run()
        elapsed = time.perf_counter() - start
        assert not app.exception and app.image, [exception.value for exception in app.exception]
        return elapsed

    single = [upload(index) for index in range(runs)]
    start = time.perf_counter()
    app.run()  # the same photo again: the cached result
    cached = time.perf_counter() - start
    app.toggle(key="pokedex_compare").set_value(True)
    compare = [upload(index) for index in range(runs)]  # the INT8 results are cached: this adds the FP32 run
    both = upload(runs)  # a new photo: INT8 and FP32 both run
    shown = {metric.label: metric.value for metric in app.metric}  # the latencies the page itself measured

    print(f"\n(b) the page under AppTest (pages/pokedex.py), 4000x3000 JPEG uploads, {runs} photos")
    rows = [
        ("first page run (model load)", [cold]),
        ("upload → rendered, INT8 (median)", single),
        ("rerun, same photo (cached result)", [cached]),
        ("compare on, INT8 cached + FP32 run", compare),
        ("compare on, new photo: INT8 + FP32", [both]),
    ]
    for name, samples in rows:
        worst = max(samples)
        print(f"{name:<44}{statistics.median(samples) * 1e3:8.0f} ms   (max {worst * 1e3:.0f} ms)")
    print("the page's own figures for that photo: " + ", ".join(f"{label} {value}" for label, value in shown.items()))
    ratio = statistics.median(single) / TARGET_S
    print(f"upload → rendered is {ratio:.2f} of the {TARGET_S:.0f} s target")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--imgsz", type=int, default=640)
    parser.add_argument("--conf", type=float, default=0.25, help="the page's default threshold")
    parser.add_argument("--keep", type=Path, help="storage folder to keep (and reuse) the models in")
    args = parser.parse_args(argv)
    torch.set_num_threads(os.cpu_count() or 1)

    with tempfile.TemporaryDirectory(prefix="yolodex-bench-app-") as scratch:
        storage = (args.keep or Path(scratch)).resolve()
        run = storage / "runs" / f"bench-s-{args.imgsz}"
        run.mkdir(parents=True, exist_ok=True)
        fp32, int8 = build_models(run, args.imgsz)
        sizes = f"INT8 {int8.stat().st_size / 1e6:.1f} MB, FP32 {fp32.stat().st_size / 1e6:.1f} MB"
        print(f"CPU threads: {os.cpu_count()}; {sizes}")
        photos = {"4000x3000 JPEG": photo_jpeg(1), "3000x4000 stored, EXIF 6": photo_jpeg(2, orientation=6)}
        print("photo sizes: " + ", ".join(f"{name} {len(data) / 1e6:.1f} MB" for name, data in photos.items()))
        predictor = Predictor.from_path(int8)
        bench_backend(predictor, photos, args.conf, args.runs)
        bench_page(storage, list(range(10, 10 + args.runs + 1)), args.runs)


if __name__ == "__main__":
    main()
