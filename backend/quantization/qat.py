"""Quantization-aware training (QAT) of a partially fused YOLO-NAS, simulating onnxruntime's INT8 (U8S8) arithmetic.

What is simulated is what `backend.quantization.ptq.quantize_onnx` produces on CPU (docs/quantization_policy.md §2):
- weights: symmetric int8 per output channel, scale = max|w| / 127 over each output channel, zero point 0, levels
  -127..127, of the *BatchNorm-folded* weights (the ONNX export folds every BatchNorm into the conv before it, so
  those are the weights onnxruntime quantizes). The scale follows the weights at every forward, as the export would.
- activations: asymmetric uint8 per tensor at the input of every quantized conv, scale = (hi - lo) / 255, zero point
  round(-lo / scale), with a range (lo <= 0 <= hi) fixed at calibration: onnxruntime's asymmetric percentile rule
  (cut (100 - percentile) / 2 % on each side).
Not simulated: the int32 bias quantization (error ~ input_scale · weight_scale / 2, far below the weight error), the
Q/DQ pairs onnxruntime also puts on Add/Concat/MaxPool outputs, and the neck's two ConvTranspose2d (upsample), which
stay float here.

The flow: `prepare_qat` (fold BN, swap every Conv2d for a `FakeQuantConv2d`, calibrate input ranges) →
`qat_finetune` (docs/quantization_policy.md §3: the trainer's loop, `trainer.fine_tune`, with a `qat_config`) →
`to_float_model` (a plain YoloNAS with the trained weights, for `export_onnx(..., fuse=False)` and onnxruntime PTQ)
+ `activation_ranges` (the calibrated ranges by module path; `onnx_conv_nodes` maps paths to the exported node
names).

Images everywhere here: (B, 3, H, W) float32 RGB in [0, 1], letterboxed (backend.processing). Boxes do not cross
this module's boundary except inside the training batches (xyxy, letterboxed input pixels).
"""

from __future__ import annotations

import copy
import logging
import re
from collections.abc import Callable, Collection, Iterable
from dataclasses import replace
from pathlib import Path
from typing import Any, cast

import onnx
import torch
import torch.nn.functional as F
from torch import nn

from backend.data.records import DetectionSet
from backend.models.blocks import ConvBNReLU, HeadConvBNReLU, QARepVGGBlock, batch_norm, fold_batch_norm
from backend.models.yolo_nas import YoloNAS
from backend.quantization.sensitivity import module_path
from backend.training.config import TrainConfig
from backend.training.engine import EventCallback, ignore_event
from backend.training.trainer import fine_tune

logger = logging.getLogger(__name__)

WEIGHT_QMAX = 127  # symmetric int8: levels -127..127 (onnxruntime's symmetric weight range, -128 unused)
ACTIVATION_QMAX = 255  # uint8: levels 0..255
DEFAULT_PERCENTILE = 99.99
# Calibration subsampling (memory bound): every image contributes the same number of values per conv input, drawn
# uniformly; whenever a conv's pool would pass POOL_CAP values, every stored contribution and the quota are halved,
# so all images keep equal weight. 98 convs x 2^17 float32 values = 50 MB at most.
SAMPLES_PER_IMAGE = 1 << 14
MIN_SAMPLES_PER_IMAGE = 256
POOL_CAP = 1 << 17
# A conv input that was constant zero over the calibration set gets range [lo, lo + 1] (onnxruntime uses scale 1
# for an empty range too): any range represents 0 exactly.
EMPTY_RANGE_WIDTH = 1.0

# The QAT recipe (docs/quantization_policy.md §3, super-gradients' modify_params_for_qat).
QAT_EPOCH_DIVISOR = 10
QAT_LR_FACTOR = 0.01
QAT_WEIGHT_DECAY_FACTOR = 0.01
QAT_FINAL_LR_RATIO = 0.01

# The default precision policy of ptq.default_float_nodes, by module path: the heads' branches and predictors.
_FLOAT_BRANCH = re.compile(r"^heads\.head\d+\.(cls_convs|reg_convs|cls_pred|reg_pred)(\.|$)")


# ----------------------------------------------------------------------------------------------------------------
# The fake-quantized convolution
# ----------------------------------------------------------------------------------------------------------------


