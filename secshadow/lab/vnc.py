"""A real VNC server for tests and the demo: TigerVNC's standalone ``Xvnc``.

:func:`run_xvnc` starts ``Xvnc :N -rfbport P -SecurityTypes None -localhost`` on a free
display number and a free TCP port, waits until the RFB port greets with a
ProtocolVersion (RFC 6143 section 7.1.1), paints the root window a known colour with
``xsetroot`` (so a test can check a real pixel) and, optionally, opens an ``xmessage``
window with a label. On exit it terminates and reaps what it started and deletes only
its own temporary log directory; Xvnc removes its own lock file and socket.

Synchronous on purpose (``subprocess``): it is used by tests and the demo script around
a reactor, not inside one. Several servers may run at once (concurrent tests): a
display already in use is skipped, and a start that loses a race is retried.
"""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

#: The demo's background colour (a recognisable blue) as ``xsetroot`` takes it.
DEFAULT_BACKGROUND = "#1f6feb"

_X_SOCKET_DIR = Path("/tmp/.X11-unix")  # noqa: S108 - the X11 convention, not a temp file of ours


class XvncError(RuntimeError):
    """Xvnc (or a helper) could not be started; the message includes Xvnc's last log lines."""


def parse_rgb(colour: str) -> tuple[int, int, int]:
    """``"#1f6feb"`` -> ``(31, 111, 235)``; ValueError for anything else."""
    text = colour.strip()
    if len(text) != 7 or not text.startswith("#"):
        raise ValueError(f"expected a colour like '#1f6feb', got {colour!r}")
    value = int(text[1:], 16)
    return (value >> 16) & 0xFF, (value >> 8) & 0xFF, value & 0xFF


def _display_in_use(number: int) -> bool:
    return (
        Path(f"/tmp/.X{number}-lock").exists()  # noqa: S108
        or (_X_SOCKET_DIR / f"X{number}").exists()
    )


def free_display(start: int | None = None, stop: int = 999) -> int:
    """A display number with neither a lock file nor a socket (XvncError if none).

    The search starts at a random offset so that concurrent test processes rarely try
    the same number; a race that remains is caught by :func:`run_xvnc`'s retry.
    """
    first = start if start is not None else random.randint(40, 400)
    for number in list(range(first, stop)) + list(range(10, first)):
        if not _display_in_use(number):
            return number
    raise XvncError("no free X display number")


def free_tcp_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _rfb_greets(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1.0) as conn:
            conn.settimeout(2.0)
            return conn.recv(12).startswith(b"RFB ")
    except OSError:
        return False


@dataclass
class XvncServer:
    """A running Xvnc. ``display``: N of ``:N``; ``rfb_port``: its RFB TCP port on
    127.0.0.1 (security type None); ``background_rgb``: the root window's colour;
    ``width`` / ``height``: pixels."""

    display: int
    rfb_port: int
    background_rgb: tuple[int, int, int]
    width: int
    height: int
    process: subprocess.Popen[bytes]
    log_path: Path
    helpers: list[subprocess.Popen[bytes]] = field(default_factory=list)

    @property
    def display_name(self) -> str:
        """``":N"``, for ``DISPLAY``."""
        return f":{self.display}"

    @property
    def background_point(self) -> tuple[int, int]:
        """A pixel (x, y) that shows the background: bottom right, away from the label
        window (top left) and the pointer (centre)."""
        return self.width - 20, self.height - 20

    def env(self) -> dict[str, str]:
        """An environment for X clients on this display."""
        return _client_env(self.display_name)

    def log_tail(self, lines: int = 15) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def stop(self) -> None:
        """Terminate the helpers and Xvnc, reap them, delete the log directory."""
        for proc in [*self.helpers, self.process]:
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(timeout=5)
        shutil.rmtree(self.log_path.parent, ignore_errors=True)


def _client_env(display: str | None) -> dict[str, str]:
    # An explicit, minimal environment: no inherited DISPLAY or XAUTHORITY of the caller's.
    env = {key: os.environ[key] for key in ("PATH", "HOME", "LANG", "LC_ALL") if key in os.environ}
    if display is not None:
        env["DISPLAY"] = display
    return env


