#!/usr/bin/env python3
"""Open an HTML report in headless Chromium: check that every image shows, take a screenshot.

A tiny Chrome DevTools Protocol client over ``--remote-debugging-pipe`` (JSON messages ending in
NUL on file descriptors 3 and 4): standard library only, nothing to download, no websocket.
Needs Debian's ``chromium`` (``apt-get install -y --no-install-recommends chromium``).

    python tools/html_report_chromium.py REPORT/index.html                  # image check
    python tools/html_report_chromium.py REPORT/index.html --screenshot docs/report.png

From Python: ``load_page(path)`` returns what the page showed (every ``<img>`` with its
``naturalWidth`` after the load event), ``screenshot(path, png)`` writes a full-page PNG.
"""

from __future__ import annotations

import argparse
import base64
import fcntl
import json
import os
import select
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["ImageState", "PageState", "chromium_binary", "load_page", "screenshot"]

# The flags of the brief: no sandbox (root in a container), no GPU, no network side traffic, and
# a fresh profile per run so that nothing cached from an earlier run can make an image appear.
FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--remote-debugging-pipe",
)
CANDIDATES = ("chromium", "chromium-browser", "google-chrome", "chrome")
IMAGES_JS = (
    "Array.from(document.images).map(i => ({src: i.getAttribute('src'), alt: i.alt, "
    "complete: i.complete, naturalWidth: i.naturalWidth, naturalHeight: i.naturalHeight}))"
)


class ChromiumError(RuntimeError):
    """Chromium is missing, exited, or did not answer in time."""


@dataclass(frozen=True)
class ImageState:
    src: str
    alt: str
    complete: bool
    natural_width: int
    natural_height: int

    @property
    def shown(self) -> bool:
        # A broken image is "complete" too; only a decoded one has a natural size.
        return self.complete and self.natural_width > 0 and self.natural_height > 0


@dataclass(frozen=True)
class PageState:
    title: str
    images: tuple[ImageState, ...]
    text: str

    @property
    def broken(self) -> list[str]:
        return [image.src for image in self.images if not image.shown]


def chromium_binary() -> str | None:
    """The path of a Chromium/Chrome on PATH (``$CHROMIUM`` wins), or None."""
    named = os.environ.get("CHROMIUM")
    if named:
        return shutil.which(named)
    for name in CANDIDATES:
        found = shutil.which(name)
        if found:
            return found
    return None


class _Pipe:
    """Request/response over Chromium's debugging pipe; events are kept until asked for."""

    def __init__(self, to_browser: int, from_browser: int, timeout: float) -> None:
        self._out, self._in = to_browser, from_browser
        self._timeout = timeout
        self._buffer = b""
        self._next_id = 0
        self._events: list[dict[str, Any]] = []

    def _read_message(self, deadline: float) -> dict[str, Any]:
        while b"\0" not in self._buffer:
            left = deadline - time.monotonic()
            if left <= 0:
                raise ChromiumError(f"chromium did not answer within {self._timeout:.0f} s")
            ready, _, _ = select.select([self._in], [], [], left)
            if ready:
                chunk = os.read(self._in, 1 << 20)
                if not chunk:
                    raise ChromiumError("chromium closed the debugging pipe (did it crash?)")
                self._buffer += chunk
        raw, self._buffer = self._buffer.split(b"\0", 1)
        message: dict[str, Any] = json.loads(raw)
        return message

    def call(self, method: str, session: str | None = None, **params: Any) -> dict[str, Any]:
        self._next_id += 1
        request: dict[str, Any] = {"id": self._next_id, "method": method, "params": params}
        if session is not None:
            request["sessionId"] = session
        os.write(self._out, json.dumps(request).encode() + b"\0")
        deadline = time.monotonic() + self._timeout
        while True:
            message = self._read_message(deadline)
            if message.get("id") == self._next_id:
                if "error" in message:
                    raise ChromiumError(f"{method} failed: {message['error']}")
                result: dict[str, Any] = message.get("result", {})
                return result
            if "method" in message:
                self._events.append(message)

    def wait_for(self, method: str, session: str) -> dict[str, Any]:
        deadline = time.monotonic() + self._timeout
        while True:
            for index, event in enumerate(self._events):
                if event["method"] == method and event.get("sessionId") == session:
                    del self._events[index]
                    return event
            message = self._read_message(deadline)
            if "method" in message:
                self._events.append(message)


def _on_fds_3_and_4(read_fd: int, write_fd: int) -> Callable[[], None]:
    """A child-side hook that puts ``read_fd`` on 3 and ``write_fd`` on 4. Both are first
    copied above 10, so neither is overwritten by the other's move when one of them already
    sits on 3 or 4."""

    def move() -> None:
        high_read = fcntl.fcntl(read_fd, fcntl.F_DUPFD_CLOEXEC, 10)
        high_write = fcntl.fcntl(write_fd, fcntl.F_DUPFD_CLOEXEC, 10)
        os.dup2(high_read, 3)  # dup2 makes the copy inheritable
        os.dup2(high_write, 4)

    return move


