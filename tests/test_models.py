"""YOLO-NAS model: block shapes, gradients, fusion parity, and faithfulness to the official S/M/L."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from backend.models import VARIANTS, build_model, count_gflops, count_parameters, decode_predictions, load_model
from backend.models.blocks import SPP, ConvBNReLU, CSPLayer, QARepVGGBlock
from tests.conftest import FIXTURES

OFFICIAL_TOTALS = {"s": 19_053_888, "m": 51_182_658, "l": 66_976_392}
OFFICIAL_PARTIAL = {"s": 12_184_240, "m": 31_922_098, "l": 42_017_784}
OFFICIAL_FULL = {"s": 12_175_888, "m": 31_906_578, "l": 41_999_192}
OFFICIAL_BN_COUNT = {"s": 129, "m": 135, "l": 153}


def randomise_batch_norms(module: nn.Module) -> None:
    """Non-trivial BN statistics and affine parameters, so that fusion parity tests mean something."""
    generator = torch.Generator().manual_seed(1)
    for bn in module.modules():
        if isinstance(bn, nn.BatchNorm2d):
            shape = bn.running_mean.shape
            bn.running_mean.copy_(torch.randn(shape, generator=generator) * 0.2)
            bn.running_var.copy_(torch.rand(shape, generator=generator) + 0.5)
            bn.weight.data.copy_(torch.rand(shape, generator=generator) + 0.5)
            bn.bias.data.copy_(torch.randn(shape, generator=generator) * 0.1)


def reference_keys(size: str, form: str = "") -> dict[str, list[int]]:
    suffix = f"_{form}" if form else ""
    return json.loads((FIXTURES / "reference" / f"yolo_nas_{size}{suffix}_state_dict.json").read_text())


# --- 1. shapes -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("stride", "identity"), [(1, True), (1, False), (2, False)])
def test_qarepvgg_block_shape(stride: int, identity: bool) -> None:
    channels_out = 8 if identity else 16
    block = QARepVGGBlock(8, channels_out, stride=stride, use_identity=identity)
    assert block(torch.randn(2, 8, 32, 24)).shape == (2, channels_out, 32 // stride, 24 // stride)


def test_qarepvgg_identity_needs_same_shape() -> None:
    with pytest.raises(ValueError, match="identity"):
        QARepVGGBlock(8, 16, use_identity=True)


@pytest.mark.parametrize("concat", [False, True])
def test_csp_and_spp_shapes(concat: bool) -> None:
    csp = CSPLayer(24, 40, num_blocks=3, hidden_channels=16, use_qarepvgg=True, concat_intermediates=concat)
    assert csp.conv3.conv.in_channels == 16 * (2 + 3 * concat)
    assert csp(torch.randn(1, 24, 16, 16)).shape == (1, 40, 16, 16)
    assert SPP(32, 48)(torch.randn(1, 32, 13, 13)).shape == (1, 48, 13, 13)


@pytest.mark.parametrize("size", ["s", "m", "l"])
def test_feature_shapes_per_size(size: str) -> None:
    model = build_model(size, num_classes=5).eval()
    images = torch.rand(2, 3, 128, 192)
    with torch.no_grad():
        features = model.backbone(images)
        assert [tuple(f.shape[1:]) for f in features] == [(96, 32, 48), (192, 16, 24), (384, 8, 12), (768, 4, 6)]
        pyramid = model.neck(features)
        assert [tuple(p.shape[1:]) for p in pyramid] == [(96, 16, 24), (192, 8, 12), (384, 4, 6)]
        cls_logits, reg_distri = model(images)
    anchors = 16 * 24 + 8 * 12 + 4 * 6
    assert cls_logits.shape == (2, anchors, 5)
    assert reg_distri.shape == (2, anchors, 68)


def test_any_number_of_classes_and_bad_input() -> None:
    for num_classes in (1, 7):
        model = build_model("s", num_classes).eval()
        with torch.no_grad():
            assert model(torch.rand(1, 3, 64, 64))[0].shape == (1, 84, num_classes)
    with pytest.raises(ValueError, match="multiples of 32"):
        model(torch.rand(1, 3, 100, 96))
    with pytest.raises(ValueError, match="size"):
        build_model("xl")
    with pytest.raises(ValueError, match="num_classes"):
        build_model("s", 0)


def test_batch_norm_settings_and_class_prior() -> None:
    for size, expected in OFFICIAL_BN_COUNT.items():
        model = build_model(size)
        norms = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
        assert len(norms) == expected
        assert {(m.eps, m.momentum) for m in norms} == {(1e-3, 0.03)}
    bias = model.heads.head2.cls_pred.bias
    assert torch.allclose(torch.sigmoid(bias), torch.full_like(bias, 0.01))


# --- gradients ----------------------------------------------------------------------------------------------


def test_every_parameter_gets_a_gradient() -> None:
    model = build_model("s", num_classes=3).train()
    cls_logits, reg_distri = model(torch.rand(2, 3, 64, 64))
    (cls_logits.sum() + reg_distri.sum()).backward()
    for name, parameter in model.named_parameters():
        if "rbr_reparam" in name:  # the official unused placeholder, filled only by fusion
            assert parameter.grad is None, name
        else:
            assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name

    # The partially fused form trains too (QAT starts from it): now rbr_reparam and post_bn carry the gradients.
    model = build_model("s", num_classes=3).eval().fuse().train()
    cls_logits, reg_distri = model(torch.rand(2, 3, 64, 64))
    (cls_logits.sum() + reg_distri.sum()).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())


# --- 2. fusion parity ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(("stride", "identity"), [(1, True), (2, False)])
def test_qarepvgg_fuse_parity(stride: int, identity: bool) -> None:
    block = QARepVGGBlock(8, 8, stride=stride, use_identity=identity)
    randomise_batch_norms(block)
    block.eval()
    x = torch.randn(2, 8, 20, 20)
    with torch.no_grad():
        expected = block(x)
        block.fuse()
        assert {n for n, _ in block.named_children()} == {"post_bn", "rbr_reparam", "act"}
        torch.testing.assert_close(block(x), expected, atol=1e-5, rtol=1e-4)
        block.fuse(full=True)
        assert {n for n, _ in block.named_children()} == {"rbr_reparam", "act"}
        torch.testing.assert_close(block(x), expected, atol=1e-5, rtol=1e-4)
        block.fuse(full=True)  # idempotent
        torch.testing.assert_close(block(x), expected, atol=1e-5, rtol=1e-4)


def test_fold_batch_norm_is_not_a_no_op() -> None:
    """Guard for the parity tests: with randomised statistics the unfused branches really differ from rbr_reparam."""
    block = QARepVGGBlock(4, 4)
    randomise_batch_norms(block)
    block.eval()
    conv = ConvBNReLU(4, 4)
    assert not torch.allclose(block(torch.ones(1, 4, 5, 5)), conv(torch.ones(1, 4, 5, 5)))


@pytest.mark.parametrize("size", ["s", "m", "l"])
def test_whole_model_fuse_parity(size: str) -> None:
    model = build_model(size, num_classes=4)
    randomise_batch_norms(model)
    model.eval()
    images = torch.rand(1, 3, 96, 64)
    with torch.no_grad():
        boxes, scores = model.predict_boxes(images)
        for full in (False, True):
            model.fuse(full=full)
            assert model.fusion == ("full" if full else "partial")
            fused_boxes, fused_scores = model.predict_boxes(images)
            torch.testing.assert_close(fused_boxes, boxes, atol=2e-3, rtol=1e-4)
            torch.testing.assert_close(fused_scores, scores, atol=1e-4, rtol=1e-4)


# --- 3. reference parity ------------------------------------------------------------------------------------


@pytest.mark.parametrize("size", ["s", "m", "l"])
def test_state_dict_keys_shapes_and_counts_match_official(size: str) -> None:
    model = build_model(size, num_classes=80).eval()
    state = {k: list(v.shape) for k, v in model.state_dict().items()}
    assert list(state) == list(reference_keys(size)) and state == reference_keys(size)
    assert count_parameters(model) == OFFICIAL_TOTALS[size]
    model.fuse()
    assert {k: list(v.shape) for k, v in model.state_dict().items()} == reference_keys(size, "fused")
    assert count_parameters(model) == OFFICIAL_PARTIAL[size]
    model.fuse(full=True)
    assert {k: list(v.shape) for k, v in model.state_dict().items()} == reference_keys(size, "fullfused")
    assert count_parameters(model) == OFFICIAL_FULL[size]


def test_gflops_match_official_measurement() -> None:
    summary = json.loads((FIXTURES / "reference" / "yolo_nas_summary.json").read_text())
    assert summary["yolo_nas_s"]["params_total"] == OFFICIAL_TOTALS["s"]
    model = build_model("s").eval()
    assert count_gflops(model) == pytest.approx(33.88, abs=0.01)
    assert count_gflops(model.fuse(full=True)) == pytest.approx(31.80, abs=0.01)


@pytest.mark.reference
def test_official_checkpoint_reproduces_official_outputs(reference_dir) -> None:
    expected = np.load(reference_dir / "yolo_nas_s_expected_320.npz")
    rgb = np.asarray(Image.open(reference_dir / "input_320.png").convert("RGB"), dtype=np.float32)
    images = torch.from_numpy(rgb / 255.0).permute(2, 0, 1)[None]  # (1, 3, 320, 320), no letterbox
    model, report = load_model(reference_dir / "yolo_nas_s_random_fp16.pth")
    assert (report.layout, report.entry, report.size, report.num_classes) == ("official", "net", "s", 80)
    tolerances = {"none": (1e-3, 1e-5), "partial": (5e-3, 1e-4), "full": (5e-3, 1e-4)}
    with torch.no_grad():
        for form, (box_tol, score_tol) in tolerances.items():
            if form != "none":
                model.fuse(full=form == "full")
            cls_logits, reg_distri = model(images)
            boxes, scores = decode_predictions(cls_logits, reg_distri, (320, 320), model.strides)
            np.testing.assert_allclose(boxes.numpy(), expected["boxes"], rtol=0, atol=box_tol, err_msg=form)
            np.testing.assert_allclose(scores.numpy(), expected["scores"], rtol=0, atol=score_tol, err_msg=form)
            if form == "none":
                np.testing.assert_allclose(cls_logits.numpy(), expected["cls_logits"], rtol=0, atol=1e-4)
                np.testing.assert_allclose(reg_distri.numpy(), expected["reg_distri"], rtol=0, atol=1e-4)
    assert set(VARIANTS) == {"s", "m", "l"}
