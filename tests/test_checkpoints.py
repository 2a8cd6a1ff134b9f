"""Checkpoints: official layouts, our own format, class transfer, strict all-or-nothing loads, atomic saves."""

from __future__ import annotations

import copy
import math
import os
import pickle
import re
import shutil
from pathlib import Path

import pytest
import torch
from torch import nn

from backend.models import (
    COCO_CLASS_NAMES,
    CheckpointError,
    YoloNAS,
    build_model,
    load_model,
    load_weights,
    read_checkpoint,
    save_checkpoint,
)
from backend.models.checkpoints import (
    NotEnoughRoom,
    atomic_save,
    checkpoint_sizes,
    ensure_room,
    extract_state_dict,
    save_inference_checkpoint,
)
from tests.test_models import randomise_batch_norms

CLASS_PRIOR_LOGIT = math.log(0.01 / 0.99)  # -4.595: the official focal-loss prior of a fresh class predictor
CLASS_PREDICTOR_KEYS = [f"heads.head{level}.cls_pred.{name}" for level in (1, 2, 3) for name in ("weight", "bias")]
# "<key>: checkpoint [a, b, ...] vs model [c, d, ...]", the line that names a mismatching key with both shapes
SHAPE_MISMATCH = re.compile(r"[\w.]+: checkpoint \[\d+(, \d+)*\] vs model \[\d+(, \d+)*\]")


def random_model(seed: int, num_classes: int = 80) -> YoloNAS:
    """A YOLO-NAS S in eval mode whose every tensor depends on `seed` (BN statistics, alphas and class biases too),
    so that two seeds give models with clearly different outputs."""
    torch.manual_seed(seed)
    model = build_model("s", num_classes)
    randomise_batch_norms(model)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.endswith(("alpha", "cls_pred.bias")):
                parameter.copy_(torch.randn(parameter.shape, generator=generator))
        for bn in model.modules():
            if isinstance(bn, nn.BatchNorm2d):  # randomise_batch_norms always uses seed 1: make them differ too
                bn.bias.add_(torch.randn(bn.bias.shape, generator=generator) * 0.1)
    return model.eval()


