"""One entry point for "a dataset on disk": detects the layout and reads every split.

Splits are named "train", "val" and "test" whatever the layout calls them (Roboflow's "valid" becomes "val").
Val and test are read with the train split's class list, so a label index means the same class in every split.
A dataset without a train split, or whose train split has no usable image, is refused with a `DatasetError`;
an empty val/test split is returned as it is (its report says why) and left to the caller.
"""

from __future__ import annotations

from pathlib import Path

from backend.data.coco import load_coco
from backend.data.records import DatasetError, DetectionSet
from backend.data.yolo import (
    load_yolo,
    load_yolo_folders,
    read_yaml,
    read_yolo_class_names,
    yolo_names_from_yaml,
)

SPLITS = ("train", "val", "test")
# Other names tools give the same splits, checked after the canonical ones.
_SPLIT_ALIASES = {"train": ("train",), "val": ("val", "valid", "validation"), "test": ("test",)}

ACCEPTED_LAYOUTS = """\
Accepted dataset layouts:
  1. COCO folder:   <dir>/images/, <dir>/train.json, <dir>/val.json (optional <dir>/test.json)
                    COCO detection JSON, file_name relative to images/, boxes [x, y, w, h] in pixels.
  2. COCO file:     <path>.json alone; images in images/ beside it, or beside it. Read as the train split.
  3. YOLO (yaml):   <dir>/data.yaml with `names:` and `train:`/`val:`/`test:` image folders; labels in the
                    matching labels/ folders (images → labels in the path), one `class cx cy w h` line a box.
  4. YOLO (split):  <dir>/images/{train,val,test}/ + <dir>/labels/{train,val,test}/ + data.yaml or classes.txt.
  5. YOLO (flat):   <dir>/images/ + <dir>/labels/ + data.yaml or classes.txt. Read as the train split."""


def describe_layout() -> str:
    """The dataset layouts `load_dataset` accepts, as text for error messages, the CLI and the UI."""
    return ACCEPTED_LAYOUTS


def load_dataset(path: str | Path) -> dict[str, DetectionSet]:
    """Reads every split of the dataset at `path`, whatever its layout (see `describe_layout()`).

    Args:
        path: a dataset folder, a COCO JSON file or a YOLO data.yaml.

    Returns:
        {"train": ..., "val": ..., "test": ...} with the splits present (train always), boxes as (N, 4) xyxy
        original-image pixels, every split with the train split's class list.

    Raises:
        DatasetError: the layout is not recognised, the train split is missing or has no usable image, or a split
            is malformed.
    """
    path = Path(path)
    if not path.exists():
        raise DatasetError(f"dataset not found: '{path}'\n{ACCEPTED_LAYOUTS}")
    if path.is_file():
        if path.suffix.lower() == ".json":
            images_dir = path.parent / "images" if (path.parent / "images").is_dir() else path.parent
            splits = {"train": load_coco(path, images_dir)}
        elif path.suffix.lower() in (".yaml", ".yml"):
            splits = _load_yolo_yaml(path)
        else:
            raise DatasetError(f"'{path}' is neither a COCO .json nor a YOLO data.yaml\n{ACCEPTED_LAYOUTS}")
    elif (path / "train.json").is_file():
        splits = _load_coco_folder(path)
    elif (path / "data.yaml").is_file() or (path / "data.yml").is_file():
        yaml_path = path / "data.yaml" if (path / "data.yaml").is_file() else path / "data.yml"
        splits = _load_yolo_yaml(yaml_path)
    elif _yolo_split_dirs(path):
        splits = _load_yolo_split_dirs(path)
    elif (path / "images").is_dir() and (path / "labels").is_dir():
        splits = {"train": load_yolo(path)}
    else:
        hint = ""
        json_files = sorted(child.name for child in path.glob("*.json"))
        if json_files:
            hint = f" (found {', '.join(json_files)}: pass the JSON file itself, or rename it train.json)"
        raise DatasetError(f"'{path}' has no train split in a layout yolodex reads{hint}\n{ACCEPTED_LAYOUTS}")

    train = splits.get("train")
    if train is None:
        raise DatasetError(f"'{path}' has no train split\n{ACCEPTED_LAYOUTS}")
    if len(train) == 0:
        reasons = "; ".join(f"{name}: {reason}" for name, reason in train.report.images_skipped[:3])
        raise DatasetError(
            f"the train split of '{path}' has no usable images ({len(train.report.images_skipped)} skipped"
            f"{': ' + reasons if reasons else ''}); check that the images are where the annotations say"
        )
    return splits


