"""Perceptual hashing (DCT pHash, by `imagehash`) and near-duplicate grouping.

pHash as in Zauner (2010): the image in grey, shrunk to 32x32, its 2-D DCT, the 8x8 lowest frequencies (DC
included) compared with their median → 64 bits, row-major, most significant bit first, written as 16 hex digits.
Low frequencies survive resizing, re-encoding and mild colour changes, so a resized or recompressed copy lands within
a few bits while unrelated photos differ in about 32 of 64. `imagehash.phash` computes it; this module adds the
alpha handling (composited on white), array input, and the grouping.

`imagehash` replaced a hand-written OpenCV version (float32 `cv2.dct` of an INTER_AREA 32x32). Measured on 40
textured test images (tests/test_dedupe_split.py runs the same cases through both): resized JPEG copies 0-2 bits
(old) vs 0-4 bits (imagehash) from their original, a 0.4x quality-40 copy up to 6 bits with both, unrelated images
at least 18 vs 16 bits apart (mean 31 with both), so both group every case the same way at the default threshold.
The two hashes of one image differ by at most 2 bits, so hashes stored by the old code still find their copies.
One difference: the old float32 DCT of a flat (one-colour) image hashed its rounding noise (black 0x0000...,
white 0x8d50...), so blank images were not grouped; imagehash gives a flat image 0x8000000000000000 (black:
0x0000000000000000, 1 bit away), so blank images are all near duplicates of each other, which is what we want for
training data.

The grouping is a small union-find rather than `scipy.sparse.csgraph.connected_components`: the group id must be
the smallest key of the group (the oldest image id, as `backend.store.images` numbers its groups), which scipy's
arbitrary component labels would need a second pass to give, and scipy is not a direct dependency.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping

import cv2
import imagehash
import numpy as np
from PIL import Image

# Bits (of 64) within which two images count as near duplicates. Resized/recompressed copies measured 0-4 bits
# apart on our fixtures; unrelated images ~32. Raise it to also catch crops and stronger edits (more false hits).
DEFAULT_NEAR_THRESHOLD = 6
_HASH_SIZE = 8


def _grey(image: np.ndarray | Image.Image) -> np.ndarray:
    """(H, W) uint8 or float grey from a PIL image (alpha composited on white) or an (H, W[, 3|4]) RGB array."""
    if isinstance(image, Image.Image):
        if image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (image.mode == "P" and "transparency" in image.info):
            rgba = image.convert("RGBA")
            image = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)
        return np.asarray(image.convert("L"))
    array = np.asarray(image)
    if array.ndim == 3 and array.shape[2] == 4:
        array = array[:, :, :3]
    if array.ndim == 3 and array.shape[2] == 3:
        return cv2.cvtColor(np.ascontiguousarray(array), cv2.COLOR_RGB2GRAY)
    if array.ndim == 2:
        return array
    raise ValueError(f"phash expects an (H, W), (H, W, 3) RGB or (H, W, 4) RGBA image, got shape {array.shape}")


def phash(image: np.ndarray | Image.Image) -> str:
    """The 64-bit DCT perceptual hash of an image, as 16 lowercase hex digits.

    Args:
        image: a PIL image, or an (H, W) grey / (H, W, 3) RGB / (H, W, 4) RGBA array (uint8 or float).
    """
    grey = _grey(image)
    if grey.size == 0:
        raise ValueError("phash of an empty image")
    # imagehash converts to "L" and resizes to 32x32 with Lanczos; a float array arrives as a mode "F" image.
    return str(imagehash.phash(Image.fromarray(grey), hash_size=_HASH_SIZE))


def hamming(a: str, b: str) -> int:
    """Bits that differ between two hex hashes."""
    return (int(a, 16) ^ int(b, 16)).bit_count()


def hashes_to_array(hashes: list[str]) -> np.ndarray:
    """(N,) uint64 from hex hashes, for `hamming_to_many`."""
    return np.array([int(value, 16) for value in hashes], dtype=np.uint64)


def hamming_to_many(hash_hex: str, hashes: np.ndarray) -> np.ndarray:
    """(N,) int distances from one hex hash to an (N,) uint64 array of hashes."""
    return np.bitwise_count(np.bitwise_xor(hashes, np.uint64(int(hash_hex, 16)))).astype(np.int64)


class UnionFind:
    """Disjoint sets over hashable keys; the root of a set is its smallest key (stable group ids)."""

    def __init__(self) -> None:
        self.parent: dict[Hashable, Hashable] = {}

    def find(self, key: Hashable) -> Hashable:
        self.parent.setdefault(key, key)
        root = key
        while self.parent[root] != root:
            root = self.parent[root]
        while self.parent[key] != root:  # path compression
            self.parent[key], key = root, self.parent[key]
        return root

    def union(self, a: Hashable, b: Hashable) -> Hashable:
        root_a, root_b = self.find(a), self.find(b)
        if root_a == root_b:
            return root_a
        keep, merge = (root_a, root_b) if root_a < root_b else (root_b, root_a)  # type: ignore[operator]
        self.parent[merge] = keep
        return keep


def near_duplicate_groups(hashes: Mapping[Hashable, str], threshold: int = DEFAULT_NEAR_THRESHOLD) -> dict:
    """Groups keys whose hashes are within `threshold` bits, transitively (union-find over all close pairs).

    Args:
        hashes: {key (e.g. image id): hex pHash}; keys must be mutually comparable.
        threshold: the largest Hamming distance that still counts as a near duplicate.

    Returns:
        {key: group root}, the root being the smallest key of its group (a lone image is its own group).
    """
    keys = list(hashes)
    values = hashes_to_array([hashes[key] for key in keys])
    groups = UnionFind()
    for position, key in enumerate(keys):
        groups.find(key)
        if position + 1 == len(keys):
            break
        distances = hamming_to_many(hashes[key], values[position + 1 :])
        for offset in np.flatnonzero(distances <= threshold):
            groups.union(key, keys[position + 1 + int(offset)])
    return {key: groups.find(key) for key in keys}
