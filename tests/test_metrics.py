from __future__ import annotations

import numpy as np
import pytest
import torch

from avepipe.metrics import (
    cml_exact_match,
    cml_predict,
    max_contiguous_window,
    max_contiguous_windows,
    segment_accuracy,
)


def _brute_force_window(scores, length: int) -> int:
    best_start, best_sum = None, None
    for start in range(len(scores) - length + 1):
        total = sum(float(v) for v in scores[start : start + length])
        if best_sum is None or total > best_sum:  # strict: the earliest maximum wins
            best_start, best_sum = start, total
    return best_start


@pytest.mark.parametrize("integer_scores", [False, True])  # small integers make ties frequent
def test_max_contiguous_window_matches_brute_force(integer_scores: bool) -> None:
    rng = np.random.default_rng(0)
    for _ in range(500):
        steps = int(rng.integers(1, 16))
        scores = rng.integers(-2, 3, steps).astype(float) if integer_scores else rng.normal(size=steps)
        for length in range(1, steps + 1):
            assert max_contiguous_window(scores, length) == _brute_force_window(scores, length)


def test_max_contiguous_window_ties_and_errors() -> None:
    assert max_contiguous_window([1, 1, 1, 1], 2) == 0
    assert max_contiguous_window([0, 5, 0, 5, 0], 1) == 1
    assert max_contiguous_window([0, 0, 3, 3, 0, 3, 3], 2) == 2
    assert max_contiguous_window([9, -2, 0, 0, 4, 4], 3) == 3  # 0+4+4 beats 9-2+0
    assert max_contiguous_window([9, -1, 0, 0, 4, 4], 3) == 0  # 9-1+0 ties 0+4+4: earliest
    assert max_contiguous_window(np.arange(10), 10) == 0
    for bad in (0, 11, 2.5):
        with pytest.raises(ValueError):
            max_contiguous_window(np.zeros(10), bad)
    with pytest.raises(ValueError):
        max_contiguous_window(np.zeros((2, 10)), 2)


def test_batched_windows_match_single() -> None:
    rng = np.random.default_rng(1)
    scores = rng.integers(-3, 4, (300, 10)).astype(np.float32)
    lengths = rng.integers(1, 11, 300)
    starts = max_contiguous_windows(scores, lengths)
    assert starts.dtype == np.int64 and starts.shape == (300,)
    expected = [_brute_force_window(s, int(n)) for s, n in zip(scores, lengths)]
    np.testing.assert_array_equal(starts, expected)
    np.testing.assert_array_equal(cml_predict(torch.from_numpy(scores), torch.from_numpy(lengths)), expected)
    with pytest.raises(ValueError):
        max_contiguous_windows(scores, lengths[:-1])
    with pytest.raises(ValueError):
        max_contiguous_windows(scores, np.full(300, 11))


def test_cml_decoding_and_exact_match() -> None:
    # Query lengths 3, 2, 4; the true windows start at 2, 5, 0.
    scores = np.array(
        [
            [0, 0, 1, 1, 1, 0, 0, 0, 0, 0],  # best 3-window starts at 2
            [0, 0, 0, 0, 0, 1, 1, 0, 0, 0],  # best 2-window starts at 5
            [0, 0, 0, 0, 0, 0, 1, 1, 1, 1],  # best 4-window starts at 6, not 0: a miss
        ],
        dtype=float,
    )
    pred = cml_predict(scores, [3, 2, 4])
    np.testing.assert_array_equal(pred, [2, 5, 6])
    assert cml_exact_match(pred, [2, 5, 0]) == pytest.approx(2 / 3)
    assert cml_exact_match(torch.tensor([1, 2]), torch.tensor([1, 2])) == 1.0
    # One second off is a miss: only the exact window counts.
    assert cml_exact_match([3], [2]) == 0.0
    with pytest.raises(ValueError):
        cml_exact_match([1, 2], [1])
    with pytest.raises(ValueError):
        cml_exact_match([], [])


def test_segment_accuracy_with_mask() -> None:
    pred = np.array([[1, 2, 3, 28], [5, 5, 28, 28]])
    target = np.array([[1, 2, 0, 28], [5, 4, 28, 1]])
    assert segment_accuracy(pred, target) == pytest.approx(5 / 8)
    mask = np.array([[1, 1, 1, 0], [1, 1, 0, 0]], dtype=bool)  # padded seconds are not scored
    assert segment_accuracy(pred, target, mask) == pytest.approx(3 / 5)
    assert segment_accuracy(torch.tensor(pred), torch.tensor(target), torch.tensor(mask)) == pytest.approx(3 / 5)
    with pytest.raises(ValueError):
        segment_accuracy(pred, target[:, :3])
    with pytest.raises(ValueError):
        segment_accuracy(pred, target, np.zeros_like(mask))
    with pytest.raises(ValueError):
        segment_accuracy(pred, target, mask[:, :3])