@contextmanager
def _browser(timeout: float) -> Iterator[_Pipe]:
    binary = chromium_binary()
    if binary is None:
        raise ChromiumError(
            "no chromium on PATH; install Debian's: apt-get install -y --no-install-recommends "
            "chromium (or set $CHROMIUM)"
        )
    profile = tempfile.mkdtemp(prefix="neuronwatch-chromium-")
    # fd 3: what chromium reads (our commands); fd 4: what it writes (answers and events).
    commands_r, commands_w = os.pipe()
    answers_r, answers_w = os.pipe()
    process = subprocess.Popen(
        [binary, *FLAGS, f"--user-data-dir={profile}", "about:blank"],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        # Only descriptors marked inheritable survive exec (PEP 446), i.e. stdio and the two
        # that _on_fds_3_and_4 creates; subprocess's own close_fds would close those.
        close_fds=False,
        preexec_fn=_on_fds_3_and_4(commands_r, answers_w),
    )
    os.close(commands_r)
    os.close(answers_w)
    pipe = _Pipe(commands_w, answers_r, timeout)
    try:
        yield pipe
    finally:
        with suppress(ChromiumError, OSError):
            pipe.call("Browser.close")
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        os.close(commands_w)
        os.close(answers_r)
        shutil.rmtree(profile, ignore_errors=True)


def _open(pipe: _Pipe, page: Path, width: int, height: int) -> str:
    """Open ``page`` in a new tab of ``width`` x ``height`` and wait for its load event (every
    image has loaded or failed by then); returns the tab's session id."""
    target = pipe.call("Target.createTarget", url="about:blank")["targetId"]
    session: str = pipe.call("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]
    pipe.call("Page.enable", session)
    pipe.call(
        "Emulation.setDeviceMetricsOverride",
        session,
        width=width,
        height=height,
        deviceScaleFactor=1,
        mobile=False,
    )
    navigated = pipe.call("Page.navigate", session, url=page.resolve().as_uri())
    if navigated.get("errorText"):
        raise ChromiumError(f"chromium could not open {page}: {navigated['errorText']}")
    pipe.wait_for("Page.loadEventFired", session)
    return session


def _evaluate(pipe: _Pipe, session: str, expression: str) -> Any:
    answer = pipe.call("Runtime.evaluate", session, expression=expression, returnByValue=True)
    if "exceptionDetails" in answer:
        raise ChromiumError(f"page script failed: {answer['exceptionDetails']}")
    return answer["result"].get("value")


def load_page(page: Path, width: int = 1280, height: int = 900, timeout: float = 60.0) -> PageState:
    """Load ``page`` (a local HTML file) and report its title, text and every image's state."""
    if not page.is_file():
        raise FileNotFoundError(f"{page} does not exist")
    with _browser(timeout) as pipe:
        session = _open(pipe, page, width, height)
        images = _evaluate(pipe, session, IMAGES_JS)
        title = _evaluate(pipe, session, "document.title")
        text = _evaluate(pipe, session, "document.body ? document.body.innerText : ''")
    return PageState(
        title=str(title),
        text=str(text),
        images=tuple(
            ImageState(
                src=str(i["src"]),
                alt=str(i["alt"]),
                complete=bool(i["complete"]),
                natural_width=int(i["naturalWidth"]),
                natural_height=int(i["naturalHeight"]),
            )
            for i in images
        ),
    )


def screenshot(
    page: Path, png: Path, width: int = 1280, height: int = 900, timeout: float = 60.0
) -> Path:
    """Write a PNG of the whole of ``page`` (``width`` CSS pixels wide, as tall as the page)."""
    with _browser(timeout) as pipe:
        session = _open(pipe, page, width, height)
        metrics = pipe.call("Page.getLayoutMetrics", session)
        size = metrics["cssContentSize"]
        full_height = max(height, int(size["height"] + 0.5))
        shot = pipe.call(
            "Page.captureScreenshot",
            session,
            format="png",
            captureBeyondViewport=True,
            clip={"x": 0, "y": 0, "width": width, "height": full_height, "scale": 1},
        )
    data = base64.b64decode(shot["data"])
    png.parent.mkdir(parents=True, exist_ok=True)
    # Temp file + rename: a failed run never leaves half a PNG in docs/.
    fd, tmp = tempfile.mkstemp(prefix=f".{png.name}.", suffix=".tmp", dir=png.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        os.chmod(tmp, 0o644)
        os.replace(tmp, png)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return png


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("page", type=Path, help="an index.html written by neuronwatch plot")
    parser.add_argument("--screenshot", type=Path, help="write a full-page PNG here")
    parser.add_argument("--width", type=int, default=1280, help="viewport width in CSS pixels")
    args = parser.parse_args(argv)
    try:
        state = load_page(args.page, width=args.width)
        for image in state.images:
            status = "shown" if image.shown else "BROKEN"
            print(f"{status}: {image.src} ({image.natural_width}x{image.natural_height})")
        if args.screenshot is not None:
            screenshot(args.page, args.screenshot, width=args.width)
            print(f"wrote {args.screenshot}")
    except (ChromiumError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 1 if state.broken or not state.images else 0


if __name__ == "__main__":
    sys.exit(main())
