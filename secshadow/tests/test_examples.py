"""The documented Python examples (docs/examples/) run against the lab as written."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from secshadow.lab.harness import Lab, ManagedProcess, child_environment
from secshadow.tests._screens import close_viewer, start_xvfb
from secshadow.tests.conftest import require_program

EXAMPLES = Path(__file__).resolve().parents[2] / "docs" / "examples"
pytestmark = pytest.mark.integration




def fresh_secret(lab: Lab, path: Path) -> Path:
    """A secret file as a console would write it, with a fresh one-time password (mode 0600)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(lab.secret_json(lab.fresh_password()))
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
    display = start_xvfb(tmp_path)
    env = child_environment({"DISPLAY": display.name,
                             "SECSHADOW_UMS_PASSWORD": lab.password_file.read_text().strip()})
    example = ManagedProcess(
        "shadow_one", [sys.executable, str(EXAMPLES / "shadow_one.py"), lab.ums_url, "27", "admin",
                       lab.ums_fingerprint, str(lab.device_port)], tmp_path, env=env)
    try:
        viewer = example.wait_for("viewer-started", timeout=30)
        example.wait_for("session-started", timeout=30)
        close_viewer(viewer["pid"])  # the user closes the viewer
        try:
            status = example.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            alive = os.path.exists(f"/proc/{viewer['pid']}")
            pytest.fail(f"the example did not end within 20 s of the viewer's end (viewer still "
                        f"running: {alive}):\n{example.log_tail()}")
        assert status == 0, example.log_tail()
        closed = example.wait_for("closed", timeout=5)
        assert closed["reason"] == "viewer disconnected"
    finally:
        example.stop()
        display.stop()