def _load_coco_folder(folder: Path) -> dict[str, DetectionSet]:
    images_dir = folder / "images" if (folder / "images").is_dir() else folder
    splits = {"train": load_coco(folder / "train.json", images_dir)}
    for split in ("val", "test"):
        if (folder / f"{split}.json").is_file():
            splits[split] = load_coco(folder / f"{split}.json", images_dir, class_names=splits["train"].class_names)
    return splits


def _yolo_split_dirs(folder: Path) -> dict[str, str]:
    """{canonical split: folder name} of the images/<split>/ folders present."""
    found: dict[str, str] = {}
    for split, aliases in _SPLIT_ALIASES.items():
        for alias in aliases:
            if (folder / "images" / alias).is_dir():
                found[split] = alias
                break
    return found


def _load_yolo_split_dirs(folder: Path) -> dict[str, DetectionSet]:
    split_dirs = _yolo_split_dirs(folder)
    if "train" not in split_dirs:
        raise DatasetError(f"'{folder}/images' has no train/ folder\n{ACCEPTED_LAYOUTS}")
    splits = {"train": load_yolo(folder, split_dirs["train"])}
    for split in ("val", "test"):
        if split in split_dirs:
            splits[split] = load_yolo(folder, split_dirs[split], class_names=splits["train"].class_names)
    return splits


def _load_yolo_yaml(yaml_path: Path) -> dict[str, DetectionSet]:
    """Ultralytics-style data.yaml: `path:` (optional root), `train:`/`val:`/`test:` image folders, `names:`."""
    content = read_yaml(yaml_path)
    names = yolo_names_from_yaml(content, yaml_path)
    if not any(isinstance(content.get(key), str) for key in ("train", "val", "valid", "test")):
        # A data.yaml that only names the classes: the folders follow layout 4 or 5.
        folder = yaml_path.parent
        if _yolo_split_dirs(folder):
            return _load_yolo_split_dirs(folder)
        if read_yolo_class_names(folder) is not None and (folder / "images").is_dir():
            return {"train": load_yolo(folder)}
        raise DatasetError(f"'{yaml_path}' names no train: folder and '{folder}' has no images/\n{ACCEPTED_LAYOUTS}")

    root = Path(content["path"]) if isinstance(content.get("path"), str) else yaml_path.parent
    if not root.is_absolute():
        root = yaml_path.parent / root
    splits: dict[str, DetectionSet] = {}
    for split, aliases in _SPLIT_ALIASES.items():
        entry = next((content[key] for key in aliases if key in content), None)
        if entry is None:
            continue
        if not isinstance(entry, str):
            raise DatasetError(f"'{yaml_path}': `{split}:` must be one image folder, got {entry!r}")
        images_dir = _resolve_images_dir(entry, root, yaml_path)
        splits[split] = load_yolo_folders(images_dir, _labels_dir_for(images_dir), names)
    return splits


def _resolve_images_dir(entry: str, root: Path, yaml_path: Path) -> Path:
    # Roboflow writes `train: ../train/images` although its folders sit beside data.yaml; try both readings.
    candidates = [root / entry, yaml_path.parent / entry, yaml_path.parent / entry.removeprefix("../")]
    for candidate in candidates:
        if candidate.is_dir():
            return candidate
    if candidates[0].suffix == ".txt":
        raise DatasetError(f"'{yaml_path}': image list files ({entry}) are not supported; give the image folder")
    raise DatasetError(f"'{yaml_path}': image folder '{entry}' not found (looked in {candidates[0]})")


def _labels_dir_for(images_dir: Path) -> Path:
    """The labels folder Ultralytics pairs with an images folder: the last `images` path part becomes `labels`."""
    parts = list(images_dir.parts)
    for index in range(len(parts) - 1, -1, -1):
        if parts[index] == "images":
            parts[index] = "labels"
            return Path(*parts)
    return images_dir  # labels beside the images
