"""Real pixels through the device emulator: Xvnc <- secshadow-device (subprocess, TLS)
<- a test-only console relay (TLS client, PROCYCMD, no pinning) <- the snapshot client."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import pytest_twisted

from secshadow.snapshot import SnapshotError, read_pixel, take_snapshot
from secshadow.tests._device_helpers import PASSWORD, ConsoleRelay
from secshadow.tests._device_process import DeviceProcess
from secshadow.tests.conftest import require_program

pytestmark = pytest.mark.integration


@pytest.fixture
def xvnc() -> Any:
    require_program("Xvnc")
    require_program("xsetroot")
    from secshadow.lab.vnc import run_xvnc

    with run_xvnc(background="#1f6feb") as server:
        yield server


def start_device(tmp_path: Path, vnc_port: int, *extra: str) -> DeviceProcess:
    password_file = tmp_path / "password"
    password_file.write_text(PASSWORD)
    return DeviceProcess([
        "--generate-cert", str(tmp_path / "certs"),
        "--accept-password-file", str(password_file),
        "--vnc", f"127.0.0.1:{vnc_port}",
        *extra,
    ])


def listen_relay(device: DeviceProcess, password: str, terminator: bytes = b"") -> Any:
    from twisted.internet import reactor

    return reactor.listenTCP(  # type: ignore[attr-defined]
        0, ConsoleRelay(reactor, device.port, password, terminator), interface="127.0.0.1"
    )


@pytest.mark.parametrize("terminator", [b"", b"\r\n"], ids=["none", "crlf"])
@pytest_twisted.ensureDeferred
async def test_snapshot_through_the_device(xvnc: Any, tmp_path: Path, terminator: bytes) -> None:
    from twisted.internet import reactor

    device = start_device(tmp_path, xvnc.rfb_port)
    relay = listen_relay(device, PASSWORD, terminator)
    try:
        path = tmp_path / "through-device.png"
        size = await take_snapshot(reactor, "127.0.0.1", relay.getHost().port, path, timeout=15)
        assert size == (xvnc.width, xvnc.height)
        assert read_pixel(path, *xvnc.background_point) == (0x1F, 0x6F, 0xEB)
        # The one-time password is used up: a second session is refused.
        with pytest.raises(SnapshotError, match="closed the connection before a full frame"):
            await take_snapshot(reactor, "127.0.0.1", relay.getHost().port, tmp_path / "again.png", timeout=15)
    finally:
        await relay.stopListening()
        status = device.stop()
    assert status == 0
    assert [e["accepted"] for e in device.named("procycmd")] == [True, False]
    assert len(device.named("vnc-connected")) == 1
    assert device.named("tls")[0]["version"] in ("TLSv1.2", "TLSv1.3")
    first_session = device.named("app-bytes")[0]
    assert first_session["count"] > 48 + len(terminator)
    assert PASSWORD not in device.stderr + repr(device.events)


@pytest_twisted.ensureDeferred
async def test_wrong_password_never_reaches_vnc(xvnc: Any, tmp_path: Path) -> None:
    from twisted.internet import reactor

    device = start_device(tmp_path, xvnc.rfb_port)
    relay = listen_relay(device, "00000000-0000-0000-0000-000000000000")
    try:
        with pytest.raises(SnapshotError, match="closed the connection before a full frame"):
            await take_snapshot(reactor, "127.0.0.1", relay.getHost().port, tmp_path / "no.png", timeout=15)
    finally:
        await relay.stopListening()
        device.stop()
    assert device.named("procycmd") == [{"event": "procycmd", "accepted": False, "reason": "wrong password"}]
    assert device.named("vnc-connected") == []
    assert device.named("app-bytes")[0]["count"] == 48
