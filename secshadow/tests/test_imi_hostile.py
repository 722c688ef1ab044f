"""The IMI client against hostile UMS servers on real loopback sockets (issue 9, items 2
and 3): a body that drips or stalls after the headers, and endless header lines.

The servers are :class:`~secshadow.lab.scripted.ScriptedDevice` instances (threaded,
real TLS with pyOpenSSL, or plain sockets for ``http://``); the client is the product's
:func:`~secshadow.imi.fetch_shadow_secret` on the test reactor.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import Deferred

import secshadow
from secshadow.errors import UMSError
from secshadow.imi import MAX_HEADER_BYTES, fetch_shadow_secret
from secshadow.lab.scripted import DeviceConn, PeerClosed, ScriptedDevice
from secshadow.tests._umscerts import make_leaf
from secshadow.umstrust import UMSTrust

pytestmark = pytest.mark.integration

PASSWORD = "s3cret-Admin-pw!"
PAIR = make_leaf()
HEAD = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 100000\r\n\r\n"


def read_request(conn: DeviceConn) -> bytes:
    request = b""
    while b"\r\n\r\n" not in request:
        request += conn.recv(10)
    return request


class Watch:
    """What the scripted server saw: when it stopped being able to send (the client hung up)."""

    def __init__(self) -> None:
        self.closed_at: float | None = None
        self.sent = 0


def dripping(watch: Watch, interval: float | None) -> Any:
    """Headers, then one body byte every ``interval`` s (``None``: stall), until the client closes."""

    def script(conn: DeviceConn) -> None:
        read_request(conn)
        conn.send(HEAD)
        try:
            while True:
                if interval is None:
                    conn.recv(30)  # raises PeerClosed when the client hangs up
                else:
                    time.sleep(interval)
                    conn.send(b" ")
                    watch.sent += 1
        except (PeerClosed, TimeoutError):
            watch.closed_at = time.monotonic()

    return script


async def fetch_with_guard(url: str, trust: UMSTrust, timeout: float, guard: float) -> tuple[Any, float]:
    """Run the fetch; returns ``(outcome, seconds)``. ``guard`` ends a hang as a test failure."""
    start = time.monotonic()
    d: Deferred[Any] = fetch_shadow_secret(reactor, url, "27", "admin", PASSWORD, trust, timeout=timeout)
    outcome: list[Any] = []
    d.addBoth(outcome.append)
    waited = 0.0
    while not outcome and waited < guard:
        await deferLater(0.05)
        waited += 0.05
    if not outcome:
        d.cancel()
        d.addErrback(lambda _: None)
        pytest.fail(f"the IMI client was still fetching after {guard} s (timeout {timeout} s)")
    return outcome[0], time.monotonic() - start


def deferLater(seconds: float) -> Deferred[None]:
    from twisted.internet.task import deferLater as later

    return later(reactor, seconds, lambda: None)


@pytest.mark.parametrize("interval", [0.2, None], ids=["drip", "stall"])
@pytest_twisted.ensureDeferred
async def test_one_deadline_covers_the_body(interval: float | None) -> None:
    """Headers at once, then the body drips (a byte every 0.2 s) or stalls: the request
    still ends after ``timeout`` seconds with "did not answer within", and the connection
    is closed."""
    before = set(reactor.getDelayedCalls())
    watch = Watch()
    with ScriptedDevice(PAIR.cert_pem, PAIR.key_pem, dripping(watch, interval)) as server:
        trust = UMSTrust.from_fingerprint(PAIR.sha256)
        outcome, seconds = await fetch_with_guard(f"https://127.0.0.1:{server.port}", trust, 1.0, 6.0)
        assert not isinstance(outcome, Exception) and outcome is not None
        error = outcome.value
        assert isinstance(error, UMSError), outcome
        assert error.message.startswith("the UMS did not answer within 1 s"), error.message
        print(f"{'drip' if interval else 'stall'}: UMSError after {seconds:.3f} s (timeout 1 s)")
        assert 0.9 <= seconds < 2.0, seconds
        deadline = time.monotonic() + 3
        while watch.closed_at is None and time.monotonic() < deadline:
            await deferLater(0.05)
        assert watch.closed_at is not None, "the client never closed the dripping connection"
        if interval is not None:
            assert watch.sent >= 3  # the drip really ran while the client waited
    await deferLater(0)
    assert [c for c in reactor.getDelayedCalls() if c not in before and c.active()] == []


# --------------------------------------------------------------------------- header floods
#: 64 KiB of header lines ("X-Flood-n: aaa...") or of folded continuation lines (" bbb...").
LINES = b"".join(b"X-Flood-%d: " % i + b"a" * 100 + b"\r\n" for i in range(560))
FOLDED = (b" " + b"b" * 110 + b"\r\n") * 560
FLOODS = {
    "header-lines": (b"HTTP/1.1 200 OK\r\n", LINES),
    "folded-lines": (b"HTTP/1.1 200 OK\r\nX-Folded: start\r\n", FOLDED),
}


class Flood:
    """Sends ``head`` then ``chunk`` forever (at most ``seconds``); records bytes sent."""

    def __init__(self, kind: str, seconds: float = 20.0) -> None:
        self.head, self.chunk = FLOODS[kind]
        self.seconds = seconds
        self.sent = 0
        self.stopped_by_client = False

    def _flood(self, send: Any, recv_request: Any) -> None:
        recv_request()
        deadline = time.monotonic() + self.seconds
        try:
            send(self.head)
            self.sent += len(self.head)
            while time.monotonic() < deadline:
                send(self.chunk)
                self.sent += len(self.chunk)
        except (PeerClosed, OSError, TimeoutError):
            self.stopped_by_client = True

    def tls_script(self, conn: DeviceConn) -> None:
        self._flood(conn.send, lambda: read_request(conn))

    def raw_script(self, sock: socket.socket, index: int) -> None:
        sock.settimeout(10)

        def recv_request() -> None:
            data = b""
            while b"\r\n\r\n" not in data:
                chunk = sock.recv(4096)
                if not chunk:
                    raise OSError("closed")
                data += chunk

        self._flood(sock.sendall, recv_request)


@pytest.mark.parametrize("kind", sorted(FLOODS))
@pytest_twisted.ensureDeferred
async def test_endless_headers_over_tls_end_with_a_ums_error(kind: str) -> None:
    """Endless header lines or folded continuation lines: the client stops reading after
    64 KiB, long before its 10 s deadline, and says why."""
    flood = Flood(kind)
    with ScriptedDevice(PAIR.cert_pem, PAIR.key_pem, flood.tls_script) as server:
        trust = UMSTrust.from_fingerprint(PAIR.sha256)
        outcome, seconds = await fetch_with_guard(f"https://127.0.0.1:{server.port}", trust, 10.0, 15.0)
        error = outcome.value
        assert isinstance(error, UMSError), outcome
        assert error.exit_code == 3
        assert f"more than {MAX_HEADER_BYTES} bytes of response headers" in error.message, error.message
        assert seconds < 5, seconds
        deadline = time.monotonic() + 5
        while not flood.stopped_by_client and time.monotonic() < deadline:
            await deferLater(0.05)
        assert flood.stopped_by_client


MEASURE = """
import json, sys, time
from twisted.internet import reactor
from secshadow.imi import MAX_HEADER_BYTES, fetch_shadow_secret
from secshadow.umstrust import UMSTrust

