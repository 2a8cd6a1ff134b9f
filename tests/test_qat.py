"""QAT (backend.quantization.qat): BN folding, fake quantization as onnxruntime U8S8, export, fine-tuning, recipe.

The arithmetic and the mechanics are checked on YOLO-NAS S at 64 px on a small synthetic shapes set, CPU; the
accuracy (fake-quant PTQ and QAT against the float model) on the session's detector (`detecting_run`), a model that
finds the shapes of its images, so that a quantization that costs accuracy shows.
"""

from __future__ import annotations

import copy
import json

import numpy as np
import onnxruntime as ort
import pytest
import torch

from backend.data.folders import load_dataset
from backend.data.loader import TrainDataset, collate_detections
from backend.data.synthetic import generate_synthetic_dataset
from backend.export.onnx_export import export_onnx
from backend.models.checkpoints import load_model
from backend.models.yolo_nas import build_model
from backend.quantization.calibration import CalibrationImages
from backend.quantization.qat import (
    FakeQuantConv2d,
    activation_ranges,
    default_float_modules,
    onnx_conv_nodes,
    prepare_qat,
    qat_config,
    qat_finetune,
    set_quantization,
    to_float_model,
)
from backend.training.config import TrainConfig
from backend.training.engine import EvalImages, evaluate
from backend.training.loss import YoloNASLoss
from tests.conftest import DETECTOR_IMGSZ, DETECTOR_MIN_MAP50

IMGSZ = 64
NUM_CLASSES = 3
# Folding and re-exporting only reorder float32 arithmetic: differences are rounding, far below this.
FLOAT_TOLERANCE = 1e-4
# The most mAP50 fake quantization or QAT may lose against the float detector (measured: see the test).
MAX_MAP50_DROP = 0.1


@pytest.fixture(scope="module")
def dataset_folder(tmp_path_factory):
    return generate_synthetic_dataset(
        tmp_path_factory.mktemp("qat") / "shapes", num_train=16, num_val=8, image_size=(96, 80), seed=3
    )


@pytest.fixture(scope="module")
def splits(dataset_folder):
    return load_dataset(dataset_folder)


@pytest.fixture(scope="module")
def calibration_batches(splits):
    reader = CalibrationImages(splits["train"].records, IMGSZ, count=8)
    return [torch.from_numpy(item["images"]) for item in iter(reader.get_next, None)]  # 8 x (1, 3, 64, 64)


@pytest.fixture(scope="module")
def partial_model():
    """A partially fused S whose BatchNorms have non-trivial statistics, so folding them is really tested."""
    torch.manual_seed(1)
    model = build_model("s", NUM_CLASSES)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                channels = module.num_features
                module.running_mean.copy_(torch.rand(channels, generator=generator) * 0.4 - 0.2)
                module.running_var.copy_(torch.rand(channels, generator=generator) * 1.5 + 0.5)
                module.weight.copy_(torch.rand(channels, generator=generator) + 0.5)
                module.bias.copy_(torch.rand(channels, generator=generator) * 0.4 - 0.2)
    return model.eval().fuse()


@pytest.fixture(scope="module")
def qat_model(partial_model, calibration_batches):
    return prepare_qat(partial_model, calibration_batches, default_float_modules(partial_model))


def _outputs(model, images, quantize: bool):
    set_quantization(model, quantize)
    try:
        with torch.no_grad():
            return model(images)
    finally:
        set_quantization(model, True)


def test_prepare_replaces_every_conv_and_folds_every_batch_norm(partial_model, qat_model):
    assert partial_model.fusion == "partial" and qat_model.fusion == "partial"
    convs = [name for name, module in partial_model.named_modules() if isinstance(module, torch.nn.Conv2d)]
    fakes = {name: module for name, module in qat_model.named_modules() if isinstance(module, FakeQuantConv2d)}
    assert len(convs) == 98 and sorted(fakes) == sorted(convs)
    assert not any(isinstance(module, torch.nn.BatchNorm2d) for module in qat_model.modules())
    assert sum(module.bn_path is not None for module in fakes.values()) == 92
    # The neck's two transposed convs stay float modules.
    assert sum(isinstance(module, torch.nn.ConvTranspose2d) for module in qat_model.modules()) == 2
    float_policy = default_float_modules(partial_model)
    assert len(float_policy) == 12 and all(not fakes[name].quantized for name in float_policy)
    assert sorted(activation_ranges(qat_model)) == sorted(set(convs) - set(float_policy))


