"""Perceptual hashing, near-duplicate grouping at ingest, and the group-aware split."""

from __future__ import annotations

import io
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image as PILImage
from sqlalchemy import select

from backend.data.dedupe import DEFAULT_NEAR_THRESHOLD, hamming, near_duplicate_groups, phash
from backend.data.split import group_split
from backend.store.db import init_db, session_scope
from backend.store.images import add_image_bytes
from backend.store.models import Image, get_or_create_project
from tests.conftest import encode_image as encode
from tests.conftest import textured_image


def textured(seed: int, size: tuple[int, int] = (160, 120)) -> np.ndarray:
    return textured_image(seed, size)


def resized_jpeg(pixels: np.ndarray, scale: float = 0.6, quality: int = 70) -> bytes:
    height, width = pixels.shape[:2]
    small = cv2.resize(pixels, (int(width * scale), int(height * scale)), interpolation=cv2.INTER_AREA)
    return encode(small, "JPEG", quality=quality)


def test_phash_is_64_bits_of_hex_and_stable_across_input_types() -> None:
    pixels = textured(0)
    value = phash(pixels)
    assert len(value) == 16 and int(value, 16) >= 0
    assert phash(PILImage.fromarray(pixels)) == value
    assert hamming(value, value) == 0
    assert hamming("0" * 16, "f" * 16) == 64


def test_a_resized_recompressed_copy_is_near_and_other_images_are_far() -> None:
    originals = [textured(seed) for seed in range(12)]
    hashes = [phash(pixels) for pixels in originals]
    copy = phash(PILImage.open(io.BytesIO(resized_jpeg(originals[0]))))
    assert hamming(hashes[0], copy) <= DEFAULT_NEAR_THRESHOLD
    unrelated = [hamming(hashes[i], hashes[j]) for i in range(12) for j in range(i + 1, 12)]
    assert min(unrelated) > DEFAULT_NEAR_THRESHOLD
    assert np.mean(unrelated) > 20


def _opencv_phash(pixels: np.ndarray) -> str:
    """The hand-written pHash that backend/data/dedupe.py used before imagehash (float32 cv2.dct of an INTER_AREA
    32x32 grey), kept here only to show that both group the near-duplicate cases the same way."""
    grey = cv2.cvtColor(pixels, cv2.COLOR_RGB2GRAY).astype(np.float32)
    low = cv2.dct(cv2.resize(grey, (32, 32), interpolation=cv2.INTER_AREA))[:8, :8]
    return f"{int(''.join('1' if bit else '0' for bit in (low > np.median(low)).reshape(-1)), 2):016x}"


def test_imagehash_groups_the_near_duplicate_cases_like_the_hand_written_hash() -> None:
    """Originals, resized/recompressed copies (mild and strong) and unrelated images: the same groups either way."""
    decode = lambda data: np.asarray(PILImage.open(io.BytesIO(data)).convert("RGB"))  # noqa: E731
    cases: dict[str, np.ndarray] = {}
    for seed in range(12):
        original = textured(seed)
        cases[f"{seed:02d}-original"] = original
        cases[f"{seed:02d}-copy"] = decode(resized_jpeg(original))
        if seed % 3 == 0:
            cases[f"{seed:02d}-strong-copy"] = decode(resized_jpeg(original, 0.4, 40))
    ours = {name: phash(pixels) for name, pixels in cases.items()}
    before = {name: _opencv_phash(pixels) for name, pixels in cases.items()}
    groups = near_duplicate_groups(ours)
    assert groups == near_duplicate_groups(before)
    assert sorted(set(groups.values())) == [f"{seed:02d}-copy" for seed in range(12)]  # one group per original
    # Hashes stored by the old code still find their copies: both hashes of one image are at most 2 bits apart.
    assert max(hamming(ours[name], before[name]) for name in cases) <= 2