def outputs(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """(B, A, C + 68): class logits and DFL distributions side by side, in eval mode."""
    with torch.no_grad():
        cls_logits, reg_distri = model.eval()(images)
    return torch.cat([cls_logits, reg_distri], dim=-1)


def assert_same_weights(model: nn.Module, state_dict: dict[str, torch.Tensor]) -> None:
    loaded = model.state_dict()
    assert list(loaded) == list(state_dict)
    for key, value in state_dict.items():
        assert loaded[key].dtype == value.dtype, key
        assert torch.equal(loaded[key], value), key


@pytest.fixture(scope="module")
def source() -> YoloNAS:
    """80-class S with random weights. Shared: tests must not modify it (copy it first)."""
    return random_model(seed=11)


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return torch.rand(1, 3, 64, 96, generator=torch.Generator().manual_seed(3))


# --- official layouts ------------------------------------------------------------------------------------------


def _prefixed(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {f"module.{key}": value for key, value in state_dict.items()}  # as saved from a DDP-wrapped model


@pytest.mark.parametrize(
    ("wrap", "layout", "entry"),
    [
        pytest.param(lambda sd: {"net": sd}, "official", "net", id="net"),
        pytest.param(lambda sd: {"ema_net": None, "net": sd}, "official", "net", id="ema_net None"),
        pytest.param(lambda sd: sd, "state_dict", None, id="bare state dict"),
        pytest.param(lambda sd: {"net": _prefixed(sd)}, "official", "net", id="net with module. prefix"),
        pytest.param(lambda sd: {"ema_net": _prefixed(sd)}, "official", "ema_net", id="ema_net with module. prefix"),
        pytest.param(_prefixed, "state_dict", None, id="bare with module. prefix"),
    ],
)
def test_official_layouts_load_and_reproduce_outputs(
    tmp_path: Path, source: YoloNAS, images: torch.Tensor, wrap, layout: str, entry: str | None
) -> None:
    path = tmp_path / "weights.pth"
    torch.save(wrap(source.state_dict()), path)
    model, report = load_model(path)
    assert (report.layout, report.entry, report.size, report.num_classes) == (layout, entry, "s", 80)
    assert report.class_names == list(COCO_CLASS_NAMES)
    assert (report.fusion, model.fusion, report.imgsz, report.skipped) == ("none", "none", None, [])
    assert report.loaded == len(source.state_dict())
    assert not model.training
    assert_same_weights(model, source.state_dict())
    torch.testing.assert_close(outputs(model, images), outputs(source, images), rtol=0, atol=0)


def test_ema_net_wins_over_net(tmp_path: Path, source: YoloNAS, images: torch.Tensor) -> None:
    other = random_model(seed=12)
    ema_outputs, net_outputs = outputs(source, images), outputs(other, images)
    assert not torch.allclose(ema_outputs, net_outputs, atol=1e-2)  # otherwise the check below means nothing
    path = tmp_path / "official.pth"
    torch.save({"net": other.state_dict(), "ema_net": source.state_dict(), "epoch": 299}, path)
    model, report = load_model(path)
    assert (report.layout, report.entry) == ("official", "ema_net")
    assert_same_weights(model, source.state_dict())
    torch.testing.assert_close(outputs(model, images), ema_outputs, rtol=0, atol=0)
    assert "[ema_net]" in report.describe()


def test_float16_checkpoint_loads_as_float32(tmp_path: Path, source: YoloNAS, images: torch.Tensor) -> None:
    half = {k: v.half() if v.is_floating_point() else v for k, v in source.state_dict().items()}
    path = tmp_path / "fp16.pth"
    torch.save({"net": half}, path)
    model, report = load_model(path)
    assert report.entry == "net"
    extracted, _, _ = extract_state_dict(read_checkpoint(path))
    assert {v.dtype for v in extracted.values() if v.is_floating_point()} == {torch.float32}
    loaded = model.state_dict()
    for key, value in half.items():
        expected = value.float() if value.is_floating_point() else value
        assert loaded[key].dtype == expected.dtype, key
        assert torch.equal(loaded[key], expected), key
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    assert loaded["backbone.stem.conv.branch_3x3.conv.weight"].dtype == torch.float32
    # The rounding is real (so the check above is not vacuous), and the outputs are those of the rounded weights.
    assert not torch.equal(
        loaded["backbone.stem.conv.branch_3x3.conv.weight"],
        source.state_dict()["backbone.stem.conv.branch_3x3.conv.weight"],
    )
    rounded = build_model("s").eval()
    rounded.load_state_dict(half)
    torch.testing.assert_close(outputs(model, images), outputs(rounded, images), rtol=0, atol=0)


@pytest.mark.reference
def test_official_reference_file(reference_dir: Path) -> None:
    model, report = load_model(reference_dir / "yolo_nas_s_random_fp16.pth")
    assert (report.layout, report.entry, report.size, report.num_classes) == ("official", "net", "s", 80)
    assert (model.config.size, model.num_classes) == ("s", 80)
    assert report.class_names == list(COCO_CLASS_NAMES) and report.class_names[0] == "person"
    assert len(report.class_names) == 80 and report.class_names[-1] == "toothbrush"
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    assert report.loaded == len(model.state_dict())


# --- our checkpoints -------------------------------------------------------------------------------------------


def test_our_checkpoint_round_trip(tmp_path: Path, images: torch.Tensor) -> None:
    model = random_model(seed=21, num_classes=3)
    ema = random_model(seed=22, num_classes=3)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    for parameter in model.parameters():
        parameter.grad = torch.randn_like(parameter)
    optimizer.step()  # momentum buffers for every parameter: a non-trivial optimizer state
    model.zero_grad(set_to_none=True)
    class_names = ["cat", "dog", "traffic cone"]
    path = save_checkpoint(
        tmp_path / "run" / "last.pt",
        model,
        class_names=class_names,
        imgsz=320,
        ema=ema,
        optimizer=optimizer.state_dict(),
        epoch=7,
        metrics={"map50_95": 0.25},
    )
    assert path == tmp_path / "run" / "last.pt"
    assert os.listdir(path.parent) == ["last.pt"]

    # Inference takes the EMA weights (what training evaluated), like an official file's ema_net.
    loaded, report = load_model(path)
    assert (report.layout, report.entry, report.size, report.num_classes) == ("yolodex", "ema", "s", 3)
    assert (report.class_names, report.imgsz, report.fusion, report.skipped) == (class_names, 320, "none", [])
    assert (loaded.config.size, loaded.num_classes) == ("s", 3)
    assert_same_weights(loaded, ema.state_dict())
    torch.testing.assert_close(outputs(loaded, images), outputs(ema.eval(), images), rtol=0, atol=0)
    # Without an EMA the training weights are the model.
    save_checkpoint(tmp_path / "plain.pt", model, class_names=class_names, imgsz=320)
    plain, plain_report = load_model(tmp_path / "plain.pt")
    assert plain_report.entry == "model"
    assert_same_weights(plain, model.state_dict())

    checkpoint = read_checkpoint(path)
    assert checkpoint["format"] == 1
    assert checkpoint["epoch"] == 7 and checkpoint["metrics"] == {"map50_95": 0.25}
    assert checkpoint["config"] == {
        "size": "s",
        "num_classes": 3,
        "class_names": class_names,
        "imgsz": 320,
        "fusion": "none",
    }
    for key, value in ema.state_dict().items():
        assert torch.equal(checkpoint["ema"][key], value), key
    saved_optimizer = checkpoint["optimizer"]
    expected_optimizer = optimizer.state_dict()
    assert saved_optimizer["param_groups"] == expected_optimizer["param_groups"]
    assert len(saved_optimizer["state"]) == len(list(model.parameters()))
    for index, state in expected_optimizer["state"].items():
        assert torch.equal(saved_optimizer["state"][index]["momentum_buffer"], state["momentum_buffer"])
    # The optimizer state is usable as saved: a fresh optimizer accepts it.
    torch.optim.SGD(loaded.parameters(), lr=0.01, momentum=0.9).load_state_dict(saved_optimizer)


def test_our_checkpoint_without_ema_and_class_names_override(tmp_path: Path) -> None:
    model = random_model(seed=23, num_classes=2)
    path = save_checkpoint(tmp_path / "best.pt", model, class_names=["a", "b"], imgsz=640)
    assert read_checkpoint(path)["ema"] is None
    loaded, report = load_model(path, class_names=["left", "right"])
    assert report.class_names == ["left", "right"] and report.num_classes == 2 and report.skipped == []
    assert_same_weights(loaded, model.state_dict())
    with pytest.raises(CheckpointError, match="3 class names given for 2 classes"):
        load_model(path, num_classes=2, class_names=["a", "b", "c"])


@pytest.mark.parametrize("full", [False, True], ids=["partial", "full"])
def test_fused_models_round_trip(tmp_path: Path, images: torch.Tensor, full: bool) -> None:
    model = random_model(seed=31, num_classes=4)
    unfused = outputs(model, images)
    model.fuse(full=full)
    before = outputs(model, images)
    torch.testing.assert_close(before, unfused, rtol=1e-4, atol=1e-4)  # the fusion itself is sound
    path = save_checkpoint(tmp_path / "fused.pt", model, class_names=list("abcd"), imgsz=256)
    assert read_checkpoint(path)["config"]["fusion"] == ("full" if full else "partial")

    loaded, report = load_model(path)
    form = "full" if full else "partial"
    assert (report.fusion, loaded.fusion) == (form, form)
    assert_same_weights(loaded, model.state_dict())
    torch.testing.assert_close(outputs(loaded, images), before, rtol=0, atol=0)


def test_fused_official_weights_fuse_an_existing_model(source: YoloNAS, images: torch.Tensor) -> None:
    fused = copy.deepcopy(source).fuse(full=True)
    model = build_model("s").eval()
    assert load_weights(model, fused.state_dict()) == []
    assert model.fusion == "full"
    torch.testing.assert_close(outputs(model, images), outputs(fused, images), rtol=0, atol=0)
    with pytest.raises(CheckpointError, match="already full-fused: load first"):
        load_weights(model, source.state_dict())


def test_save_checkpoint_refuses_wrong_number_of_class_names(tmp_path: Path) -> None:
    model = build_model("s", num_classes=3)
    with pytest.raises(ValueError, match="2 class names for a model with 3 classes"):
        save_checkpoint(tmp_path / "bad.pt", model, class_names=["a", "b"], imgsz=320)
    assert list(tmp_path.iterdir()) == []


# --- transfer to another number of classes ---------------------------------------------------------------------


def test_transfer_to_fewer_classes(tmp_path: Path, source: YoloNAS, images: torch.Tensor) -> None:
    path = tmp_path / "coco.pth"
    torch.save({"net": source.state_dict()}, path)
    model, report = load_model(path, num_classes=3)
    assert (report.size, report.num_classes, model.num_classes) == ("s", 3, 3)
    assert report.class_names == ["class0", "class1", "class2"]

    source_state, state = source.state_dict(), model.state_dict()
    assert list(state) == list(source_state)
    for key, value in source_state.items():
        if key not in CLASS_PREDICTOR_KEYS:
            assert torch.equal(state[key], value), key
    assert sorted(key for key, _, _ in report.skipped) == sorted(CLASS_PREDICTOR_KEYS)
    assert report.loaded == len(source_state) - 6
    for key, checkpoint_shape, model_shape in report.skipped:
        assert checkpoint_shape == tuple(source_state[key].shape)
        assert model_shape == tuple(state[key].shape)
        assert checkpoint_shape[0] == 80 and model_shape[0] == 3 and checkpoint_shape[1:] == model_shape[1:]
    for level in (1, 2, 3):
        bias = state[f"heads.head{level}.cls_pred.bias"]
        torch.testing.assert_close(bias, torch.full((3,), CLASS_PRIOR_LOGIT))
        assert bias[0].item() == pytest.approx(-4.595, abs=1e-3)
    cls_logits, reg_distri = model(images)
    assert cls_logits.shape[-1] == 3
    # Box regression is untouched by the transfer: the DFL outputs equal the source's.
    torch.testing.assert_close(reg_distri, outputs(source, images)[..., 80:], rtol=0, atol=0)

    description = report.describe()
    assert "re-initialised" in description
    for key in CLASS_PREDICTOR_KEYS:
        assert key in description
    assert "heads.head1.cls_pred.bias [80] → [3]" in description


def test_transfer_from_class_names_and_from_our_checkpoint(tmp_path: Path) -> None:
    model = random_model(seed=41, num_classes=5)
    path = save_checkpoint(tmp_path / "five.pt", model, class_names=list("abcde"), imgsz=320)
    loaded, report = load_model(path, class_names=["x", "y"])
    assert (report.num_classes, report.class_names, report.imgsz) == (2, ["x", "y"], 320)
    assert len(report.skipped) == 6
    key = "heads.head2.reg_pred.weight"
    assert torch.equal(loaded.state_dict()[key], model.state_dict()[key])
    # 80 new classes are not COCO's just because there are 80 of them: only official files mean COCO.
    _, report = load_model(path, num_classes=80)
    assert report.class_names == [f"class{index}" for index in range(80)]


# --- errors ----------------------------------------------------------------------------------------------------


def test_wrong_size_names_key_shapes_and_the_real_size(tmp_path: Path, source: YoloNAS) -> None:
    path = tmp_path / "s.pth"
    torch.save({"net": source.state_dict()}, path)
    with pytest.raises(CheckpointError) as caught:
        load_model(path, size="m")
    message = str(caught.value)
    assert "YOLO-NAS M" in message and "look like YOLO-NAS S" in message
    assert SHAPE_MISMATCH.search(message), message
    assert "--size" in message


def test_missing_file() -> None:
    with pytest.raises(CheckpointError, match=r"not found: .*nowhere\.pth"):
        load_model(Path("/nonexistent") / "nowhere.pth")


def test_directory_is_not_a_file(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="not found"):
        load_model(tmp_path)


def _write_truncated(path: Path, source: YoloNAS) -> None:
    torch.save({"net": source.state_dict()}, path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


@pytest.mark.parametrize(
    "write",
    [
        pytest.param(lambda path, source: path.write_bytes(b""), id="empty"),
        pytest.param(_write_truncated, id="truncated"),
        pytest.param(lambda path, source: path.write_text("<html>404 Not Found</html>\n"), id="text"),
        pytest.param(lambda path, source: path.write_bytes(pickle.dumps(print, protocol=2)), id="foreign pickle"),
    ],
)
def test_unreadable_files(tmp_path: Path, source: YoloNAS, write) -> None:
    path = tmp_path / "broken.pth"
    write(path, source)
    with pytest.raises(CheckpointError, match="not a readable PyTorch checkpoint") as caught:
        load_model(path)
    assert str(path) in str(caught.value) and "download" in str(caught.value)


def test_pickle_that_is_not_a_dict(tmp_path: Path) -> None:
    path = tmp_path / "list.pth"
    torch.save([torch.zeros(3), torch.ones(2)], path)
    with pytest.raises(CheckpointError, match="holds a list, not a checkpoint or state dict"):
        load_model(path)


@pytest.mark.parametrize(
    "checkpoint",
    [
        pytest.param({"epoch": 3, "optimizer_state_dict": {}}, id="no weights"),
        pytest.param({}, id="empty dict"),
    ],
)
def test_dict_without_model_weights(tmp_path: Path, checkpoint: dict) -> None:
    path = tmp_path / "nothing.pth"
    torch.save(checkpoint, path)
    with pytest.raises(CheckpointError, match="not a YOLO-NAS checkpoint: no 'model', 'ema_net' or 'net'") as caught:
        load_model(path)
    for key in checkpoint:
        assert key in str(caught.value)


def test_state_dict_of_another_architecture(tmp_path: Path) -> None:
    other = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(), nn.LazyLinear(10))
    other(torch.rand(1, 3, 8, 8))
    for name, wrap in [("bare", lambda sd: sd), ("net", lambda sd: {"net": sd})]:
        path = tmp_path / f"{name}.pth"
        torch.save(wrap(other.state_dict()), path)
        with pytest.raises(CheckpointError, match="not a YOLO-NAS"):
            load_model(path)


def test_failed_loads_leave_the_model_untouched(source: YoloNAS, images: torch.Tensor) -> None:
    model = random_model(seed=51)
    before = copy.deepcopy(model.state_dict())
    before_outputs = outputs(model, images)
    good = source.state_dict()
    partially_fused = copy.deepcopy(source).fuse().state_dict()
    wrong_classes = random_model(seed=52, num_classes=3).state_dict()
    bad_state_dicts = {
        "other number of classes": wrong_classes,
        "a key missing": {k: v for k, v in good.items() if k != "neck.neck4.conv.conv.weight"},
        "an unexpected key": {**good, "heads.head4.cls_pred.weight": torch.zeros(80, 8, 1, 1)},
        "one shape wrong": {**good, "heads.head3.reg_pred.bias": torch.zeros(67)},
        # The fused form would fuse the model before loading: the check must come first.
        "fused, one shape wrong": {**partially_fused, "backbone.stem.conv.rbr_reparam.bias": torch.zeros(3)},
        "fused, a key missing": {k: v for k, v in partially_fused.items() if k != "heads.head1.stem.seq.bn.bias"},
    }
    for name, state_dict in bad_state_dicts.items():
        with pytest.raises(CheckpointError, match="weights do not fit YOLO-NAS S with 80 classes"):
            load_weights(model, state_dict)
        assert model.fusion == "none", name
        assert_same_weights(model, before)
    with pytest.raises(CheckpointError, match=r"missing backbone\.stem\."):
        load_weights(model, {k: v for k, v in good.items() if not k.startswith("backbone.stem.")})
    # Even with class transfer allowed, only class predictors may differ.
    with pytest.raises(CheckpointError):
        load_weights(model, {**wrong_classes, "heads.head1.reg_pred.bias": torch.zeros(5)}, allow_class_transfer=True)
    assert_same_weights(model, before)
    torch.testing.assert_close(outputs(model, images), before_outputs, rtol=0, atol=0)


# --- atomic saves ----------------------------------------------------------------------------------------------


def test_atomic_save_writes_a_complete_file(tmp_path: Path) -> None:
    payload = {"weights": torch.arange(100_000, dtype=torch.float32), "epoch": 3}
    path = atomic_save(payload, tmp_path / "new" / "folder" / "file.pt")
    assert path == tmp_path / "new" / "folder" / "file.pt"
    loaded = torch.load(path, weights_only=True)
    assert loaded["epoch"] == 3 and torch.equal(loaded["weights"], payload["weights"])
    assert os.listdir(path.parent) == ["file.pt"]
    atomic_save({"epoch": 4}, path)  # replaces an existing file
    assert torch.load(path, weights_only=True) == {"epoch": 4}
    assert os.listdir(path.parent) == ["file.pt"]


def test_atomic_save_failure_keeps_the_previous_file(tmp_path: Path) -> None:
    path = tmp_path / "last.pt"
    atomic_save({"epoch": 1, "weights": torch.ones(10)}, path)
    previous = path.read_bytes()
    # torch.save has already opened the temporary file when pickling reaches the lambda and fails.
    unpicklable = {"weights": torch.zeros(1_000_000), "schedule": lambda epoch: 0.9**epoch}
    with pytest.raises((pickle.PicklingError, AttributeError, TypeError)):
        atomic_save(unpicklable, path)
    assert path.read_bytes() == previous
    assert torch.load(path, weights_only=True)["epoch"] == 1
    assert os.listdir(tmp_path) == ["last.pt"]


@pytest.mark.parametrize("net", [None, {"backbone.stem.conv.rbr_reparam.weight": "not a tensor"}])
def test_official_entry_that_is_not_a_state_dict_is_refused(tmp_path, net) -> None:
    path = tmp_path / "odd.pth"
    torch.save({"net": net}, path)
    with pytest.raises(CheckpointError, match="not a state dict of tensors"):
        load_model(path)


# --- best.pt and the room for a run's checkpoints (issue 19) --------------------------------------------------------


def test_inference_checkpoint_holds_the_weights_and_metadata_only(tmp_path: Path, images: torch.Tensor) -> None:
    ema = random_model(seed=31, num_classes=3)
    path = save_inference_checkpoint(
        tmp_path / "best.pt",
        ema,
        class_names=["a", "b", "c"],
        imgsz=320,
        weights="ema",
        epoch=4,
        metrics={"best_map": 0.5},
        evaluation={"mAP50-95": 0.5, "mAP_large": None},
    )
    checkpoint = read_checkpoint(path)
    assert set(checkpoint) == {"format", "config", "model", "ema", "weights", "epoch", "metrics", "evaluation"}
    assert checkpoint["ema"] is None and checkpoint["weights"] == "ema" and checkpoint["epoch"] == 4
    # One copy of the weights: the file is the size of the state dict (plus a little metadata).
    weights = sum(tensor.numel() * tensor.element_size() for tensor in ema.state_dict().values())
    assert weights < path.stat().st_size < weights * 1.02
    loaded, report = load_model(path)
    assert (report.layout, report.entry, report.class_names, report.imgsz) == ("yolodex", "model", ["a", "b", "c"], 320)
    torch.testing.assert_close(outputs(loaded, images), outputs(ema.eval(), images), rtol=0, atol=0)


def test_checkpoint_sizes_bound_what_a_training_writes(tmp_path: Path) -> None:
    model, ema = random_model(seed=32, num_classes=3), random_model(seed=33, num_classes=3)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for parameter in model.parameters():
        parameter.grad = torch.randn_like(parameter)
    optimizer.step()  # both AdamW moments of every parameter: the largest optimizer state a training saves
    last = save_checkpoint(
        tmp_path / "last.pt", model, class_names=["a", "b", "c"], imgsz=64, ema=ema, optimizer=optimizer.state_dict()
    )
    best = save_inference_checkpoint(tmp_path / "best.pt", ema, class_names=["a", "b", "c"], imgsz=64, weights="ema")
    last_estimate, best_estimate = checkpoint_sizes("s", 3)
    assert last.stat().st_size * 0.98 < last_estimate < last.stat().st_size * 1.02
    assert best.stat().st_size * 0.98 < best_estimate <= best.stat().st_size


def test_ensure_room_names_the_folder_and_the_bytes(tmp_path: Path) -> None:
    (tmp_path / "kept.txt").write_text("kept")
    folder = tmp_path / "not" / "made" / "yet"  # measured on the file system it will be created on
    ensure_room(folder, 1024, "a test")
    free = shutil.disk_usage(tmp_path).free
    with pytest.raises(NotEnoughRoom) as raised:
        ensure_room(folder, free + 10**9, "this run's checkpoints")
    message = str(raised.value)
    assert message.startswith(f"not enough free space in {folder} for this run's checkpoints: ")
    assert re.search(r"[\d,]+ MB \([\d,]+ bytes\) free, about [\d,]+ MB \([\d,]+ bytes\) needed", message)
    assert not folder.parent.parent.exists() and (tmp_path / "kept.txt").read_text() == "kept"