def status(key):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])

url, timeout = sys.argv[1], float(sys.argv[2])
before = status("VmRSS")
try:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the peak (VmHWM) to the current RSS
except OSError:
    pass
start = time.monotonic()
result = {}

def done(outcome):
    result["error"] = getattr(outcome.value, "message", repr(outcome.value))
    reactor.stop()

fetch_shadow_secret(reactor, url, "27", "admin", "pw", UMSTrust.insecure(), timeout=timeout).addBoth(done)
reactor.run()
result.update(seconds=time.monotonic() - start, rss_before_kib=before, peak_kib=status("VmHWM"))
print(json.dumps(result))
"""


def measure_flood(kind: str, timeout: float) -> tuple[dict[str, Any], Flood]:
    """A fresh Python process fetches from a plain-HTTP flood server; returns its report
    (``error``, ``seconds``, ``rss_before_kib``, ``peak_kib``) and the server's count."""
    flood = Flood(kind, seconds=timeout + 5)
    root = str(Path(secshadow.__file__).resolve().parent.parent)
    env = dict(os.environ, PYTHONPATH=root)
    with ScriptedDevice(PAIR.cert_pem, PAIR.key_pem, raw_script=flood.raw_script) as server:
        run = subprocess.run([sys.executable, "-c", MEASURE, f"http://127.0.0.1:{server.port}", str(timeout)],
                             capture_output=True, text=True, timeout=timeout + 30, env=env, check=False)
    assert run.returncode == 0, run.stderr
    return json.loads(run.stdout), flood


