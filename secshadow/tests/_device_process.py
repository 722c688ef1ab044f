"""Run ``secshadow-device`` as a real subprocess (``python -m secshadow.lab.device.cli``)."""

from __future__ import annotations

import json
import os
import selectors
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Sequence

ROOT = Path(__file__).resolve().parents[2]


def cli_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def run_cli(args: Sequence[str], timeout: float = 20) -> subprocess.CompletedProcess[str]:
    """Run the CLI to completion (for flag errors and ``--list-firmware``)."""
    return subprocess.run(  # noqa: S603
        [sys.executable, "-m", "secshadow.lab.device.cli", *args],
        capture_output=True, text=True, timeout=timeout, env=cli_env(), cwd=ROOT,
    )


class DeviceProcess:
    """A running emulator. ``port``: where it listens; ``events``: JSON lines read so far."""

    def __init__(self, args: Sequence[str], timeout: float = 15.0) -> None:
        self.proc = subprocess.Popen(  # noqa: S603
            [sys.executable, "-m", "secshadow.lab.device.cli", "--listen", "tcp:0:interface=127.0.0.1", *args],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=cli_env(), cwd=ROOT,
        )
        self.events: list[dict[str, Any]] = []
        self.stderr = ""
        self._partial = b""
        listening = self.wait_for("listening", timeout)
        self.port: int = listening["port"]
        self.certificate_sha256: str = listening["certificate_sha256"]

    def _read_available(self, wait: float) -> None:
        assert self.proc.stdout is not None
        selector = selectors.DefaultSelector()
        selector.register(self.proc.stdout, selectors.EVENT_READ)
        try:
            if selector.select(wait):
                chunk = os.read(self.proc.stdout.fileno(), 65536)
                if not chunk:
                    raise EOFError
                self._partial += chunk
                *lines, self._partial = self._partial.split(b"\n")
                self.events += [json.loads(line) for line in lines if line.strip()]
        finally:
            selector.close()

    def wait_for(self, name: str, timeout: float = 10.0) -> dict[str, Any]:
        """Block until an event called ``name`` was printed (AssertionError on timeout or exit).

        Blocks the calling thread: use it only when the reactor has nothing to do meanwhile.
        """
        deadline = time.monotonic() + timeout
        while True:
            for event in self.events:
                if event["event"] == name:
                    return event
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            try:
                self._read_available(min(remaining, 0.2))
            except EOFError:
                break
        self.stop()
        raise AssertionError(f"no {name!r} event from secshadow-device; events={self.events}, stderr={self.stderr}")

    def stop(self) -> int:
        """SIGTERM, wait, collect the remaining output; returns the exit status."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            out, err = self.proc.communicate(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            out, err = self.proc.communicate()
        data = self._partial + out
        self._partial = b""
        self.events += [json.loads(line) for line in data.split(b"\n") if line.strip()]
        self.stderr += err.decode(errors="replace")
        return self.proc.returncode

    def named(self, name: str) -> list[dict[str, Any]]:
        return [e for e in self.events if e["event"] == name]
