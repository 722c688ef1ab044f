"""Virtual screens for real viewers: Xvfb, and what share of a screenshot shows a colour."""

from __future__ import annotations

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
