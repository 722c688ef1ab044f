"""Byte-level fuzzing of a live proxy (the library's ShadowSession in this reactor, real
TLS over real loopback sockets) against a scripted device (issue 4, part 3).

Inputs: random and adversarial bytes from the device after PROCYCMD; random bytes from the
viewer before the device's hello; oversized and one-byte-at-a-time inputs; half-closes.
Each session must end within its timeouts with the right exit code (as the CLI maps it),
and with both sockets closed: the device sees the proxy close, the viewer sees EOF.
The number of inputs tried is printed (``-s``) and asserted.
"""

from __future__ import annotations

import pytest

import random
import uuid
from typing import Any

import pytest_twisted

from secshadow.lab import certs
from secshadow.secret import OneTimePassword, ShadowSecret
from secshadow.lab.scripted import HELLO, DeviceConn, PeerClosed, ScriptedDevice, run_session, simple_viewer
from secshadow.tests._tls import der_of

SEED = 20261121
DEVICE_INPUTS = 120
VIEWER_INPUTS = 80
CERT, KEY = certs.generate_self_signed()
PASSWORD = str(uuid.uuid4())
SECRET = ShadowSecret(der_of(CERT), OneTimePassword(PASSWORD), "127.0.0.1", None)


def _device_inputs(rng: random.Random) -> list[tuple[bytes, str, int]]:
    """(bytes the device sends after PROCYCMD, how it ends, chunk size)."""
    fixed = [
        (b"", "close", 0), (b"", "half-close", 0), (b"", "stay", 0),
        (HELLO[:11], "close", 0), (HELLO[:11], "stay", 1), (HELLO, "close", 1), (HELLO, "half-close", 0),
        (b"RFB 003.00x\n", "stay", 0), (b"rfb 003.008\n", "stay", 0), (b"RFB 003.008\r", "stay", 0),
        (b"\x00" * 12, "close", 0), (b"HTTP/1.1 400 Bad Request\r\n\r\n", "close", 0),
        (HELLO + bytes(range(256)) * 64, "close", 0), (HELLO + b"\xff" * (1 << 20), "close", 0),
        (b"X" * (1 << 20), "stay", 0), (HELLO + b"\x01\x02", "half-close", 1),
        (b"PROCYCMD PW_" + PASSWORD.encode(), "close", 0),
    ]
    out = list(fixed)
    while len(out) < DEVICE_INPUTS:
        kind = rng.random()
        if kind < 0.4:
            data = rng.randbytes(rng.randint(1, 300))
        elif kind < 0.7:
            data = HELLO + rng.randbytes(rng.randint(0, 5000))
        elif kind < 0.85:
            cut = rng.randint(1, 11)
            data = HELLO[:cut] + rng.randbytes(rng.randint(0, 3))
        else:
            data = bytearray(HELLO)
            data[rng.randrange(12)] = rng.randrange(256)
            data = bytes(data)
        out.append((data, rng.choice(["close", "half-close", "close"]), rng.choice([0, 0, 0, 1, 7])))
    return out


def _expected(data: bytes, ending: str) -> int:
    """Exit code the contract demands for this device behaviour."""
    shape = b"RFB ddd.ddd\n"
    for i, byte in enumerate(data[:12]):
        ok = (0x30 <= byte <= 0x39) if shape[i] == ord("d") else byte == shape[i]
        if not ok:
            return 7
    if len(data) >= 12:
        return 0
    return 7  # closed, half-closed or silent before a whole hello (timeout)