@pytest.mark.parametrize("kind", sorted(FLOODS))
def test_memory_stays_bounded_under_a_header_flood(kind: str) -> None:
    """The issue measured +560 MB in 2 s. The client's peak RSS now grows by less than
    8 MiB while the server could send 64 KiB after 64 KiB for as long as it liked."""
    report, flood = measure_flood(kind, timeout=3.0)
    growth = report["peak_kib"] - report["rss_before_kib"]
    print(f"{kind}: peak RSS growth {growth} KiB, {report['seconds']:.2f} s, server sent {flood.sent} bytes: "
          f"{report['error']}")
    assert f"more than {MAX_HEADER_BYTES} bytes of response headers" in report["error"]
    assert growth < 8 * 1024, growth


BIG_BODY = json.dumps({"message": "x" * (900 * 1024), "errorCode": "ITG-0B001"}).encode()


@pytest.mark.parametrize("shape", ["crlf", "lf", "after-100-continue", "one-byte-reads"])
@pytest_twisted.ensureDeferred
async def test_a_large_body_after_small_headers_is_not_mistaken_for_headers(shape: str) -> None:
    """Only the head is counted: a 900 KiB body after ordinary headers (CRLF or bare LF
    line ends, after a ``100 Continue``, or sent a byte at a time at first) is read whole
    and the answer (401: login refused) understood."""
    head = b"HTTP/1.1 401 Unauthorized\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(
        BIG_BODY)
    if shape == "lf":
        head = head.replace(b"\r\n", b"\n")
    if shape == "after-100-continue":
        head = b"HTTP/1.1 100 Continue\r\nX-A: b\r\n\r\n" + head

    def script(conn: DeviceConn) -> None:
        read_request(conn)
        answer = head + BIG_BODY
        if shape == "one-byte-reads":
            for byte in answer[:200]:
                conn.send(bytes([byte]))
            answer = answer[200:]
        conn.send(answer)
        conn.drain(5)

    with ScriptedDevice(PAIR.cert_pem, PAIR.key_pem, script) as server:
        trust = UMSTrust.from_fingerprint(PAIR.sha256)
        outcome, _ = await fetch_with_guard(f"https://127.0.0.1:{server.port}", trust, 10.0, 15.0)
    error = outcome.value
    assert isinstance(error, UMSError), outcome
    assert error.message.startswith("login refused for user 'admin': wrong user name or password (ITG-0B001)"), \
        error.message


@pytest_twisted.ensureDeferred
async def test_an_echoed_authorization_header_is_redacted_on_the_wire_path() -> None:
    """A real HTTPS server refuses the login with a message that repeats the request's
    ``Authorization`` header and the URL-encoded password: neither reaches the error."""
    from urllib.parse import quote_plus

    password = "Pa ss/w+rd!"
    echoed: list[str] = []

    def script(conn: DeviceConn) -> None:
        request = read_request(conn).decode("latin-1")
        authorization = next(line.split(":", 1)[1].strip() for line in request.split("\r\n")
                             if line.lower().startswith("authorization:"))
        echoed.append(authorization)
        body = json.dumps({"errorCode": "ITG-0B005",
                           "message": f"no access with {authorization} ({quote_plus(password)})"}).encode()
        conn.send(b"HTTP/1.1 403 Forbidden\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n"
                  % len(body) + body)
        conn.drain(5)

    with ScriptedDevice(PAIR.cert_pem, PAIR.key_pem, script) as server:
        url = f"https://127.0.0.1:{server.port}"
        d = fetch_shadow_secret(reactor, url, "27", "admin", password, UMSTrust.from_fingerprint(PAIR.sha256),
                                timeout=5)
        with pytest.raises(UMSError) as info:
            await d
    assert echoed and echoed[0].startswith("Basic ")
    message = info.value.message
    assert "no access with Basic <redacted> (<redacted>)" in message, message
    assert echoed[0].split()[1] not in message and quote_plus(password) not in message
