"""Evaluation metrics of the AVE papers (numpy only; numpy arrays or torch tensors are accepted).

SEL (supervised / weakly supervised event localization): per-second classification accuracy over the real seconds.
CML (cross-modality localization, A2V / V2A): the query is an event of L seconds in one modality; the answer is the
window of exactly L consecutive seconds in the other modality with the highest summed matching score, and a prediction
counts only when it is exactly the ground-truth window (same length, so same start).
"""

from __future__ import annotations

from typing import Any

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view


def _array(x: Any) -> np.ndarray:
    if hasattr(x, "detach"):  # torch tensor: may need grad dropped and a move to the CPU before numpy can read it
        x = x.detach().cpu()
    return np.asarray(x)


def segment_accuracy(pred: Any, target: Any, mask: Any = None) -> float:
    """Fraction of real seconds (``mask`` True; all when None) whose predicted class equals the target class."""
    pred, target = _array(pred), _array(target)
    if pred.shape != target.shape:
        raise ValueError(f"pred {pred.shape} and target {target.shape} differ in shape")
    correct = pred == target
    if mask is None:
        total = correct.size
        hits = int(correct.sum())
    else:
        mask = _array(mask).astype(bool)
        if mask.shape != pred.shape:
            raise ValueError(f"mask {mask.shape} and pred {pred.shape} differ in shape")
        total = int(mask.sum())
        hits = int((correct & mask).sum())
    if total == 0:
        raise ValueError("no real seconds to score")
    return hits / total


def _window_sums(scores: np.ndarray, length: int) -> np.ndarray:
    """[..., T] -> [..., T - length + 1]: the sum of each window of ``length`` consecutive positions."""
    # Summing each window directly (not cumsum differences) keeps equal windows exactly equal, so ties stay ties.
    return sliding_window_view(scores, length, axis=-1).sum(axis=-1)


def _check_length(length: int, steps: int) -> int:
    if int(length) != length or not 1 <= length <= steps:
        raise ValueError(f"window length must be an integer in 1..{steps}, got {length}")
    return int(length)


def max_contiguous_window(scores: Any, length: int) -> int:
    """Start of the window of exactly ``length`` consecutive positions with the largest sum (ties: earliest)."""
    scores = _array(scores).astype(np.float64)
    if scores.ndim != 1:
        raise ValueError(f"scores must be 1-D, got shape {scores.shape}")
    length = _check_length(length, scores.shape[0])
    return int(np.argmax(_window_sums(scores, length)))  # argmax returns the first maximum


def max_contiguous_windows(scores: Any, lengths: Any) -> np.ndarray:
    """Batched ``max_contiguous_window``: scores [N, T], lengths [N] -> starts [N] (int64)."""
    scores = _array(scores).astype(np.float64)
    lengths = _array(lengths)
    if scores.ndim != 2:
        raise ValueError(f"scores must be [N, T], got shape {scores.shape}")
    if lengths.shape != (scores.shape[0],):
        raise ValueError(f"lengths must be [{scores.shape[0]}], got shape {lengths.shape}")
    starts = np.zeros(scores.shape[0], np.int64)
    for length in np.unique(lengths):  # one vectorised pass per distinct window length
        rows = lengths == length
        length = _check_length(length, scores.shape[1])
        starts[rows] = np.argmax(_window_sums(scores[rows], length), axis=-1)
    return starts


def cml_predict(scores: Any, lengths: Any) -> np.ndarray:
    """CML decoding: scores [N, T] are per-second matching scores of the query against the other modality, lengths [N]
    the query event lengths; returns the predicted start [N] of the best window of each query's length."""
    return max_contiguous_windows(scores, lengths)


def cml_exact_match(pred_start: Any, true_start: Any) -> float:
    """Fraction of queries whose predicted window is exactly the true one (equal starts; lengths equal by design)."""
    pred_start, true_start = _array(pred_start), _array(true_start)
    if pred_start.ndim != 1 or pred_start.shape != true_start.shape:
        raise ValueError(f"expected two [N] arrays, got {pred_start.shape} and {true_start.shape}")
    if pred_start.size == 0:
        raise ValueError("no queries to score")
    return float(np.mean(pred_start == true_start))
