"""A seeded train/val(/test) split that keeps every near-duplicate group inside one split.

Random per-image splitting lets a resized copy of a training photo sit in validation, where the model has in
effect already seen it, inflating the score. Groups are shuffled with the seed, then placed largest first, each
into the split furthest below its target count: fractions are met to within about one group's size.

Why not scikit-learn's `GroupShuffleSplit`: its `test_size` is a share of the *groups*, not of the images, so one
big near-duplicate group can move the image counts far from the fractions, and it splits two ways only (a test
split would need a second, nested split). Meeting image fractions over three splits needs this placement anyway,
and scikit-learn is not otherwise a dependency.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import numpy as np

SPLIT_NAMES = ("train", "val", "test")


def check_fractions(fractions: Sequence[float]) -> tuple[float, ...]:
    """Validates (train, val[, test]) fractions: 2 or 3 non-negative numbers summing to 1, train > 0."""
    values = tuple(float(value) for value in fractions)
    if len(values) not in (2, 3):
        raise ValueError(f"split fractions must be (train, val) or (train, val, test), got {fractions!r}")
    if any(not np.isfinite(value) or value < 0 for value in values) or values[0] <= 0:
        raise ValueError(f"split fractions must be non-negative with train > 0, got {fractions!r}")
    if abs(sum(values) - 1.0) > 1e-6:
        raise ValueError(f"split fractions must sum to 1, got {fractions!r} (sum {sum(values):.4f})")
    return values


def group_split(
    image_ids: Sequence[Any],  # sortable and hashable
    groups: Mapping[Hashable, Hashable | None] | None = None,
    fractions: Sequence[float] = (0.8, 0.2),
    seed: int = 0,
) -> dict[Hashable, str]:
    """Assigns each image to "train", "val" or "test", never splitting a group.

    Args:
        image_ids: the images to split (any sortable ids; their order does not matter).
        groups: {image id: group key}; images sharing a key go to the same split. Missing or None = a group of one.
        fractions: (train, val) or (train, val, test), summing to 1.
        seed: the same ids, groups, fractions and seed always give the same split.

    Returns:
        {image id: split name}.
    """
    values = check_fractions(fractions)
    groups = groups or {}
    members: dict[Hashable, list[Any]] = {}  # ids are sortable (see Args)
    for image_id in sorted(set(image_ids)):  # sorted: independent of the caller's order
        key = groups.get(image_id)
        members.setdefault(("group", key) if key is not None else ("image", image_id), []).append(image_id)

    ordered = sorted(members.values(), key=lambda ids: ids[0])
    permutation = np.random.default_rng(seed).permutation(len(ordered))
    shuffled = [ordered[index] for index in permutation]
    shuffled.sort(key=len, reverse=True)  # stable: equal sizes keep their shuffled order

    total = sum(len(ids) for ids in shuffled)
    names = SPLIT_NAMES[: len(values)]
    targets = [fraction * total for fraction in values]
    counts = [0] * len(values)
    assignment: dict[Hashable, str] = {}
    for ids in shuffled:
        # The split furthest below its target (ties: train, then val, then test) takes the whole group.
        deficits = [target - count if target > 0 else -np.inf for target, count in zip(targets, counts)]
        chosen = int(np.argmax(deficits))
        counts[chosen] += len(ids)
        for image_id in ids:
            assignment[image_id] = names[chosen]
    return assignment
