"""``secshadow-proxy --gateway URL --gateway-token-file FILE`` as a console runs it: the
real CLI pins the device emulator (dialing out to a real gateway, the OS 12 shape) through
the gateway's WebSocket stream and saves a frame of the real Xvnc; a refused token is
exit 9 with a message that says which; the audit record says ``transport: gateway``."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from secshadow.lab.harness import GatewayProcess, Lab, child_environment, python_module
from secshadow.snapshot import read_pixel

pytestmark = pytest.mark.integration


def _proxy(lab: Lab, gateway: GatewayProcess, sid: str, token_file: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    argv = [*python_module("secshadow.cli"), "--secret-file", "-", "--json", "--connect-timeout", "10",
            "--gateway", f"{gateway.base_url}/v1/sessions/{sid}/console", "--gateway-token-file", str(token_file),
            *gateway.trust_args(), *extra]
    return subprocess.run(argv, input=lab.secret_json(lab.fresh_password()).decode(), capture_output=True,
                          text=True, env=child_environment(), timeout=90)


def test_the_proxy_shadows_through_the_gateway_with_flags(lab: Lab, gateway: GatewayProcess, tmp_path: Path):
    sid = "proxy-flags"
    device = lab.start_dialing_device(gateway, sid)
    audit, png = tmp_path / "audit.jsonl", tmp_path / "frame.png"
    try:
        done = _proxy(lab, gateway, sid, gateway.token_file(sid, "console"), "--snapshot", str(png),
                      "--audit", str(audit))
    finally:
        device.stop()
    assert done.returncode == 0, done.stderr[-2000:]
    names = [json.loads(line)["event"] for line in done.stdout.splitlines()]
    assert names == ["secret", "pinned", "listening", "viewer-connected", "session-started", "closed"]
    assert lab.xvnc is not None and read_pixel(png, *lab.xvnc.background_point) == lab.xvnc.background_rgb
    (record,) = [json.loads(line) for line in audit.read_text().splitlines()]
    assert (record["transport"], record["result"]) == ("gateway", "ok")
    token = gateway.token_file(sid, "console").read_text().strip()
    assert token not in done.stdout + done.stderr + audit.read_text()


def test_a_token_for_another_session_is_exit_9_and_says_so(lab: Lab, gateway: GatewayProcess, tmp_path: Path):
    done = _proxy(lab, gateway, "proxy-refused", gateway.token_file("some-other-session", "console"),
                  "--viewer", "none")
    assert done.returncode == 9, done.stderr[-2000:]
    error = json.loads(done.stdout.splitlines()[-1])
    assert error["event"] == "error" and error["code"] == "gateway"
    assert "403" in error["message"] or "refused" in error["message"]


def test_gateway_token_file_without_a_gateway_is_a_usage_error(lab: Lab, gateway: GatewayProcess, tmp_path: Path):
    argv = [*python_module("secshadow.cli"), "--secret-file", "-", "--viewer", "none",
            "--gateway-token-file", str(gateway.token_file("x", "console"))]
    done = subprocess.run(argv, input=lab.secret_json("p").decode(), capture_output=True, text=True,
                          env=child_environment(), timeout=60)
    assert done.returncode == 2 and "--gateway-token-file needs --gateway" in done.stderr
