"""docs/examples/java/ShadowConsole.java: compiled with the JDK's javac and run against the
lab (the device emulator in front of a real Xvnc), as a Java management console would
drive ``secshadow-proxy``: secret on standard input, JSON events, its own RFB client."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from secshadow.lab.harness import Lab, child_environment, python_module
from secshadow.tests.conftest import require_program

pytestmark = pytest.mark.integration

SOURCE = Path(__file__).resolve().parents[2] / "docs" / "examples" / "java" / "ShadowConsole.java"


@pytest.fixture(scope="module")
def classes(tmp_path_factory: pytest.TempPathFactory) -> Path:
    javac = require_program("javac")
    require_program("java")
    out = tmp_path_factory.mktemp("java-classes")
    result = subprocess.run([javac, "-Xlint:all", "-Werror", "-d", str(out), str(SOURCE)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert (out / "ShadowConsole.class").exists()
    return out




def _secret_file(lab: Lab, tmp_path: Path, password: str) -> Path:
    path = tmp_path / "secret.json"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump({"certificate": lab.device_cert.read_text(), "password": password,
                   "host": "127.0.0.1", "port": lab.device_port}, f)
    return path


def _run_console(classes: Path, secret: Path, *proxy_args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["java", "-cp", str(classes), "ShadowConsole", str(secret), *python_module("secshadow.cli"),
         "--hello-timeout", "15", *proxy_args],
        capture_output=True, text=True, timeout=60, env=child_environment(),
    )


def test_java_console_shadows_the_device(classes: Path, lab: Lab, tmp_path: Path) -> None:
    password = lab.fresh_password()
    result = _run_console(classes, _secret_file(lab, tmp_path, password))
    out = result.stdout
    assert result.returncode == 0, out + result.stderr
    lines = out.splitlines()
    assert lines[0] == f"secret from file for device 127.0.0.1:{lab.device_port}"
    assert lines[1].startswith("pinned TLS to the device (TLSv1.")
    assert lines[2].startswith("listening on 127.0.0.1:")
    assert "session started RFB 003.008" in lines
    assert 'ServerInit 640x480 "secshadow"' in lines  # the real Xvnc behind the device
    assert "closed: viewer disconnected" in lines
    assert lines[-1] == "exit 0: the session ran and ended normally"
    assert password not in out + result.stderr
    assert "proxy: secshadow-proxy: the device accepted the password" in result.stderr


def test_java_console_maps_a_wrong_password_to_exit_7(classes: Path, lab: Lab, tmp_path: Path) -> None:
    result = _run_console(classes, _secret_file(lab, tmp_path, "00000000-0000-0000-0000-000000000000"))
    assert result.returncode == 7, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    assert any(line.startswith("error device-rejected: the device closed the connection") for line in lines)
    assert lines[-1] == ("exit 7: the device rejected the session: wrong or expired one-time password, "
                         "or the local user refused")
    assert "ServerInit" not in result.stdout


def test_java_console_maps_a_malformed_secret_to_exit_2(classes: Path, tmp_path: Path) -> None:
    secret = tmp_path / "bad.json"
    secret.write_text('{"certificate": "", "password": "p", "host": "127.0.0.1"}')
    result = _run_console(classes, secret)
    assert result.returncode == 2
    assert "error usage: " in result.stdout and "reboot the device" in result.stdout
    assert result.stdout.splitlines()[-1].startswith("exit 2: usage error")


def test_every_exit_code_has_a_message_in_the_java_example() -> None:
    text = SOURCE.read_text()
    for code in range(9):
        assert f"case {code}: return" in text
