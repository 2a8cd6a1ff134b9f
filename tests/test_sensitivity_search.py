"""The prefix-length search of the automatic float policy (`choose_float_nodes`), on its own: which length it finds
and which lengths it measures, for every pass/fail pattern of a short ranking.

Each measured length costs one INT8 quantization and one evaluation, so the number of calls matters as much as the
answer. The policy on a real quantization is `tests/test_quantize_pipeline.py`'s.
"""

from __future__ import annotations

import math

import pytest

from backend.quantization.sensitivity import _shortest_passing_prefix


def _search(longest: int, first_passing: int | None) -> tuple[int | None, list[int]]:
    """Runs the search where lengths from `first_passing` on pass (None: none passes); returns (answer, calls)."""
    calls: list[int] = []

    def passes(length: int) -> bool:
        assert 0 <= length <= longest, f"measured length {length} outside 0..{longest}"
        calls.append(length)
        return first_passing is not None and length >= first_passing

    return _shortest_passing_prefix(passes, longest), calls


@pytest.mark.parametrize("longest", range(0, 20))
def test_the_shortest_passing_length_is_found_with_few_measurements(longest: int) -> None:
    for first_passing in range(longest + 1):
        found, calls = _search(longest, first_passing)
        assert found == first_passing
        assert len(calls) == len(set(calls)), f"a length was measured twice: {calls}"
        # doubling reaches the answer in about log2 steps, bisection closes the gap in as many again
        assert len(calls) <= 2 * math.ceil(math.log2(first_passing + 1)) + 2, calls


def test_doubling_then_bisection_order() -> None:
    assert _search(6, 3) == (3, [0, 1, 2, 4, 3])
    assert _search(6, 0) == (0, [0])
    assert _search(6, 6) == (6, [0, 1, 2, 4, 6, 5])


@pytest.mark.parametrize("longest", [0, 1, 5, 8])
def test_none_when_even_every_layer_in_float_fails(longest: int) -> None:
    found, calls = _search(longest, None)
    assert found is None
    assert calls[-1] == longest and len(calls) == len(set(calls))
