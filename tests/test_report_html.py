"""`avepipe localize --html`: the page, escaped and self-contained, checked in a real headless browser (Chromium): it
renders (a non-blank screenshot with the labels' colours), holds every second's label, plays the embedded (or linked)
video, and a click on a second seeks the video there and highlights it.

Chromium is Debian's ``chromium`` package (.ci/run installs it). Without it these tests skip, except in CI (``CI``
set), where they fail: the page must be tested in a browser.
"""

from __future__ import annotations

import html
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from avepipe.errors import UsageError
from avepipe.localization import SecondLabel, VideoLabels, merge_spans
from avepipe.report_html import render_report, save_report, save_reports, video_source
from avepipe.timeline import label_colour

HOSTILE = 'Male speech, man speaking <img src=x onerror="alert(1)"> & co'


def _result(video: Path, labels: list[str]) -> VideoLabels:
    seconds = []
    for s, label in enumerate(labels):
        event = 0.3 if label == "background" else 0.8
        seconds.append(SecondLabel(s, s + 1, label, event, 0.7 if label == "background" else 0.6,
                                   [{"label": label, "probability": 0.6}, {"label": "Dog", "probability": 0.2}]))
    return VideoLabels(str(video), video.stem, float(len(labels)), seconds, merge_spans(seconds),
                       model="avel supervised", checkpoint="runs/<avel>/checkpoint.pt")


@pytest.fixture(scope="module")
def chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        found = shutil.which(name)
        if found:
            return found
    message = "chromium is not installed (apt-get install -y chromium): the --html page is tested in a real browser"
    if os.environ.get("CI"):
        pytest.fail(message)
    pytest.skip(message)


def _browse(chromium: str, profile: Path, url: str, *args: str) -> subprocess.CompletedProcess:
    """Chromium, headless, offline, with its own profile; JavaScript gets 3 s of (virtual) time before the output."""
    command = [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
               "--disable-background-networking", "--disable-component-update", "--disable-sync",
               "--disable-dev-shm-usage", f"--user-data-dir={profile}", "--window-size=1200,900",
               "--virtual-time-budget=3000", *args, url]
    result = subprocess.run(command, capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stderr[-2000:]
    return result


def _selftest(chromium: str, tmp_path: Path, page: Path, second: int) -> dict:
    dom = _browse(chromium, tmp_path / f"profile-test-{second}", f"{page.as_uri()}#selftest={second}",
                  "--dump-dom").stdout
    found = re.search(r'<pre id="selftest">(.*?)</pre>', dom, re.S)
    assert found and found.group(1), dom[-2000:]
    return json.loads(html.unescape(found.group(1)))


def test_page_in_a_real_browser(chromium, media_dir, tmp_path):
    video = tmp_path / "fire & <ice>.mp4"  # a file name that needs escaping (and URL-encoding when linked)
    shutil.copy(media_dir / "fire2.mp4", video)
    result = _result(video, [HOSTILE, "background"])
    page = save_report(result, tmp_path / "report.html")

    # It renders: a screenshot that is not blank and shows the labels' colours (legend, strip, table).
    shot = tmp_path / "page.png"
    _browse(chromium, tmp_path / "profile-shot", page.as_uri(), f"--screenshot={shot}")
    with Image.open(shot) as image:
        pixels = np.asarray(image.convert("RGB")).astype(int)
    assert pixels.shape[:2] == (900, 1200) and pixels.mean(-1).var() > 100  # not one flat colour
    for label in (HOSTILE, "background"):
        close = np.abs(pixels - np.array(label_colour(label, [HOSTILE, "background"]))).max(-1) <= 3
        assert close.sum() > 500, label  # the label's colour is on the page (legend, strip, spans)

    # The DOM after the scripts ran holds every second with its label, escaped (no injected element).
    dom = _browse(chromium, tmp_path / "profile-dom", page.as_uri(), "--dump-dom").stdout
    rows = re.findall(r'<tr[^>]*data-second="(\d+)"[^>]*>(.*?)</tr>', dom, re.S)
    assert [int(s) for s, _ in rows] == [0, 1]
    assert html.escape(HOSTILE, quote=False) in rows[0][1] and "background" in rows[1][1]
    assert "<img" not in dom  # the name stayed text: no element was injected

    # Clicking second 1 seeks the embedded video there (it loaded: its duration is known) and highlights it.
    state = _selftest(chromium, tmp_path, page, 1)
    assert state["clicked"] and state["currentTime"] == 1 and state["highlighted"] == ["1", "1"], state
    assert state["duration"] == pytest.approx(2.38, abs=0.1), state
    state = _selftest(chromium, tmp_path, page, 0)
    assert state["currentTime"] == 0 and state["highlighted"] == ["0", "0"], state


def test_a_big_video_is_linked_relative_to_the_page(chromium, media_dir, tmp_path):
    video = tmp_path / "media" / "my clip.mp4"
    video.parent.mkdir()
    shutil.copy(media_dir / "fire2.mp4", video)
    page = save_report(_result(video, ["Dog", "Dog"]), tmp_path / "pages" / "clip.html", embed_limit=1000)
    text = page.read_text()
    assert 'src="../media/my%20clip.mp4"' in text and "base64" not in text
    assert len(text) < 40_000  # the page holds the labels, not the video
    state = _selftest(chromium, tmp_path, page, 1)
    assert state["currentTime"] == 1 and state["duration"] == pytest.approx(2.38, abs=0.1), state


def test_page_is_self_contained_and_escaped(media_dir, tmp_path):
    video = tmp_path / 'a "quoted" <name>.mp4'
    shutil.copy(media_dir / "sample_1s.mp4", video)
    result = _result(video, [HOSTILE])
    src, embedded = video_source(video, tmp_path / "r.html")
    assert embedded and src.startswith("data:video/mp4;base64,")
    page = render_report(result, src, embedded)
    assert "http://" not in page and "https://" not in page  # nothing is fetched from the network
    assert HOSTILE not in page and '<img src=x' not in page and html.escape(HOSTILE) in page
    assert '"quoted"' not in page and "&quot;quoted&quot;" in page
    assert "runs/&lt;avel&gt;/checkpoint.pt" in page and "avel supervised" in page
    assert page.count('data-seek="0"') == 3  # the strip cell, the table row and the span


def test_page_targets_follow_the_plot_rules(media_dir, tmp_path):
    one = _result(Path(media_dir / "sample_1s.mp4"), ["Dog"])
    two = _result(Path(media_dir / "fire2.mp4"), ["Dog", "background"])
    with pytest.raises(UsageError, match="--html"):
        save_reports([one, two], tmp_path / "both.html")
    assert not (tmp_path / "both.html").exists()
    assert [p.name for p in save_reports([one, two], f"{tmp_path / 'pages'}/")] == ["sample_1s.html", "fire2.html"]
    failed = VideoLabels("x.mp4", "x", error="x.mp4: not a media file")
    assert [p.name for p in save_reports([failed, one], tmp_path / "pages")] == ["sample_1s.html"]  # existing dir
    assert [p.name for p in save_reports([one], tmp_path / "one.html")] == ["one.html"]
