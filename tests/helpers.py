"""Test helpers: small synthetic media files made with ffmpeg's lavfi sources (no assets needed), the CLI as a user
runs it, and a loopback HTTP file server for the download tests."""

from __future__ import annotations

import re
import subprocess
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote

from avepipe.media import ffmpeg_binary


def make_clip(path: Path, seconds: float = 1.0, *, size: str = "320x240", fps: int = 25, video: bool = True,
              audio: bool = True, channels: int = 2, rate: int = 44100, pattern: str = "testsrc2",
              faststart: bool = False, freq: int = 440, audio_filter: str | None = None,
              audio_codec: str | None = None) -> Path:
    args = [ffmpeg_binary(), "-y", "-hide_banner", "-loglevel", "error"]
    if video:
        args += ["-f", "lavfi", "-i", f"{pattern}=size={size}:rate={fps}:duration={seconds}"]
    if audio:
        layout = {1: "mono", 2: "stereo", 6: "5.1"}[channels]
        args += ["-f", "lavfi", "-i", f"sine=frequency={freq}:sample_rate={rate}:duration={seconds}",
                 "-af", audio_filter or f"aformat=channel_layouts={layout}"]
    if video:
        args += ["-c:v", "libx264", "-pix_fmt", "yuv420p", "-g", "12"] if path.suffix in (".mp4", ".mkv") else []
    if audio and (audio_codec or path.suffix in (".mp4", ".m4a")):
        args += ["-c:a", audio_codec or "aac"]
    if faststart:
        args += ["-movflags", "+faststart"]
    args += ["-t", str(seconds), str(path)]
    subprocess.run(args, check=True)
    return path


def run_cli(*args, timeout: float = 900, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """Run ``python -m avepipe ARGS`` the way a user would (``env``: variables to add); wide terminal so rich does not
    wrap messages."""
    import os
    import sys

    return subprocess.run([sys.executable, "-m", "avepipe", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "COLUMNS": "200", **(env or {})})


class FileServer:
    """A loopback HTTP server (127.0.0.1, a free port) for download tests. Serves ``files`` (name -> bytes) with Range
    support; ``cuts[name]`` responses are cut half way, ``corrupt``
    names get one byte changed, ``ignore_range`` answers every request with the whole file (200)."""

    def __init__(self, files: dict[str, bytes]):
        self.files = dict(files)
        self.cuts: dict[str, int] = {}
        self.corrupt: set[str] = set()
        self.ignore_range = False
        self.endless: set[str] = set()  # names answered with a body that never ends (no Content-Length)
        self.log: list[tuple[str, str | None, int]] = []  # (file, Range header, status)
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:  # keep pytest output clean
                pass

            def do_GET(self) -> None:
                owner.handle(self)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()

    def handle(self, request: BaseHTTPRequestHandler) -> None:
        name = unquote(request.path.lstrip("/"))
        asked = request.headers.get("Range")
        data = self.files.get(name)
        if data is None:
            self.log.append((name, asked, 404))
            request.send_error(404)
            return
        if name in self.corrupt:
            data = data[:100] + bytes([data[100] ^ 0xFF]) + data[101:]
        if name in self.endless:
            self.log.append((name, asked, 200))
            request.send_response(200)
            request.end_headers()
            try:
                while True:  # until the client hangs up
                    request.wfile.write(data)
            except OSError:
                return
        start, status = 0, 200
        if asked and not self.ignore_range:
            start = int(re.fullmatch(r"bytes=(\d+)-", asked).group(1))
            if start >= len(data):
                self.log.append((name, asked, 416))
                request.send_response(416)
                request.send_header("Content-Range", f"bytes */{len(data)}")
                request.send_header("Content-Length", "0")
                request.end_headers()
                return
            status = 206
        body = memoryview(data)[start:]
        self.log.append((name, asked, status))
        request.send_response(status)
        if status == 206:
            request.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        request.send_header("Content-Length", str(len(body)))
        request.end_headers()
        if self.cuts.get(name, 0) > 0:  # announce the whole body, send half, hang up
            self.cuts[name] -= 1
            request.wfile.write(body[: len(body) // 2])
            request.close_connection = True
            return
        request.wfile.write(body)

    def requests_for(self, name: str) -> list[tuple[str | None, int]]:
        return [(asked, status) for file, asked, status in self.log if file == name]

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
