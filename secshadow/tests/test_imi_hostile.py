"""The IMI client against hostile UMS servers on real loopback sockets (issue 9, items 2
and 3): a body that drips or stalls after the headers, and endless header lines.

The servers are :class:`~secshadow.lab.scripted.ScriptedDevice` instances (threaded,
real TLS with pyOpenSSL, or plain sockets for ``http://``); the client is the product's
:func:`~secshadow.imi.fetch_shadow_secret` on the test reactor.
"""

from __future__ import annotations

import time
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import Deferred

from secshadow.errors import UMSError
from secshadow.imi import fetch_shadow_secret
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
        assert 0.9 <= seconds < 2.0, seconds
        deadline = time.monotonic() + 3
        while watch.closed_at is None and time.monotonic() < deadline:
            await deferLater(0.05)
        assert watch.closed_at is not None, "the client never closed the dripping connection"
        if interval is not None:
            assert watch.sent >= 3  # the drip really ran while the client waited
    await deferLater(0)
    assert [c for c in reactor.getDelayedCalls() if c not in before and c.active()] == []
