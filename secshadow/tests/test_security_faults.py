"""Faults (issue 4, part 4): the device drops at every stage, the viewer drops mid-stream,
the UMS is slow, answers 500 or sends garbage, the device trickles one byte per second.
Each case ends with the contract's exit code and a ``closed`` or ``error`` within its
timeout. Then N sessions in one process: file descriptors, threads, child processes and
memory return to their starting level (N=100 here; 500 in benchmarks/bench_sessions.py).
"""

from __future__ import annotations

import gc
import socket
import threading
import time
import uuid
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import ensureDeferred

from secshadow.lab import certs
from secshadow.errors import UMSError
from secshadow.imi import fetch_shadow_secret
from secshadow.secret import OneTimePassword, ShadowSecret
from secshadow.lab.scripted import (
    HELLO,
    DeviceConn,
    HTTPScript,
    PeerClosed,
    ScriptedDevice,
    children_of,
    fd_count,
    http_response,
    rss_kib,
    run_session,
    simple_viewer,
)
from secshadow.tests._tls import der_of
from secshadow.tests._umscerts import make_leaf
from secshadow.umstrust import UMSTrust

CERT, KEY = certs.generate_self_signed()
SECRET = ShadowSecret(der_of(CERT), OneTimePassword(str(uuid.uuid4())), "127.0.0.1", None)


def _raw_drop_during_tls(sock: socket.socket, index: int) -> None:
    sock.settimeout(5)
    sock.recv(100)  # part of the ClientHello, then gone


def _drop_after_pin(conn: DeviceConn) -> None:
    return


def _drop_after_command(conn: DeviceConn) -> None:
    conn.recv_command()


def _drop_mid_stream(conn: DeviceConn) -> None:
    conn.recv_command()
    conn.send(HELLO + b"\x00" * 5000)


def _trickle(conn: DeviceConn) -> None:
    conn.recv_command()
    for byte in HELLO:
        conn.send(bytes([byte]))
        time.sleep(1.0)
    conn.drain(5)


def _echo(conn: DeviceConn) -> None:
    conn.recv_command()
    conn.send(HELLO)
    try:
        while True:
            conn.send(conn.recv(10))
    except (PeerClosed, TimeoutError):
        pass


@pytest.mark.integration
@pytest_twisted.inlineCallbacks
@pytest.mark.parametrize("case, expected, reason", [
    ("drop during TLS", 5, None),
    ("drop after pinning, before the viewer; device gone", 4, None),
    ("drop after pinning, before the viewer; device back", 0, "viewer disconnected"),
    ("drop right after the command", 7, None),
    ("drop mid-stream", 0, "device closed the connection"),
    ("viewer drops mid-stream", 0, "viewer disconnected"),
    ("device trickles one byte per second", 7, None),
])
def test_device_and_viewer_faults(case: str, expected: int, reason: str | None):
    viewer = simple_viewer(read_for=10)
    kwargs: dict[str, Any] = {}
    if case == "drop during TLS":
        device = ScriptedDevice(CERT, KEY, raw_script=_raw_drop_during_tls)
    elif case.startswith("drop after pinning"):
        back = case.endswith("back")

        def script(conn: DeviceConn) -> None:
            if conn.index == 0:
                if not back:
                    device.stop()  # nobody listens any more
                return
            _echo(conn)

        device = ScriptedDevice(CERT, KEY, script)
        base = viewer

        def viewer(port: int) -> Any:  # noqa: F811 - wait for the drop, then come
            time.sleep(0.5)
            if back:
                with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
                    s.sendall(b"ping")
                    s.settimeout(5)
                    got = b""
                    while len(got) < 16:
                        got += s.recv(100)
                    return got, False
            return base(port)
    elif case == "drop right after the command":
        device = ScriptedDevice(CERT, KEY, _drop_after_command)
    elif case == "drop mid-stream":
        device = ScriptedDevice(CERT, KEY, _drop_mid_stream)
    elif case == "viewer drops mid-stream":
        device = ScriptedDevice(CERT, KEY, _echo)
        viewer = simple_viewer(send=b"hello device", expect=24)
    else:
        device = ScriptedDevice(CERT, KEY, _trickle)
        kwargs["hello_timeout"] = 3.0
    started = time.monotonic()
    try:
        run = yield run_session(SECRET, device.port, viewer, limit=20, **kwargs)
    finally:
        device.stop()
    assert run.exit_code == expected, (run.names, run.result)
    if expected == 0:
        assert run.names[-1] == "closed" and run.events[-1].reason == reason
    if case.startswith("device trickles"):
        assert 2.9 <= time.monotonic() - started < 6  # the hello timeout is not reset by a trickle
        assert "--hello-timeout" in str(run.result.value)
    if case.endswith("device back"):
        assert run.viewer[0] == HELLO + b"ping"