def test_blank_images_of_any_colour_are_near_duplicates_of_each_other() -> None:
    """imagehash gives a flat image 0x8000000000000000 (black 0x0000000000000000, 1 bit away); the old float32 DCT
    hashed rounding noise instead."""
    colours = [(0, 0, 0), (255, 255, 255), (200, 10, 10), (10, 200, 10), (128, 128, 128)]
    blanks = {colour: np.full((50, 70, 3), colour, dtype=np.uint8) for colour in colours}
    assert {phash(pixels) for pixels in blanks.values()} == {"8000000000000000", "0000000000000000"}
    assert len(set(near_duplicate_groups({c: phash(p) for c, p in blanks.items()}).values())) == 1
    assert len(set(near_duplicate_groups({c: _opencv_phash(p) for c, p in blanks.items()}).values())) > 1


def test_grouping_is_transitive() -> None:
    hashes = {1: "0000000000000000", 2: "000000000000000f", 3: "00000000000000ff", 4: "ffffffffffffffff"}
    groups = near_duplicate_groups(hashes, threshold=4)  # 1~2 (4 bits), 2~3 (4 bits), 1 and 3 are 8 apart
    assert groups == {1: 1, 2: 1, 3: 1, 4: 4}
    assert near_duplicate_groups(hashes, threshold=3) == {1: 1, 2: 2, 3: 3, 4: 4}


def test_ingest_marks_near_duplicates_and_merges_groups(tmp_path: Path) -> None:
    engine = init_db(f"sqlite:///{tmp_path / 'db.sqlite'}")
    storage = tmp_path / "storage"
    base = textured(5)
    with session_scope(engine) as session:
        project = get_or_create_project(session, "dex")
        original = add_image_bytes(session, storage, project, encode(base), source="upload", original_name="a.png")
        copy = add_image_bytes(session, storage, project, resized_jpeg(base), source="upload", original_name="b.jpg")
        other = add_image_bytes(session, storage, project, encode(textured(6)), source="upload", original_name="c.png")
        looser = add_image_bytes(
            session, storage, project, resized_jpeg(base, 0.4, 40), source="upload", near_threshold=64
        )
    assert original.status == "accepted" and other.status == "accepted"
    assert copy.status == "near_duplicate" and copy.similar_to == original.image_id
    assert copy.near_group == original.image_id and copy.distance <= DEFAULT_NEAR_THRESHOLD
    # With a threshold that matches everything, the new image joins and merges both groups into the oldest id.
    assert looser.status == "near_duplicate" and looser.near_group == original.image_id
    with session_scope(engine) as session:
        rows = session.execute(select(Image.id, Image.status, Image.near_group).order_by(Image.id)).all()
    assert [(row.status, row.near_group) for row in rows] == [
        ("ok", original.image_id),
        ("near_duplicate", original.image_id),
        ("ok", original.image_id),
        ("near_duplicate", original.image_id),
    ]


def test_group_split_never_straddles_and_meets_the_fractions() -> None:
    rng = np.random.default_rng(0)
    ids = list(range(1, 401))
    groups = {image_id: int(rng.integers(0, 60)) if image_id % 3 == 0 else None for image_id in ids}
    split = group_split(ids, groups, (0.7, 0.2, 0.1), seed=3)
    assert set(split) == set(ids)
    by_group: dict[int, set[str]] = {}
    for image_id, group in groups.items():
        if group is not None:
            by_group.setdefault(group, set()).add(split[image_id])
    assert all(len(splits) == 1 for splits in by_group.values())
    counts = {name: sum(1 for value in split.values() if value == name) for name in ("train", "val", "test")}
    assert counts["train"] == pytest.approx(280, abs=8)
    assert counts["val"] == pytest.approx(80, abs=8)
    assert counts["test"] == pytest.approx(40, abs=8)


def test_group_split_is_seeded_and_order_independent() -> None:
    ids = list(range(50))
    first = group_split(ids, None, (0.8, 0.2), seed=1)
    assert group_split(list(reversed(ids)), {}, (0.8, 0.2), seed=1) == first
    assert group_split(ids, None, (0.8, 0.2), seed=2) != first
    assert sum(1 for value in first.values() if value == "val") == 10


@pytest.mark.parametrize("fractions", [(0.5, 0.4), (0.8,), (1.1, -0.1), (0.0, 1.0), (0.6, 0.2, 0.1, 0.1)])
def test_group_split_rejects_bad_fractions(fractions) -> None:
    with pytest.raises(ValueError, match="fractions"):
        group_split([1, 2, 3], None, fractions, seed=0)
