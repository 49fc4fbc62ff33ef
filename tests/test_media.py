import cv2  # a runtime dependency (pyproject): never skipped
import numpy as np
import pytest

from avepipe import media
from avepipe.decode import decode_file
from tests.helpers import make_clip

# (file, whole seconds T) for every shipped video: the length classes the tool must handle.
REAL_MEDIA = [
    ("sample_1s.mp4", 1), ("big_buck_bunny_432_433.webm", 1), ("fire2.mp4", 2), ("bbb_5s_6ch.mp4", 5),
    ("chaplin.mp4", 9), ("smpte-2997.mp4", 10), ("video_with_failing_audio.mp4", 11),
    ("big_buck_bunny_0_30.webm", 30), ("trailer_bbb.mp4", 55), ("bbb.mp4", 596),
]


@pytest.mark.parametrize("name,seconds", REAL_MEDIA)
def test_probe_real_media(media_dir, name, seconds):
    info = media.probe(media_dir / name)
    assert info.seconds == seconds
    assert info.width >= 320 and info.height >= 240 and info.sample_rate in (44100, 48000)


@pytest.mark.parametrize("name,channels,rate", [
    ("bbb_5s_6ch.mp4", 6, 48000), ("fire2.mp4", 1, 48000), ("smpte-2997.mp4", 2, 48000), ("chaplin.mp4", 2, 44100),
])
def test_audio_is_mono_float_at_native_rate(media_dir, name, channels, rate):
    info = media.probe(media_dir / name)
    wave, got_rate = media.decode_audio(info)
    assert got_rate == rate
    assert wave.dtype == np.float32 and wave.ndim == 1
    assert abs(len(wave) / rate - info.duration) < 0.2
    assert np.abs(wave).max() <= 1.0 + 1e-6 and np.abs(wave).mean() > 1e-4


def test_six_channels_are_averaged(tmp_path):
    # Six channels carrying one sine at different gains must average to the sine times the mean gain: a plain channel
    # mean like VGGish's wav reader, not ffmpeg's 5.1 down-mix matrix (which weights and drops channels).
    gains = [0.6, 0.1, 0.2, 0.3, 0.4, 0.5]
    pan = "pan=5.1|" + "|".join(f"c{i}={g}*c0" for i, g in enumerate(gains))
    six = make_clip(tmp_path / "six.mkv", 1.0, rate=48000, size="64x64", audio_filter=pan, audio_codec="pcm_f32le")
    one = make_clip(tmp_path / "one.mkv", 1.0, rate=48000, size="64x64", channels=1, audio_codec="pcm_f32le")
    wave, rate = media.decode_audio(media.probe(six))
    mono, _ = media.decode_audio(media.probe(one))
    assert rate == 48000 and len(wave) == len(mono) == 48000
    np.testing.assert_allclose(wave, mono * (sum(gains) / 6), atol=2e-5)  # s16 sine source


def test_resize_is_opencv_bit_for_bit(media_dir):
    info = media.probe(media_dir / "fire2.mp4")
    frames = [f.copy() for _, f in zip(range(8), media.FramePipe(info))]
    for frame in frames:
        out = np.empty((224, 224, 3), np.uint8)
        media.resize_like_opencv(frame, out=out)
        np.testing.assert_array_equal(out, cv2.resize(frame, (224, 224), interpolation=cv2.INTER_LINEAR))


@pytest.mark.parametrize("mode", ["ave", "fps"])
def test_decoded_shapes(media_dir, mode):
    frames, examples, meta = decode_file(media_dir / "chaplin.mp4", mode)
    assert frames.shape == (9, 16, 224, 224, 3) and frames.dtype == np.uint8
    assert examples.shape == (9, 96, 64) and meta["seconds"] == 9


def test_ave_sampling_picks_the_spec_frames(tmp_path):
    # Each frame of this clip has a distinct mean brightness; decoded frames must come back in spec order.
    from avepipe.sampling import ave_frame_indices

    clip = make_clip(tmp_path / "clip.mp4", 2.0, fps=25, size="96x64")
    info = media.probe(clip)
    every = [f.copy() for f in media.FramePipe(info)]
    resized = np.stack([media.resize_like_opencv(f) for f in every])
    indices = ave_frame_indices(len(every), info.duration)
    sampled, _, meta = decode_file(clip)
    assert meta["frames_indexed"] == meta["frames_decoded"] == len(every)
    np.testing.assert_array_equal(sampled, resized[indices])


# -- bad input: one typed error per class, message names the file --------------------------------------------------

def _truncate(path, fraction):
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * fraction)])
    return path


BAD_INPUTS = {
    "missing": (lambda d: d / "nope.mp4", media.MissingFileError, "missing file"),
    "not_media": (lambda d: (d / "notes.mp4").write_text("not a video\n" * 50) and d / "notes.mp4",
                  media.NotMediaError, "not a media file"),
    "empty": (lambda d: (d / "empty.mp4").write_bytes(b"") or d / "empty.mp4", media.NotMediaError, "not a media file"),
    "truncated_index": (lambda d: _truncate(make_clip(d / "cut.mp4", 3.0), 0.5), media.CorruptMediaError, "truncated"),
    "truncated_faststart": (lambda d: _truncate(make_clip(d / "cutfs.mp4", 3.0, faststart=True), 0.5),
                            media.CorruptMediaError, "truncated"),
    "truncated_webm": (lambda d: _truncate(make_clip(d / "cut.webm", 3.0), 0.6), media.CorruptMediaError, "truncated"),
    "no_video": (lambda d: make_clip(d / "sound.m4a", 2.0, video=False), media.NoVideoStreamError, "no video stream"),
    "no_audio": (lambda d: make_clip(d / "silent.mp4", 2.0, audio=False), media.NoAudioStreamError, "no audio stream"),
    "too_short": (lambda d: make_clip(d / "blink.mp4", 0.5), media.MediaTooShortError, "shorter than 1 s"),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_raises_typed_error(tmp_path, case):
    build, error, words = BAD_INPUTS[case]
    path = build(tmp_path)
    with pytest.raises(error) as caught:
        media.index(path)
    message = str(caught.value)
    assert str(path) in message and words in message
    assert "\n" not in message
