"""Virtual screens for real viewers: Xvfb, what share of a screenshot shows a colour, and
closing a viewer the way its user would."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

from secshadow.lab.vnc import free_display


class Xvfb:
    def __init__(self, name: str, process: subprocess.Popen[bytes]) -> None:
        self.name, self.process = name, process

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=10)


def start_xvfb(tmp_path: Path) -> Xvfb:
    for _ in range(5):
        number = free_display()
        process = subprocess.Popen(["Xvfb", f":{number}", "-screen", "0", "1024x768x24", "-nolisten", "tcp"],
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        for _ in range(50):
            if Path(f"/tmp/.X11-unix/X{number}").exists():
                return Xvfb(f":{number}", process)
            if process.poll() is not None:
                break
            time.sleep(0.1)
        process.kill()
        process.wait()
    raise RuntimeError("Xvfb did not start")


def share_of_colour(png: Path, rgb: tuple[int, int, int]) -> float:
    from PIL import Image

    with Image.open(png) as image:
        rgb_image = image.convert("RGB")
        colours = rgb_image.getcolors(maxcolors=1 << 24) or []
        total = rgb_image.width * rgb_image.height
        return sum(count for count, colour in colours if colour == rgb) / total


#: Seconds a viewer gets to act on SIGTERM before :func:`close_viewer` uses SIGKILL.
VIEWER_TERM_GRACE = 5.0


def close_viewer(pid: int, grace: float = VIEWER_TERM_GRACE) -> str:
    """End the viewer process ``pid`` as its user closing it would: SIGTERM, then SIGKILL
    if it has not exited (is gone or a zombie) within ``grace`` seconds. Returns
    ``"terminated"`` or ``"killed"``.

    Why the SIGKILL: TigerVNC 1.12's SIGTERM handler writes a log line, and its logger
    takes a mutex; when the signal arrives while the main thread holds that mutex (it
    was logging), the handler waits on it forever, with the connection open (gdb:
    ``rfb::Logger_File::write`` under ``<signal handler called>`` inside
    ``rfb::Logger_File::write``). Seen about once in 30 runs on a loaded machine. The
    proxy's own shutdown of a viewer escalates the same way (``viewers.TERMINATE_GRACE``).
    """
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        if _exited(pid):
            return "terminated"
        time.sleep(0.05)
    os.kill(pid, signal.SIGKILL)
    return "killed"


def _exited(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] == "Z"
    except (FileNotFoundError, ProcessLookupError):
        return True