class FakeQuantConv2d(nn.Module):
    """A Conv2d with its BatchNorm folded in, fake-quantized as onnxruntime U8S8 runs it (module docstring).

    forward(x (B, in, H, W)) → (B, out, H', W'): with `enabled` and `quantized`, x is fake-quantized per tensor to
    uint8 over [input_lo, input_hi] and the weight per output channel to symmetric int8, then F.conv2d with the
    original geometry. Gradients pass straight through both (inside the range for x; always for the weight, whose
    range is its own max). With `enabled` False (or `quantized` False) it is the folded float conv.

    Args:
        conv: the convolution (any stride, padding, dilation, groups; with or without bias).
        bn: the eval-mode BatchNorm2d right after it, folded in with its running statistics; None for none.
        quantized: False keeps this conv float for good (a float-policy conv), whatever `enabled` says.

    Attributes:
        weight: (out, in/groups, kh, kw) the folded weight, trainable.
        bias: (out,) the folded bias, trainable.
        input_lo, input_hi: buffers, the calibrated input range (lo <= 0 <= hi).
        bn_path: module path of the BatchNorm that was folded (set by `prepare_qat`), for `to_float_model`.
        had_bias: whether the original conv had a bias parameter.
    """

    input_lo: torch.Tensor
    input_hi: torch.Tensor

    def __init__(self, conv: nn.Conv2d, bn: nn.BatchNorm2d | None, quantized: bool = True):
        super().__init__()
        if conv.padding_mode != "zeros":
            raise ValueError(f"only zero-padded convolutions are supported, got padding_mode={conv.padding_mode!r}")
        with torch.no_grad():
            if bn is not None:
                weight, bias = fold_batch_norm(conv.weight, conv.bias, bn)
            else:
                weight = conv.weight
                bias = conv.bias if conv.bias is not None else torch.zeros(conv.out_channels)
        self.weight = nn.Parameter(weight.detach().clone())
        self.bias = nn.Parameter(bias.detach().clone().to(weight.dtype))
        self.in_channels, self.out_channels = conv.in_channels, conv.out_channels
        # Conv2d keeps these as 2-tuples (padding may also be "same"/"valid"); its annotations say tuple[int, ...].
        self.kernel_size = cast(tuple[int, int], conv.kernel_size)
        self.stride = cast(tuple[int, int], conv.stride)
        self.padding = cast(str | tuple[int, int], conv.padding)
        self.dilation = cast(tuple[int, int], conv.dilation)
        self.groups = conv.groups
        self.had_bias = conv.bias is not None
        self.bn_path: str | None = None
        self.quantized = quantized
        self.enabled = True
        self.register_buffer("input_lo", torch.tensor(0.0))
        self.register_buffer("input_hi", torch.tensor(1.0))

    def extra_repr(self) -> str:
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
            f"quantized={self.quantized}, enabled={self.enabled}, "
            f"input_range=({float(self.input_lo):.4g}, {float(self.input_hi):.4g})"
        )

    @property
    def active(self) -> bool:
        return self.quantized and self.enabled

    def weight_scale(self) -> torch.Tensor:
        """(out,) the per-channel int8 scale max|w| / 127 of the current weight (1 for an all-zero channel)."""
        amax = self.weight.detach().abs().amax(dim=(1, 2, 3))
        return torch.where(amax > 0, amax / WEIGHT_QMAX, torch.ones_like(amax)).float()

    def quantized_weight(self) -> torch.Tensor:
        """The weight after per-channel symmetric int8 fake quantization (straight-through gradient)."""
        scale = self.weight_scale()
        zero_point = torch.zeros_like(scale, dtype=torch.int32)
        return torch.fake_quantize_per_channel_affine(self.weight, scale, zero_point, 0, -WEIGHT_QMAX, WEIGHT_QMAX)

    def input_qparams(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(scale (1,) float32, zero_point (1,) int32) of the uint8 input quantization, as onnxruntime computes them."""
        lo, hi = self.input_lo.float().clamp(max=0.0), self.input_hi.float().clamp(min=0.0)
        scale = ((hi - lo) / ACTIVATION_QMAX).clamp(min=1e-12).reshape(1)
        zero_point = torch.round(-lo / scale).clamp(0, ACTIVATION_QMAX).to(torch.int32).reshape(1)
        return scale, zero_point

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight: torch.Tensor = self.weight
        if self.active:
            scale, zero_point = self.input_qparams()
            x = torch.fake_quantize_per_tensor_affine(x, scale, zero_point, 0, ACTIVATION_QMAX)
            weight = self.quantized_weight()
        return F.conv2d(x, weight, self.bias, self.stride, self.padding, self.dilation, self.groups)


# ----------------------------------------------------------------------------------------------------------------
# Preparing a model
# ----------------------------------------------------------------------------------------------------------------


def default_float_modules(model: YoloNAS) -> list[str]:
    """Module paths of the convs the default PTQ policy keeps in float: the heads' `cls_convs`, `reg_convs`,
    `cls_pred` and `reg_pred` (the same convs as `ptq.default_float_nodes`), in model order."""
    return [
        name for name, module in model.named_modules() if isinstance(module, nn.Conv2d) and _FLOAT_BRANCH.match(name)
    ]


def _conv_bn_pairs(model: YoloNAS) -> dict[str, str | None]:
    """Every Conv2d path of a partially fused model → the path of the BatchNorm right after it (or None)."""
    following: dict[str, str] = {}
    for name, module in model.named_modules():
        prefix = f"{name}." if name else ""
        if isinstance(module, QARepVGGBlock):
            following[f"{prefix}rbr_reparam"] = f"{prefix}post_bn"  # partial fusion: rbr_reparam → post_bn → ReLU
        elif isinstance(module, ConvBNReLU):
            following[f"{prefix}conv"] = f"{prefix}bn"
        elif isinstance(module, HeadConvBNReLU):
            following[f"{prefix}seq.conv"] = f"{prefix}seq.bn"
    return {name: following.get(name) for name, module in model.named_modules() if isinstance(module, nn.Conv2d)}


def _set_module(model: nn.Module, path: str, module: nn.Module) -> None:
    parent_path, _, child = path.rpartition(".")
    setattr(model.get_submodule(parent_path) if parent_path else model, child, module)


def prepare_qat(
    model: YoloNAS,
    calibration_images: Iterable[torch.Tensor],
    float_modules: Collection[str] = (),
    percentile: float = DEFAULT_PERCENTILE,
) -> YoloNAS:
    """A fake-quantized copy of `model`: every BatchNorm folded, every Conv2d a calibrated `FakeQuantConv2d`.

    The copy is partially fused first (QARepVGG branches merged, as the PTQ export is). Each of the 98 Conv2d (S/M/L
    alike) becomes a `FakeQuantConv2d` holding the BN-folded weight and bias; the 92 BatchNorms become nn.Identity,
    so the forward is unchanged up to float rounding while quantization is off. Convs named in `float_modules` are
    folded the same way but never quantized. The neck's ConvTranspose2d stay float nn.ConvTranspose2d. The model's
    `fusion` stays "partial", so `engine.evaluate` runs it as it is.

    Calibration (quantization off, eval mode, no gradients): forward hooks record the input of each quantized conv.
    Per conv, lo = min(0, q_low), hi = max(0, q_high) with q_low, q_high the (100 - percentile) / 2 % and
    100 - (100 - percentile) / 2 % quantiles of the observed values (onnxruntime's asymmetric percentile rule),
    estimated on a uniform subsample: each image contributes the same number of values (SAMPLES_PER_IMAGE, halved
    for all images whenever the pool would pass POOL_CAP). hi > lo always (EMPTY_RANGE_WIDTH for an all-zero input).

    Args:
        model: a YoloNAS, unfused or partially fused (not modified).
        calibration_images: batches (B, 3, H, W) float32 RGB in [0, 1], letterboxed; e.g. the training split with
            the validation pre-processing (`CalibrationImages`).
        float_modules: Conv2d module paths (as in `named_modules`, e.g. "heads.head1.cls_pred") to keep in float;
            `default_float_modules(model)` gives the PTQ default policy.
        percentile: in (0, 100]; 100 is min/max.

    Returns:
        The QAT model, in eval mode, with quantization enabled.

    Raises:
        ValueError: a fully fused model, an unknown name in `float_modules`, a bad percentile, or no calibration
            images.
    """
    if not 0.0 < percentile <= 100.0:
        raise ValueError(f"percentile must be in (0, 100], got {percentile}")
    if model.fusion == "full":
        raise ValueError(
            "prepare_qat needs an unfused or partially fused model: a fully fused one has lost the BatchNorms that "
            "the quantized weights are folded from; load the run's checkpoint again"
        )
    qat_model = copy.deepcopy(model).float().eval()
    if qat_model.fusion == "none":
        qat_model.fuse()  # partial
    pairs = _conv_bn_pairs(qat_model)
    unknown = sorted(set(float_modules) - set(pairs))
    if unknown:
        raise ValueError(
            f"float_modules names modules that are not Conv2d of this model: {unknown[:5]}; use paths as in "
            "model.named_modules(), e.g. 'heads.head1.cls_pred' (default_float_modules lists the default policy)"
        )
    for conv_path, bn_path in pairs.items():
        conv = cast(nn.Conv2d, qat_model.get_submodule(conv_path))
        bn = cast(nn.BatchNorm2d, qat_model.get_submodule(bn_path)) if bn_path else None
        fake = FakeQuantConv2d(conv, bn, quantized=conv_path not in float_modules).to(conv.weight.device)
        fake.bn_path = bn_path
        _set_module(qat_model, conv_path, fake)
        if bn_path:
            _set_module(qat_model, bn_path, nn.Identity())
    leftover = [name for name, module in qat_model.named_modules() if isinstance(module, nn.BatchNorm2d)]
    if leftover:  # a block type this module does not know: folding it silently would change the forward
        raise ValueError(f"BatchNorms not after a known conv, cannot fold them: {leftover[:5]}")
    _calibrate(qat_model, calibration_images, percentile)
    return qat_model.eval()


def _fake_quant_convs(model: nn.Module, quantized_only: bool = False) -> dict[str, FakeQuantConv2d]:
    return {
        name: module
        for name, module in model.named_modules()
        if isinstance(module, FakeQuantConv2d) and (module.quantized or not quantized_only)
    }


class _InputPool:
    """A bounded uniform sample of one conv input's values over the calibration images, with the exact min/max."""

    def __init__(self, generator: torch.Generator):
        self.generator = generator
        self.chunks: list[torch.Tensor] = []
        self.quota = SAMPLES_PER_IMAGE
        self.size = 0
        self.minimum = float("inf")
        self.maximum = float("-inf")

    def add(self, x: torch.Tensor) -> None:  # (B, C, H, W)
        values = x.detach().float().reshape(x.shape[0], -1)
        self.minimum = min(self.minimum, float(values.min()))
        self.maximum = max(self.maximum, float(values.max()))
        per_image = values.shape[1]
        incoming = values.shape[0] * min(self.quota, per_image)
        while self.size + incoming > POOL_CAP and self.quota > MIN_SAMPLES_PER_IMAGE:
            self.quota //= 2
            self.chunks = [chunk[::2] for chunk in self.chunks]  # chunks are i.i.d. draws: halving keeps them uniform
            self.size = sum(chunk.numel() for chunk in self.chunks)
            incoming = values.shape[0] * min(self.quota, per_image)
        if per_image <= self.quota:
            chunk = values.flatten()
        else:  # uniform with replacement: cheap (no permutation of the whole tensor), unbiased
            index = torch.randint(per_image, (values.shape[0], self.quota), generator=self.generator)
            chunk = values.gather(1, index.to(values.device)).flatten()
        self.chunks.append(chunk.cpu())
        self.size += chunk.numel()

    def range(self, percentile: float) -> tuple[float, float]:
        pool = torch.cat(self.chunks)
        cut = (100.0 - percentile) / 200.0  # fraction cut on each side
        low, high = torch.quantile(pool, torch.tensor([cut, 1.0 - cut])).tolist()
        low, high = max(low, self.minimum), min(high, self.maximum)
        lo, hi = min(0.0, low), max(0.0, high)
        if hi - lo <= 1e-12:
            hi = lo + EMPTY_RANGE_WIDTH
        return lo, hi


@torch.no_grad()
def _calibrate(model: YoloNAS, calibration_images: Iterable[torch.Tensor], percentile: float) -> None:
    convs = _fake_quant_convs(model, quantized_only=True)
    generator = torch.Generator().manual_seed(0)
    pools = {name: _InputPool(generator) for name in convs}
    handles = [
        conv.register_forward_pre_hook(lambda _module, args, pool=pools[name]: pool.add(args[0]))
        for name, conv in convs.items()
    ]
    set_quantization(model, False)  # ranges of the float model, as onnxruntime calibrates the FP32 graph
    device = next(model.parameters()).device
    images_seen = 0
    try:
        for images in calibration_images:
            if images.ndim != 4 or images.shape[1] != 3 or not images.is_floating_point():
                raise ValueError(
                    f"calibration images must be (B, 3, H, W) float in [0, 1], got {tuple(images.shape)} "
                    f"{images.dtype}: letterbox them and divide by 255"
                )
            model(images.to(device))
            images_seen += images.shape[0]
    finally:
        for handle in handles:
            handle.remove()
        set_quantization(model, True)
    if images_seen == 0:
        raise ValueError("no calibration images: pass a few letterboxed training images (the PTQ default is 64)")
    for name, conv in convs.items():
        lo, hi = pools[name].range(percentile)
        conv.input_lo.fill_(lo)
        conv.input_hi.fill_(hi)
    logger.info("calibrated %d conv input ranges on %d images (percentile %s)", len(convs), images_seen, percentile)


def set_quantization(qat_model: nn.Module, enabled: bool) -> None:
    """Switches fake quantization of every `FakeQuantConv2d` on or off (float-policy convs stay float either way)."""
    for module in qat_model.modules():
        if isinstance(module, FakeQuantConv2d):
            module.enabled = enabled


def activation_ranges(qat_model: nn.Module) -> dict[str, tuple[float, float]]:
    """Module path of each quantized conv → its calibrated input range (lo, hi), lo <= 0 <= hi, in model order."""
    return {
        name: (float(conv.input_lo), float(conv.input_hi))
        for name, conv in _fake_quant_convs(qat_model, quantized_only=True).items()
    }


def to_float_model(qat_model: YoloNAS) -> YoloNAS:
    """A plain partially fused YoloNAS carrying the QAT model's trained weights, for export and onnxruntime PTQ.

    Each `FakeQuantConv2d` becomes an nn.Conv2d at the same module path with the trained folded weight; the
    BatchNorm it replaced comes back as an identity BatchNorm (weight 1, mean 0, running_var 1 - eps, so
    var + eps = 1) holding the folded bias when the conv has none. So the state dict has exactly the keys and shapes
    of a partially fused YoloNAS (checkpoints and `load_weights` accept it), `fuse(full=True)` works, and the ONNX
    export folds the identity BN back into the conv: the weights onnxruntime quantizes are the trained ones (up to
    a 1-ulp rescale). Its forward equals the QAT model's with quantization off, to float rounding (~1e-6).

    Returns:
        The float model in eval mode (a copy; `qat_model` is not modified).
    """
    float_model = copy.deepcopy(qat_model)
    for path, fake in _fake_quant_convs(float_model).items():
        needs_bias = fake.had_bias or fake.bn_path is None
        conv = nn.Conv2d(
            fake.in_channels,
            fake.out_channels,
            fake.kernel_size,
            fake.stride,
            fake.padding,
            fake.dilation,
            fake.groups,
            bias=needs_bias,
        ).to(fake.weight.device)
        with torch.no_grad():
            conv.weight.copy_(fake.weight)
            if conv.bias is not None:  # needs_bias
                conv.bias.copy_(fake.bias)
        _set_module(float_model, path, conv)
        if fake.bn_path:
            bn = batch_norm(fake.out_channels).to(fake.weight.device)
            with torch.no_grad():
                cast(torch.Tensor, bn.running_var).fill_(1.0 - bn.eps)
                bn.bias.copy_(torch.zeros_like(fake.bias) if needs_bias else fake.bias)
            _set_module(float_model, fake.bn_path, bn)
    return float_model.eval()


def onnx_conv_nodes(onnx_model: onnx.ModelProto | str | Path) -> dict[str, str]:
    """Module path → Conv node name in a yolodex export (`export_onnx`), e.g. "heads.head1.cls_convs.0.seq.conv" →
    "/model/heads/head1/cls_convs/cls_convs.0/seq/conv/Conv".

    The tracing exporter names a node after its module scopes, but a Sequential/ModuleList child appears as
    "<list>.<index>", under the list's own scope only when the list itself was called; this undoes both.
    """
    if not isinstance(onnx_model, onnx.ModelProto):
        onnx_model = onnx.load(str(onnx_model), load_external_data=False)
    return {
        module_path(node.name): node.name
        for node in onnx_model.graph.node
        if node.op_type == "Conv" and node.name.startswith("/model/") and node.name.endswith("/Conv")
    }


# ----------------------------------------------------------------------------------------------------------------
# Fine-tuning
# ----------------------------------------------------------------------------------------------------------------


def qat_config(train: dict[str, Any], **overrides: Any) -> TrainConfig:
    """The QAT recipe applied to a float run's config.json "train" dict (TrainConfig.to_dict()): the TrainConfig the
    fine-tuning trains with.

    Epochs ÷ 10 (at least 1), lr × 0.01 (of the run's effective peak lr), weight decay × 0.01, warm-up
    max(1, epochs // 10) QAT epochs, cosine to 0.01, EMA off, augmentations kept (without closing mosaic), time
    budget ÷ 10 (docs/quantization_policy.md §3); float32 (the fake-quant ops want it), not compiled, no early stop.
    `overrides` replace any resulting field (e.g. epochs=2, device="cpu").
    Note: the warm-up starts at the schedule's 1e-6 (super-gradients scales that by 0.01 too; ours is fixed).
    """
    base = TrainConfig.from_dict(train)
    epochs = max(1, base.epochs // QAT_EPOCH_DIVISOR)
    config = replace(
        base,
        epochs=epochs,
        lr=base.peak_lr * QAT_LR_FACTOR,
        weight_decay=base.weight_decay * QAT_WEIGHT_DECAY_FACTOR,
        warmup_epochs=float(max(1, epochs // QAT_EPOCH_DIVISOR)),
        final_lr_ratio=QAT_FINAL_LR_RATIO,
        time_minutes=base.time_minutes / QAT_EPOCH_DIVISOR if base.time_minutes else None,
        ema_decay=0.0,
        amp=False,
        compile=False,
        close_mosaic=0.0,
        patience=None,
        eval_every=1,
    )
    return replace(config, **overrides) if overrides else config


def qat_finetune(
    qat_model: YoloNAS,
    train_set: DetectionSet,
    val_set: DetectionSet,
    config: TrainConfig,
    *,
    on_event: EventCallback | None = None,
    stop_requested: Callable[[], bool] | None = None,
) -> dict[str, Any]:
    """Fine-tunes a `prepare_qat` model in place with the trainer's loop (`trainer.fine_tune`: float32, no EMA).

    Every parameter trains (folded weights and biases, the bottlenecks' alpha); the input ranges stay fixed. The
    fake-quantized model is evaluated before training and after each epoch on `val_set` (skipped when it is empty:
    the last weights are kept), and the best state by mAP50-95 (ties → later) is restored at the end, the starting
    weights included. Events as in training: "train_start" (with mode "qat"), "step", "epoch" and "train_end" (with
    the result below), through `on_event(name, **data)`.

    Args:
        qat_model: from `prepare_qat`; trained in place, left in eval mode.
        train_set: training images (boxes xyxy in original-image pixels), augmented as in the float run.
        val_set: validation images; may be empty.
        config: from `qat_config`.
        stop_requested: polled after every step; True stops the run ("cancelled").

    Returns:
        {"epochs_done", "best_map" (None without validation), "best_epoch" (0-based; None when the starting weights
        stayed best or nothing was evaluated), "start_map", "stopped" ("epochs" | "time" | "cancelled"),
        "validation" ("evaluated" | "skipped: empty validation set"), "history" (per epoch: epoch, steps, train loss
        means, val metrics or None), "steps_per_epoch", "elapsed_s"}.
    """
    emit = on_event or ignore_event
    outcome = fine_tune(
        qat_model,
        train_set,
        val_set,
        config,
        on_event=emit,
        stop_requested=stop_requested,
        start_details={"mode": "qat", "precision": "float32 + fake int8", "config": config.to_dict()},
    )
    result = {
        "epochs_done": outcome.fit.epochs_done,
        "best_map": outcome.best_map,
        "best_epoch": outcome.best_epoch,
        "start_map": outcome.start_map,
        "stopped": outcome.fit.stopped,
        "validation": "evaluated" if len(val_set) else "skipped: empty validation set",
        "history": outcome.history,
        "steps_per_epoch": outcome.fit.steps_per_epoch,
        "elapsed_s": outcome.fit.elapsed_s,
    }
    emit("train_end", **result)
    return result


__all__ = [
    "FakeQuantConv2d",
    "activation_ranges",
    "default_float_modules",
    "onnx_conv_nodes",
    "prepare_qat",
    "qat_config",
    "qat_finetune",
    "set_quantization",
    "to_float_model",
]