def _launch(
    display: int, port: int, geometry: str, depth: int, extra_args: Sequence[str], log_dir: Path
) -> tuple[subprocess.Popen[bytes], Path]:
    xvnc = shutil.which("Xvnc")
    if xvnc is None:
        raise XvncError("Xvnc is not installed (Debian: tigervnc-standalone-server)")
    log_path = log_dir / f"Xvnc-{display}.log"
    argv = [
        xvnc,
        f":{display}",
        "-rfbport", str(port),
        "-SecurityTypes", "None",
        "-localhost",
        "-nolisten", "tcp",
        "-geometry", geometry,
        "-depth", str(depth),
        "-desktop", "secshadow",
        *extra_args,
    ]
    with open(log_path, "wb") as log_file:
        proc = subprocess.Popen(  # noqa: S603 - fixed argv, no shell
            argv, stdin=subprocess.DEVNULL, stdout=log_file, stderr=subprocess.STDOUT, env=_client_env(None)
        )
    return proc, log_path


def start_xvnc(
    geometry: str = "640x480",
    background: str = DEFAULT_BACKGROUND,
    label: str | None = "secshadow demo",
    depth: int = 24,
    extra_args: Sequence[str] = (),
    timeout: float = 15.0,
    attempts: int = 5,
) -> XvncServer:
    """Start Xvnc and paint it; returns an :class:`XvncServer` (call ``stop()``).

    ``geometry``: ``"WxH"`` pixels. ``background``: ``"#rrggbb"``. ``label``: text of an
    ``xmessage`` window at the top left, or ``None``. ``timeout``: seconds per attempt
    until the RFB port greets. Raises :class:`XvncError` when Xvnc cannot be started.
    """
    rgb = parse_rgb(background)
    width, _, height = geometry.partition("x")
    log_dir = Path(tempfile.mkdtemp(prefix="secshadow-xvnc-"))
    failures: list[str] = []
    for _ in range(attempts):
        display, port = free_display(), free_tcp_port()
        proc, log_path = _launch(display, port, geometry, depth, extra_args, log_dir)
        server = XvncServer(display, port, rgb, int(width), int(height), proc, log_path)
        deadline = time.monotonic() + timeout
        while proc.poll() is None and time.monotonic() < deadline:
            if _rfb_greets(port):
                break
            time.sleep(0.1)
        else:
            # Exited (display or port taken by a concurrent start) or never greeted.
            failures.append(f":{display} port {port}: {server.log_tail(5) or 'no output'}")
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            continue
        try:
            _paint(server, background, label, deadline)
        except XvncError:
            server.stop()
            raise
        return server
    shutil.rmtree(log_dir, ignore_errors=True)
    raise XvncError("Xvnc did not start:\n" + "\n".join(failures))


def _paint(server: XvncServer, background: str, label: str | None, deadline: float) -> None:
    env = server.env()
    while True:
        result = subprocess.run(  # noqa: S603
            ["xsetroot", "-solid", background], env=env, capture_output=True, timeout=10
        )
        if result.returncode == 0:
            break
        if time.monotonic() > deadline:
            raise XvncError(f"xsetroot failed on :{server.display}: {result.stderr.decode(errors='replace')}")
        time.sleep(0.1)
    if label and shutil.which("xmessage"):
        helper = subprocess.Popen(  # noqa: S603
            ["xmessage", "-geometry", "+40+40", "-buttons", "", label],
            env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        server.helpers.append(helper)
        if shutil.which("xdotool"):
            # Wait until the label is on screen, so a snapshot taken next shows it.
            with contextlib.suppress(subprocess.TimeoutExpired):
                subprocess.run(  # noqa: S603
                    ["xdotool", "search", "--sync", "--onlyvisible", "--name", "xmessage"],
                    env=env, capture_output=True, timeout=5,
                )


@contextlib.contextmanager
def run_xvnc(
    geometry: str = "640x480",
    background: str = DEFAULT_BACKGROUND,
    label: str | None = "secshadow demo",
    depth: int = 24,
    extra_args: Sequence[str] = (),
    timeout: float = 15.0,
) -> Iterator[XvncServer]:
    """Context manager around :func:`start_xvnc`: yields the server, stops it on exit."""
    server = start_xvnc(geometry, background, label, depth, extra_args, timeout)
    try:
        yield server
    finally:
        server.stop()
