"""The documented Python examples (docs/examples/) run against the lab as written."""

from __future__ import annotations

import ast
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from secshadow.lab import Lab, child_environment, start_lab
from secshadow.tests.conftest import require_program

EXAMPLES = Path(__file__).resolve().parents[2] / "docs" / "examples"
pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def lab() -> Any:
    for program in ("Xvnc", "xsetroot"):
        require_program(program)
    with start_lab() as running:
        yield running


def fresh_secret(lab: Lab, path: Path) -> Path:
    """What a console gets from IMI: the device document with a fresh one-time password."""
    script = (
        "import json, sys\n"
        "from twisted.internet import task\n"
        "from twisted.internet.defer import ensureDeferred\n"
        "from secshadow.imi import fetch_shadow_secret\n"
        "from secshadow.umstrust import UMSTrust\n"
        "async def main(reactor):\n"
        f"    s = await fetch_shadow_secret(reactor, {lab.ums_url!r}, '27', 'admin',"
        f" open({str(lab.password_file)!r}).read().strip(), UMSTrust.from_fingerprint({lab.ums_fingerprint!r}))\n"
        f"    print(json.dumps({{'certificate': open({str(lab.device_cert)!r}).read(),"
        f" 'password': s.password.reveal(), 'host': '127.0.0.1', 'port': {lab.device_port}}}))\n"
        "task.react(lambda r: ensureDeferred(main(r)))\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, timeout=30,
                            env=child_environment())
    assert result.returncode == 0, result.stderr.decode()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(result.stdout)
    return path


def test_shadow_many_runs_two_devices_and_cancels_cleanly(lab: Lab, tmp_path: Path):
    secrets = [fresh_secret(lab, tmp_path / f"s{n}.json") for n in range(2)]
    result = subprocess.run([sys.executable, str(EXAMPLES / "shadow_many.py"), "3", *map(str, secrets)],
                            capture_output=True, timeout=60, env=child_environment())
    out = result.stdout.decode()
    assert result.returncode == 0, result.stderr.decode()
    assert out.count("'event': 'listening'") == 2
    assert out.count("-> time is up") == 2  # both stopped by the caller, cleanly


def test_shadow_one_with_a_real_viewer(lab: Lab, tmp_path: Path):
    for program in ("Xvfb", "vncviewer"):
        require_program(program)
    from secshadow.tests.test_integration import _start_xvfb

    display = _start_xvfb(tmp_path)
    env = child_environment({"DISPLAY": display.name,
                             "SECSHADOW_UMS_PASSWORD": lab.password_file.read_text().strip()})
    process = subprocess.Popen(
        [sys.executable, str(EXAMPLES / "shadow_one.py"), lab.ums_url, "27", "admin", lab.ums_fingerprint,
         str(lab.device_port)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    try:
        lines: list[str] = []
        pid = None
        deadline = time.monotonic() + 30
        assert process.stdout is not None
        while time.monotonic() < deadline:
            line = process.stdout.readline().decode()
            if not line:
                break
            lines.append(line)
            if "'viewer-started'" in line:
                pid = ast.literal_eval(line)["pid"]
            if "accepted the password" in line:
                break
        assert pid is not None and any("accepted the password" in line for line in lines), lines
        os.kill(pid, signal.SIGTERM)  # the user closes the viewer
        rest, err = process.communicate(timeout=20)
        assert process.returncode == 0, err.decode()
        assert "closed: viewer disconnected" in rest.decode()
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()
        display.stop()