def test_folding_is_exact_with_quantization_off(partial_model, qat_model):
    images = torch.rand(2, 3, IMGSZ, IMGSZ, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = partial_model(images)
    got = _outputs(qat_model, images, quantize=False)
    for reference, value in zip(expected, got, strict=True):
        torch.testing.assert_close(value, reference, atol=FLOAT_TOLERANCE, rtol=FLOAT_TOLERANCE)


def test_fake_quant_uses_int8_weight_levels_and_changes_outputs(qat_model, calibration_batches):
    for name, conv in qat_model.named_modules():
        if not isinstance(conv, FakeQuantConv2d) or not conv.quantized:
            continue
        scale = conv.weight_scale().reshape(-1, 1, 1, 1)
        with torch.no_grad():
            levels = conv.quantized_weight() / scale
        # Every weight sits on an integer level in [-127, 127] of its channel's scale max|w| / 127.
        torch.testing.assert_close(levels, levels.round(), atol=1e-3, rtol=0, msg=name)
        assert levels.abs().max() <= 127.001
        assert levels.abs().amax(dim=(1, 2, 3)).round().eq(127).all(), name  # each channel's max maps to 127
    stem = qat_model.backbone.stem.conv.rbr_reparam
    per_channel = [torch.unique(row).numel() for row in stem.quantized_weight().detach().flatten(1)]
    assert max(per_channel) <= 255
    images = torch.cat(calibration_batches[:2])
    quantized, float_out = _outputs(qat_model, images, True), _outputs(qat_model, images, False)
    assert any((q - f).abs().max() > 1e-3 for q, f in zip(quantized, float_out, strict=True))


def test_input_range_covers_the_calibration_percentile(partial_model, qat_model, calibration_batches):
    """Recomputes the ranges from every activation value (no subsampling) for convs small enough to be kept whole."""
    ranges = activation_ranges(qat_model)
    names = ["backbone.stem.conv.rbr_reparam", "backbone.stage4.blocks.conv3.conv", "heads.head3.stem.seq.conv"]
    seen: dict[str, list[torch.Tensor]] = {name: [] for name in names}
    handles = [
        partial_model.get_submodule(name).register_forward_pre_hook(
            lambda _m, args, name=name: seen[name].append(args[0].flatten())
        )
        for name in names
    ]
    with torch.no_grad():
        for images in calibration_batches:
            partial_model(images)
    for handle in handles:
        handle.remove()
    cut = (100 - 99.99) / 200
    for name in names:
        values = torch.cat(seen[name])
        low, high = torch.quantile(values, torch.tensor([cut, 1 - cut])).tolist()
        lo, hi = ranges[name]
        assert lo <= 0.0 < hi
        assert lo == pytest.approx(min(0.0, low), abs=1e-5)
        assert hi == pytest.approx(max(0.0, high), rel=1e-4)
        # Only the 0.01 % tail is clipped.
        assert ((values < lo - 1e-6) | (values > hi + 1e-6)).float().mean() <= 1e-4 + 1 / values.numel()


def test_prepare_rejects_bad_input(partial_model, calibration_batches):
    with pytest.raises(ValueError, match="not Conv2d"):
        prepare_qat(partial_model, calibration_batches, ["heads.head1.nope"])
    with pytest.raises(ValueError, match="no calibration images"):
        prepare_qat(partial_model, [])
    with pytest.raises(ValueError, match="fully fused"):
        prepare_qat(build_model("s", NUM_CLASSES).eval().fuse(full=True), calibration_batches)


def test_to_float_model_exports_with_module_path_node_names(partial_model, qat_model, tmp_path):
    float_model = to_float_model(qat_model)
    assert not any(isinstance(module, FakeQuantConv2d) for module in float_model.modules())
    # Checkpoint-compatible: the state dict of a partially fused YoloNAS.
    assert {key: value.shape for key, value in float_model.state_dict().items()} == {
        key: value.shape for key, value in partial_model.state_dict().items()
    }
    path = export_onnx(float_model, tmp_path / "qat_fp32.onnx", imgsz=IMGSZ, fuse=False)
    nodes = onnx_conv_nodes(path)
    assert sorted(nodes) == sorted(name for name, m in float_model.named_modules() if isinstance(m, torch.nn.Conv2d))
    assert nodes["heads.head1.cls_pred"] == "/model/heads/head1/cls_pred/Conv"
    images = torch.rand(2, 3, IMGSZ, IMGSZ, generator=torch.Generator().manual_seed(2))
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    boxes, scores = session.run(["boxes", "scores"], {"images": images.numpy()})
    set_quantization(qat_model, False)
    with torch.no_grad():
        expected_boxes, expected_scores = qat_model.predict_boxes(images)
    set_quantization(qat_model, True)
    np.testing.assert_allclose(scores, expected_scores.numpy(), atol=FLOAT_TOLERANCE)
    np.testing.assert_allclose(boxes, expected_boxes.numpy(), atol=1e-3)  # input pixels (64 px)


def test_gradients_pass_straight_through(qat_model, splits):
    model = copy.deepcopy(qat_model).train()
    batch = _batches(splits["train"], 4)[0]
    loss = YoloNASLoss(NUM_CLASSES, strides=model.strides)(
        *model(batch["images"].float() / 255), batch["gt_boxes"], batch["gt_labels"], batch["gt_mask"], (IMGSZ, IMGSZ)
    )["loss"]
    loss.backward()
    missing = [name for name, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing
    quantized = [m for m in model.modules() if isinstance(m, FakeQuantConv2d) and m.quantized]
    assert all(m.weight.grad.abs().sum() > 0 for m in quantized)


def _batches(dataset, batch_size):
    """Letterboxed (no augmentation) batches in record order, as the training loop takes them."""
    samples = TrainDataset(dataset.records, IMGSZ, None)
    items = [samples[index] for index in range(len(samples))]
    return [collate_detections(items[start : start + batch_size]) for start in range(0, len(items), batch_size)]


def _mean_loss(model, dataset) -> float:
    """Mean loss of the (fake-quantized) model over `dataset`, eval pre-processing."""
    loss_fn = YoloNASLoss(NUM_CLASSES, strides=model.strides)
    model.eval()
    total = []
    with torch.no_grad():
        for batch in _batches(dataset, 8):
            outputs = model(batch["images"].float() / 255)
            losses = loss_fn(*outputs, batch["gt_boxes"], batch["gt_labels"], batch["gt_mask"], (IMGSZ, IMGSZ))
            total.append(float(losses["loss"]))
    return float(np.mean(total))


def _tiny_config(**changes):
    base = qat_config({"imgsz": IMGSZ, "epochs": 10, "batch_size": 4, "min_samples": 8, "num_workers": 0})
    return base.__class__(**{**base.to_dict(), "device": "cpu", "augment": False, **changes})


@pytest.mark.slow
def test_qat_finetune_lowers_the_training_loss(qat_model, splits):
    model = copy.deepcopy(qat_model)
    train = splits["train"]
    empty = train.__class__([], train.class_names, train.category_ids, train.report)
    before = _mean_loss(model, train)
    events = []
    result = qat_finetune(
        model,
        train,
        empty,
        _tiny_config(epochs=2, lr=1e-3, min_samples=8),
        on_event=lambda name, **data: events.append((name, data)),
    )
    after = _mean_loss(model, train)
    assert result["stopped"] == "epochs" and result["epochs_done"] == 2
    assert result["validation"].startswith("skipped") and result["best_map"] is None
    assert after < before * 0.95, (before, after)
    names = [name for name, _ in events]
    assert names[0] == "train_start" and names[-1] == "train_end" and names.count("epoch") == 2
    assert names.count("step") == 2 * 4  # 16 images (min_samples 8 < 16) / batch 4


def test_cancel_stops_after_the_first_step(qat_model, splits):
    model = copy.deepcopy(qat_model)
    start = {key: value.clone() for key, value in model.state_dict().items()}
    result = qat_finetune(model, splits["train"], splits["val"], _tiny_config(epochs=2), stop_requested=lambda: True)
    assert result["stopped"] == "cancelled" and result["epochs_done"] == 0
    assert result["history"][0]["steps"] == 1
    # The starting weights (evaluated, so best) come back.
    assert all(torch.equal(value, start[key]) for key, value in model.state_dict().items())


def test_qat_config_applies_the_recipe():
    train = TrainConfig(data="x", epochs=100, weights="coco", weight_decay=1e-4, time_minutes=60).to_dict()
    config = qat_config(json.loads(json.dumps(train)))
    assert config.epochs == 10 and config.warmup_epochs == 1
    assert config.lr == pytest.approx(5e-4 * 0.01) and config.weight_decay == pytest.approx(1e-6)
    assert config.final_lr_ratio == 0.01 and config.time_minutes == pytest.approx(6.0)
    assert config.augment and config.mosaic_prob == 1.0 and config.batch_size == 16
    short = qat_config({"epochs": 5, "lr": 2e-3})
    assert short.epochs == 1 and short.warmup_epochs == 1 and short.lr == pytest.approx(2e-5)
    assert short.time_minutes is None
    assert qat_config({"epochs": 250}).warmup_epochs == 2
    assert qat_config({}, epochs=3).epochs == 3


def _map50(model, images) -> dict:
    return dict(evaluate(model, images, device=torch.device("cpu"), batch_size=8).metrics)


@pytest.mark.slow
def test_fake_quantization_and_qat_keep_the_detectors_accuracy(detecting_run):
    """The session's detector → prepare_qat (fake-quant PTQ) → qat_finetune, each scored on its validation images.

    Fake quantization and QAT may lose at most `MAX_MAP50_DROP` of the float model's mAP50: a wrong scale, range or
    rounding in the fake quantization, or QAT training the model away, exceeds it. The weights qat_finetune leaves
    are the ones it reports as best (re-evaluated here).
    """
    float_model, _ = load_model(detecting_run / "best.pt")
    train_config = json.loads((detecting_run / "config.json").read_text())["train"]
    splits = load_dataset(train_config["data"])
    images = EvalImages(splits["val"], DETECTOR_IMGSZ)
    float_metrics = _map50(float_model.eval(), images)
    assert float_metrics["mAP50"] >= DETECTOR_MIN_MAP50
    calibration = [
        torch.from_numpy(item["images"])
        for item in iter(CalibrationImages(splits["train"].records, DETECTOR_IMGSZ, count=8).get_next, None)
    ]
    model = prepare_qat(float_model, calibration, default_float_modules(float_model))
    fake_quant = _map50(model, images)
    result = qat_finetune(model, splits["train"], splits["val"], qat_config(train_config, epochs=2, num_workers=0))
    after = _map50(model, images)
    print(
        f"mAP50 float {float_metrics['mAP50']:.3f}, fake-quant PTQ {fake_quant['mAP50']:.3f}, QAT "
        f"{after['mAP50']:.3f}; mAP50-95 {float_metrics['mAP50-95']:.3f} / {fake_quant['mAP50-95']:.3f} / "
        f"{after['mAP50-95']:.3f}"
    )
    assert fake_quant["mAP50"] >= float_metrics["mAP50"] - MAX_MAP50_DROP, (float_metrics, fake_quant)
    assert after["mAP50"] >= float_metrics["mAP50"] - MAX_MAP50_DROP, (float_metrics, after)
    assert result["stopped"] == "epochs" and result["epochs_done"] == 2 and len(result["history"]) == 2
    assert result["start_map"] == pytest.approx(fake_quant["mAP50-95"], abs=1e-6)
    assert result["best_map"] == pytest.approx(after["mAP50-95"], abs=1e-6)
