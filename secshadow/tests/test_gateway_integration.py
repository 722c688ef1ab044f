"""End to end through a real secshadow-gateway process, with the real Xvnc behind the
device emulator: behind secshadow-agent (an unmodified OS 11 device) and with the
emulator dialing out itself (secshadow-device --dial, the OS 12 shape). The console side
is the product's own pinned link (connect_pinned over gateway_endpoint), PROCYCMD with a
fresh one-time password from the lab's IMI server, and a real RFB client reading pixels.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Iterator

import pytest
import pytest_twisted

from secshadow.errors import PinMismatch
from secshadow.lab import certs
from secshadow.lab.harness import GatewayProcess, Lab, start_agent
from secshadow.snapshot import read_pixel, take_snapshot
from secshadow.tests._gateway_helpers import endpoint_for, listen_viewer_port, pinned_through, wait_until

pytestmark = pytest.mark.integration


def session_events(gateway: GatewayProcess, name: str, sid: str) -> list[dict[str, Any]]:
    return [e for e in gateway.process.named(name) if e.get("sid") == sid]


async def snapshot_through(reactor: Any, lab: Lab, gateway: GatewayProcess, sid: str, png: Path) -> float:
    """Console side: pin through the gateway, PROCYCMD, one full frame; returns the
    seconds from the console's connect to the saved frame."""
    password = lab.fresh_password()
    pinned = certs.der_of(lab.device_cert.read_bytes())
    started = time.monotonic()
    link = await pinned_through(reactor, endpoint_for(reactor, gateway, sid, "console"), pinned)
    assert link.tls_version in ("TLSv1.2", "TLSv1.3")
    port = listen_viewer_port(reactor, link, password)
    try:
        size = await take_snapshot(reactor, "127.0.0.1", port.getHost().port, png, timeout=20)
    finally:
        await port.stopListening()
    elapsed = time.monotonic() - started
    assert lab.xvnc is not None
    assert size == (lab.xvnc.width, lab.xvnc.height)
    assert read_pixel(png, *lab.xvnc.background_point) == lab.xvnc.background_rgb
    await link.when_lost()
    return elapsed


@pytest_twisted.ensureDeferred
async def test_real_pixels_through_the_gateway_and_the_agent(lab: Lab, gateway: GatewayProcess, tmp_path: Path) -> None:
    from twisted.internet import reactor

    assert lab.device is not None
    before = len(lab.device.named("procycmd"))
    sid = "e2e-agent"
    agent = start_agent(gateway, sid, lab.device_port)
    elapsed = await snapshot_through(reactor, lab, gateway, sid, tmp_path / "agent.png")
    print(f"\nconsole connect -> first full frame through gateway + agent: {elapsed:.3f} s")
    assert agent.process.wait(timeout=20) == 0, agent.log_tail()
    agent.stop()
    assert [e["event"] for e in agent.events] == ["paired", "target-connected", "closed"]
    assert agent.events[-1]["bytes_to_gateway"] > lab.xvnc.width * lab.xvnc.height  # type: ignore[union-attr]
    assert lab.device.named("procycmd")[before:] == [{"event": "procycmd", "accepted": True, "reason": "ok"}]
    assert wait_until(lambda: session_events(gateway, "closed", sid))
    [paired] = session_events(gateway, "paired", sid)
    [closed] = session_events(gateway, "closed", sid)
    # A clean end after pairing; which leg's close reaches the gateway first is a race (the
    # console's WebSocket close, or the agent's after the device answered the TLS close_notify).
    assert closed["paired"] is True and closed["close_code"] == 1000 and closed["closed_by"] in ("console", "device")
    assert closed["bytes_device_to_console"] > lab.xvnc.width * lab.xvnc.height  # a whole frame, encrypted
    assert closed["bytes_console_to_device"] > 48  # at least the ClientHello and PROCYCMD's record
    assert paired["wait_s"] >= 0


@pytest_twisted.ensureDeferred
async def test_real_pixels_with_the_device_dialing_out(lab: Lab, gateway: GatewayProcess, tmp_path: Path) -> None:
    from twisted.internet import reactor

    sid = "e2e-dial"
    device = lab.start_dialing_device(gateway, sid)
    try:
        elapsed = await snapshot_through(reactor, lab, gateway, sid, tmp_path / "dial.png")
        print(f"\nconsole connect -> first full frame through gateway, device dialing out: {elapsed:.3f} s")
        assert device.process.wait(timeout=20) == 0, device.log_tail()
    finally:
        device.stop()
    names = [e["event"] for e in device.events]
    # The emulator's TLS server starts (its "connection") as the pairing completes.
    assert names[:3] == ["dialing", "connection", "paired"]
    assert {"event": "procycmd", "accepted": True, "reason": "ok"} in device.events
    assert "vnc-connected" in names and names[-1] == "app-bytes"
    assert wait_until(lambda: session_events(gateway, "closed", sid))
    assert session_events(gateway, "closed", sid)[0]["close_code"] == 1000


