import numpy as np
import pytest

from avepipe.sampling import TooShortError, ave_frame_indices, frame_interval, whole_seconds


def spec_indices(n_frames: int, seconds: int) -> list[list[int]]:
    """The original AVE extraction loop, written out literally for 10-s clips."""
    interval = int(n_frames / seconds)
    return [[int(s * interval + i / 16 * interval) for i in range(16)] for s in range(seconds)]


@pytest.mark.parametrize("n_frames", [240, 241, 250, 251, 300, 160, 299])
def test_ten_second_clips_match_the_original_formula(n_frames):
    assert ave_frame_indices(n_frames, 10.0).tolist() == spec_indices(n_frames, 10)
    assert ave_frame_indices(n_frames, 10.04).tolist() == spec_indices(n_frames, 10)


@pytest.mark.parametrize(
    "duration,seconds",
    [(0.96, 1), (0.98, 1), (1.0, 1), (1.04, 1), (2.38, 2), (5.31, 5), (9.64, 9), (10.05, 10), (55.13, 55),
     (596.47, 596)],
)
def test_whole_seconds(duration, seconds):
    assert whole_seconds(duration) == seconds


@pytest.mark.parametrize("duration", [0.0, 0.5, 0.94, float("nan"), -1.0])
def test_shorter_than_one_second_is_an_error(duration):
    with pytest.raises(TooShortError):
        whole_seconds(duration)


def test_partial_last_second_uses_real_frame_rate():
    # chaplin.mp4: 241 frames in 9.64 s (25 fps) -> T = 9, interval = int(241 / 9.64) = 25 frames per second.
    assert frame_interval(241, 9.64) == 25
    indices = ave_frame_indices(241, 9.64)
    assert indices.shape == (9, 16)
    assert indices.tolist() == [[int(s * 25 + i / 16 * 25) for i in range(16)] for s in range(9)]


@pytest.mark.parametrize("n_frames,duration", [(23, 1.04), (24, 1.0), (25, 2.38), (132, 5.31), (1323, 55.13), (7, 1.0)])
def test_indices_are_in_range_and_ordered(n_frames, duration):
    indices = ave_frame_indices(n_frames, duration)
    assert indices.shape == (whole_seconds(duration), 16)
    flat = indices.reshape(-1)
    assert flat.min() >= 0 and flat.max() < n_frames
    assert np.all(np.diff(flat) >= 0)
