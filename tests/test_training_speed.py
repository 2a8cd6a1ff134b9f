"""The faster training paths compute the same thing as the plain one: the 1x1 branch at stride 2 as a 1x1 conv of
every other pixel, and a channels-last fp32 step on the CPU (which once crashed oneDNN) against the NCHW step."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from backend.models import build_model
from backend.models.blocks import QARepVGGBlock
from backend.training.loss import YoloNASLoss


def test_stride_two_one_by_one_branch_equals_the_strided_convolution() -> None:
    torch.manual_seed(0)
    block = QARepVGGBlock(3, 8, stride=2, use_identity=False)
    for size in (9, 10):  # odd and even sides: the strided conv keeps ceil(size / 2) pixels, so does the slicing
        x = torch.randn(2, 3, size, size, requires_grad=True)
        strided = F.conv2d(x, block.branch_1x1.weight, block.branch_1x1.bias, stride=2)
        ours = block._branch_1x1(x)
        assert ours.shape == strided.shape
        torch.testing.assert_close(ours, strided)
        grad_ours = torch.autograd.grad(ours.square().sum(), (x, block.branch_1x1.weight))
        grad_strided = torch.autograd.grad(strided.square().sum(), (x, block.branch_1x1.weight))
        for a, b in zip(grad_ours, grad_strided, strict=True):
            torch.testing.assert_close(a, b)


def _step(channels_last: bool) -> tuple[float, dict[str, torch.Tensor]]:
    torch.manual_seed(0)
    model = build_model("s", 2).train()
    images = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
        images = images.contiguous(memory_format=torch.channels_last)
    boxes = torch.tensor([[[4.0, 6.0, 40.0, 50.0]], [[20.0, 10.0, 60.0, 30.0]]])
    labels, mask = torch.tensor([[0], [1]]), torch.ones(2, 1, dtype=torch.bool)
    loss = YoloNASLoss(2, strides=model.strides)(*model(images), boxes, labels, mask, (64, 64))["loss"]
    loss.backward()
    grads = {name: p.grad for name, p in model.named_parameters() if p.grad is not None}
    return loss.item(), grads


def _cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return F.cosine_similarity(a.flatten().double(), b.flatten().double(), dim=0).item()


def test_channels_last_fp32_step_matches_the_nchw_step() -> None:
    loss_nchw, grads_nchw = _step(channels_last=False)
    loss_nhwc, grads_nhwc = _step(channels_last=True)
    assert abs(loss_nchw - loss_nhwc) < 1e-4 * max(1.0, abs(loss_nchw))
    assert grads_nchw.keys() == grads_nhwc.keys()
    # Element by element the two layouts differ by a few percent (so does NCHW fp32 against fp64 at this tiny batch:
    # BatchNorm over 2 images and the assigner's top-k make the gradient ill-conditioned); their directions agree.
    everything = [torch.cat([grads[k].flatten() for k in grads_nchw]) for grads in (grads_nchw, grads_nhwc)]
    assert _cosine(*everything) > 0.999
    stem = "backbone.stem.conv.branch_1x1.weight"  # the conv whose NHWC weight gradient crashed oneDNN
    assert _cosine(grads_nchw[stem], grads_nhwc[stem]) > 0.99


def _compiled_losses(backend, tmp_path) -> tuple[list[float], list[float]]:
    """Three optimizer steps on a fixed batch, eager and through `compile_model`, from the same weights."""
    from backend.training.engine import compile_model
    from backend.training.schedule import build_optimizer

    images = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    boxes = torch.tensor([[[4.0, 6.0, 40.0, 50.0]], [[20.0, 10.0, 60.0, 30.0]]])
    labels, mask = torch.tensor([[0], [1]]), torch.ones(2, 1, dtype=torch.bool)
    results = []
    for compiled in (False, True):
        torch.manual_seed(0)
        model = build_model("s", 2).train()
        loss_fn, optimizer = YoloNASLoss(2, strides=model.strides), build_optimizer(model, 1e-3, 1e-4)
        forward = compile_model(model, tmp_path / "cache", backend=backend) if compiled else model
        losses = []
        for _ in range(3):
            loss = loss_fn(*forward(images), boxes, labels, mask, (64, 64))["loss"]
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
        results.append(losses)
    torch._dynamo.reset()
    return results[0], results[1]


def test_compiled_training_steps_give_the_eager_losses(tmp_path) -> None:
    """dynamo's graph capture and AOTAutograd's joint forward/backward graph, run by the aot_eager backend: the
    compiled model's code path without inductor's C++ build (minutes for S on two cores; bench/ measures it)."""
    eager, compiled = _compiled_losses("aot_eager", tmp_path)
    assert compiled == pytest.approx(eager, rel=1e-4)
    assert eager[2] < eager[0]  # the steps did train


def test_a_compile_failure_trains_eagerly_and_says_so(tmp_path, caplog) -> None:
    """A backend that fails (as inductor does without a C++ compiler): the model still runs, eagerly, and the log
    says why. A small conv net: what happens on failure does not depend on the model."""
    from backend.training.engine import compile_model

    def broken_backend(graph, example_inputs):
        raise RuntimeError("no C++ compiler on this machine")

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU(), torch.nn.Conv2d(4, 1, 1))
    images = torch.rand(2, 3, 16, 16)
    with caplog.at_level("WARNING"):
        compiled = compile_model(model, tmp_path / "cache", backend=broken_backend)(images)
    torch._dynamo.reset()
    torch.testing.assert_close(compiled, model(images))
    assert "no C++ compiler on this machine" in caplog.text