@pytest_twisted.ensureDeferred
async def test_an_agent_splicing_to_another_certificate_gives_pin_mismatch_and_no_password(
    lab: Lab, gateway: GatewayProcess, tmp_path: Path
) -> None:
    from twisted.internet import reactor

    twin_cert, twin_key = certs.twin_of(lab.device_cert.read_bytes())
    (tmp_path / "twin.crt").write_bytes(twin_cert)
    (tmp_path / "twin.key").write_bytes(twin_key)
    impostor = lab.start_device(cert=tmp_path / "twin.crt", key=tmp_path / "twin.key", name="gw-impostor")
    sid = "e2e-impostor"
    agent = start_agent(gateway, sid, int(impostor.wait_for("listening")["port"]), name="impostor-agent")
    try:
        pinned = certs.der_of(lab.device_cert.read_bytes())
        with pytest.raises(PinMismatch) as caught:
            await pinned_through(reactor, endpoint_for(reactor, gateway, sid, "console"), pinned)
        assert caught.value.exit_code == 6
        assert agent.process.wait(timeout=20) == 0, agent.log_tail()
        assert wait_until(lambda: impostor.named("app-bytes"))
    finally:
        agent.stop()
        impostor.stop()
    # The impostor completed its side of the handshake but never got one application byte.
    assert impostor.named("procycmd") == []
    assert [e["count"] for e in impostor.named("app-bytes")] == [0]


@pytest.fixture(scope="module")
def gateway_lab() -> Iterator[Lab]:
    """A lab whose IMI server puts the device behind the gateway (``start_lab(gateway=True)``)."""
    from secshadow.lab.harness import start_lab
    from secshadow.tests.conftest import require_program

    for program in ("Xvnc", "xsetroot", "openssl"):
        require_program(program)
    with start_lab(gateway=True, background="#2da44e", label="through the gateway") as running:
        yield running


@pytest_twisted.ensureDeferred
async def test_the_console_flow_from_the_imi_secret_to_pixels(gateway_lab: Lab, tmp_path: Path) -> None:
    """What secshadow-proxy does with a secret that names a gateway: fetch it from the
    IMI server, dial the leg it names with the token it carries, pin, PROCYCMD, frame."""
    from twisted.internet import reactor

    from secshadow.gateway.dialer import gateway_endpoint_factory
    from secshadow.imi import fetch_shadow_secret
    from secshadow.tunnel import connect_pinned
    from secshadow.umstrust import UMSTrust

    lab = gateway_lab
    assert lab.gateway is not None and lab.xvnc is not None
    device = lab.start_dialing_device(lab.gateway, lab.gateway_sid)
    try:
        started = time.monotonic()
        secret = await fetch_shadow_secret(reactor, lab.ums_url, "27", "admin", lab.password_file.read_text().strip(),
                                           UMSTrust.from_fingerprint(lab.ums_fingerprint))
        assert secret.gateway is not None
        assert secret.gateway.url == f"{lab.gateway.base_url}/v1/sessions/tc-27/console"
        factory = gateway_endpoint_factory(reactor, secret.gateway.url, secret.gateway.token.reveal(),
                                           UMSTrust.from_fingerprint(lab.gateway.fingerprint))
        link = await connect_pinned(reactor, "gateway", 0, secret.certificate_der, timeout=15,
                                    endpoint_factory=factory)
        port = listen_viewer_port(reactor, link, secret.password.reveal())
        png = tmp_path / "imi-gateway.png"
        try:
            await take_snapshot(reactor, "127.0.0.1", port.getHost().port, png, timeout=20)
        finally:
            await port.stopListening()
        elapsed = time.monotonic() - started
        print(f"\nIMI request -> first full frame through the gateway (device dialing out): {elapsed:.3f} s")
        assert read_pixel(png, *lab.xvnc.background_point) == lab.xvnc.background_rgb == (0x2D, 0xA4, 0x4E)
        await link.when_lost()
        assert device.process.wait(timeout=20) == 0, device.log_tail()
    finally:
        device.stop()
    assert {"event": "procycmd", "accepted": True, "reason": "ok"} in device.events
    assert secret.gateway.token.reveal().rsplit(".", 1)[1] not in lab.gateway.process.log_path.read_text()