# ------------------------------------------------------------------------ UMS faults
def _fetch(port: int, leaf: Any, timeout: float) -> Any:
    return ensureDeferred(fetch_shadow_secret(reactor, f"https://127.0.0.1:{port}", "27", "admin", "pw",
                                              UMSTrust.from_fingerprint(leaf.sha256), timeout=timeout))


def _login_ok(index: int, request: bytes) -> bytes:
    return http_response(200, b'{"message": "JSESSIONID=abc"}',
                         extra="Set-Cookie: JSESSIONID=abc; Path=/umsapi/; Secure; HttpOnly\r\n")


@pytest.mark.integration
@pytest_twisted.inlineCallbacks
@pytest.mark.parametrize("case", ["slow", "500 on login", "500 on the secret", "garbage on the secret",
                                  "not HTTP at all", "closes without an answer"])
def test_ums_faults_are_exit_3_within_the_timeout(case: str):
    leaf = make_leaf()

    def respond(index: int, request: bytes) -> bytes | None:
        login = request.startswith(b"POST /umsapi/v3/login")
        if case == "500 on login" and login:
            return http_response(500, b"<html>Internal Server Error</html>", "text/html")
        if login or request.startswith(b"POST /umsapi/v3/logout"):
            return _login_ok(index, request)
        if case == "500 on the secret":
            return http_response(500, b'{"message": "boom", "errorCode": "ITG-0Z999", "stackTrace": "x"}')
        if case == "garbage on the secret":
            return http_response(200, b"\x00\xff{not json" * 50)
        if case == "not HTTP at all":
            return b"\x16\x03\x01 garbage garbage\r\n\r\n"
        if case == "closes without an answer":
            return None
        return _login_ok(index, request)

    ums = HTTPScript(leaf.cert_pem, leaf.key_pem, respond, delay=5.0 if case == "slow" else 0.0)
    started = time.monotonic()
    try:
        with pytest.raises(UMSError) as caught:
            yield _fetch(ums.port, leaf, timeout=1.5)
    finally:
        ums.stop()
    assert time.monotonic() - started < 8
    assert "pw" not in caught.value.message.split()


# ------------------------------------------------------------------------ leaks
def _threads() -> int:
    return threading.active_count()


@pytest.mark.integration
@pytest_twisted.inlineCallbacks
def test_sessions_leave_no_fds_threads_processes_or_memory_behind():
    import os

    sessions = 100
    device = ScriptedDevice(CERT, KEY, _echo)
    viewer = simple_viewer(send=b"x" * 100, expect=112)
    try:
        for _ in range(5):  # warm up: imports, thread pool, OpenSSL tables
            yield run_session(SECRET, device.port, viewer)
        gc.collect()
        yield _settle()
        fds0, threads0, kids0, rss0 = fd_count(), _threads(), len(children_of(os.getpid())), rss_kib()
        codes = []
        for _ in range(sessions):
            run = yield run_session(SECRET, device.port, viewer)
            codes.append(run.exit_code)
        gc.collect()
        yield _settle()
        fds1, threads1, kids1, rss1 = fd_count(), _threads(), len(children_of(os.getpid())), rss_kib()
    finally:
        device.stop()
    print(f"\nleaks after {sessions} sessions: fds {fds0}->{fds1}, threads {threads0}->{threads1}, "
          f"children {kids0}->{kids1}, rss {rss0}->{rss1} KiB")
    assert codes == [0] * sessions
    assert fds1 <= fds0 + 2
    assert kids1 <= kids0
    assert rss1 - rss0 < 20 * 1024


def _settle() -> Any:
    from twisted.internet import task

    return task.deferLater(reactor, 0.5, lambda: None)


# ------------------------------------------------------------------------ bounded memory
@pytest.mark.integration
@pytest.mark.parametrize("direction", ["to-viewer", "to-device"])
def test_bounded_memory_with_a_slow_reader_reduced(direction: str):
    """CI-sized benchmarks/bench_memory.py: 64 MiB, the reader at 1 MB/s for 3 s, then fast;
    the proxy process's RSS grows by less than 16 MiB (the full 1 GiB run is in the docs)."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_memory.py"
    spec = importlib.util.spec_from_file_location("bench_memory", path)
    assert spec is not None and spec.loader is not None
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    figures = bench.measure(64 << 20, 1e6, 3.0, direction)
    print(f"\n{figures}")
    assert figures["proxy_exit"] == 0
    assert figures["bytes"] == 64 << 20
    assert figures["growth_kib"] < 16 * 1024