@pytest.mark.integration
@pytest_twisted.inlineCallbacks
def test_fuzz_device_bytes_after_the_command():
    rng = random.Random(SEED)
    inputs = _device_inputs(rng)
    state: dict[str, Any] = {}

    def script(conn: DeviceConn) -> None:
        conn.recv_command()
        data, ending, chunk = state["case"]
        try:
            if chunk:
                for i in range(0, min(len(data), 64) if chunk == 1 else len(data), chunk):
                    conn.send(data[i:i + chunk])
                if chunk == 1 and len(data) > 64:
                    conn.send(data[64:])
            else:
                conn.send(data)
        except PeerClosed:
            return
        if ending == "close":
            return
        if ending == "half-close":
            conn.shutdown_write()
        conn.drain(10)

    device = ScriptedDevice(CERT, KEY, script)
    tried = 0
    try:
        for case in inputs:
            state["case"] = case
            before = len(device.conns)
            run = yield run_session(SECRET, device.port, simple_viewer(read_for=10), hello_timeout=0.5, limit=15)
            tried += 1
            data, ending, _ = case
            expected = _expected(data, ending)
            assert run.exit_code == expected, (case[0][:40], ending, run.names, run.result)
            assert run.names[-1] == ("closed" if expected == 0 else run.names[-1])
            received, viewer_closed = run.viewer
            assert viewer_closed, (case[0][:40], ending)  # the proxy closed the viewer's socket
            if expected == 0:
                assert received == data, (len(received), len(data))
            else:
                assert received == b""  # nothing from a device that never said hello
            conn = device.conns[before]
            for _ in range(100):  # the device side sees the close too (bounded wait)
                if conn.sock.fileno() == -1:
                    break
                yield _sleep(0.02)
            assert conn.sock.fileno() == -1, "the device connection was left open"
    finally:
        device.stop()
    print(f"\nfuzz: {tried} device-side inputs tried")
    assert tried == DEVICE_INPUTS


def _viewer_inputs(rng: random.Random) -> list[tuple[bytes, int, bool]]:
    fixed = [(b"", 0, True), (b"x", 1, True), (b"RFB 003.008\n", 1, False), (b"\x00" * 65536, 0, False),
             (b"A" * (64 * 1024 + 1), 0, False), (rng.randbytes(1 << 20), 0, False), (b"\xff" * 100, 1, True)]
    out = list(fixed)
    while len(out) < VIEWER_INPUTS:
        out.append((rng.randbytes(rng.choice([1, 12, 500, 4096, 30000])), rng.choice([0, 0, 1, 13]),
                    rng.random() < 0.3))
    return out


@pytest.mark.integration
@pytest_twisted.inlineCallbacks
def test_fuzz_viewer_bytes_before_the_hello():
    rng = random.Random(SEED + 1)
    inputs = _viewer_inputs(rng)

    def script(conn: DeviceConn) -> None:
        conn.recv_command()
        import time as _t

        _t.sleep(0.15)  # the viewer's bytes arrive before the hello
        conn.send(HELLO)
        try:
            while True:
                conn.send(conn.recv(5))
        except (PeerClosed, TimeoutError):
            pass

    device = ScriptedDevice(CERT, KEY, script)
    tried = 0
    try:
        for data, chunk, half_close in inputs:
            before = len(device.conns)
            viewer = simple_viewer(send=data, chunk=chunk if len(data) <= 600 else 0, half_close=half_close,
                                   read_for=10, expect=None if half_close else 12 + len(data))
            run = yield run_session(SECRET, device.port, viewer, limit=20)
            tried += 1
            received, viewer_closed = run.viewer
            # The proxy pauses the viewer until the hello, so even oversized early input
            # waits in the kernel's buffers and is relayed, in order, once the device is in.
            assert run.exit_code == 0, (len(data), chunk, half_close, run.names, run.result)
            assert run.names[-1] == "closed"
            conn = device.conns[before]
            if half_close:
                # A half-close before the greeting ends the session (the viewer left).
                assert run.events[-1].reason.startswith("viewer disconnected"), run.events[-1]
                assert viewer_closed
            else:
                assert received == HELLO + data, (len(received), len(data))
                assert bytes(conn.received[48:]) == data
    finally:
        device.stop()
    print(f"\nfuzz: {tried} viewer-side inputs tried")
    assert tried == VIEWER_INPUTS


def _sleep(seconds: float) -> Any:
    from twisted.internet import reactor, task

    return task.deferLater(reactor, seconds, lambda: None)
