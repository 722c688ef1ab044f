"""A scripted RFB client: connect, read one full frame, save it as PNG.

Used by ``--snapshot``, the demo and the tests to prove that real pixels crossed the
tunnel. It runs vncdotool's Twisted protocol (``vncdotool.client.VNCDoToolClient``)
inside the caller's reactor; ``vncdotool.api`` is not used because it runs a reactor
of its own in a thread.

The exchange (RFC 6143): ProtocolVersion (7.1.1), security type None (7.1.2, 7.2.1),
ClientInit shared (7.3.1), ServerInit (7.3.2), SetEncodings (7.5.2), one
non-incremental FramebufferUpdateRequest (7.5.3) and the FramebufferUpdate that
answers it (7.6.1). VNC Authentication is not offered: the viewer side of the
secshadow tunnel needs no password (PROTOCOL.md section 4).
"""

from __future__ import annotations

import os
from functools import lru_cache
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.endpoints import HostnameEndpoint

from secshadow.errors import ViewerError

_MAX_DIMENSION = 0x4000


class SnapshotError(ViewerError):
    """The snapshot client failed: connection refused or lost, not RFB, no frame in time."""


@lru_cache(maxsize=1)
def _classes() -> tuple[type[Any], type[Any]]:
    # Imported lazily: vncdotool.client imports the global reactor at import time, which
    # must not happen before the application has chosen its reactor.
    from PIL import Image
    from vncdotool.client import VNCDoToolClient, VNCDoToolFactory

    class Client(VNCDoToolClient):  # type: ignore[misc,valid-type]
        """Reads one full frame; ``done`` fires with the Pillow image or fails with
        :class:`SnapshotError`; ``lost`` fires when the connection is gone."""

        def connectionMade(self) -> None:
            super().connectionMade()
            self.done: Deferred[Any] = Deferred()
            self.lost: Deferred[None] = Deferred()

        def fail(self, message: str) -> None:
            if not self.done.called:
                self.done.errback(SnapshotError(f"snapshot client: {message}"))
            self.transport.loseConnection()

        def vncConnectionMade(self) -> None:
            width, height = int(self.width), int(self.height)
            if not (0 < width <= _MAX_DIMENSION and 0 < height <= _MAX_DIMENSION):
                self.fail(f"the server announced an unusable screen size {width}x{height}")
                return
            # Start from a full-size canvas: the first update may come in several rectangles.
            self.screen = Image.new("RGB", (width, height), "black")
            super().vncConnectionMade()
            self.refreshScreen(incremental=False).addCallback(self._frame)

        def _frame(self, _: object) -> None:
            if not self.done.called:
                self.done.callback(self.screen)

        def vncProtocolError(self, reason: str) -> None:
            self.fail(f"not a usable RFB server: {reason}")

        def vncAuthFailed(self, reason: Any) -> None:
            self.fail("the VNC server refused the connection")

        def vncRequestPassword(self) -> None:
            self.fail("the VNC server asks for a VNC password; the snapshot client has none")

        def connectionLost(self, reason: Any = None) -> None:
            # The base class would also tell the factory, whose one Deferred is of no use here.
            if not self.done.called:
                self.done.errback(SnapshotError("snapshot client: the server closed the connection before a full frame"))
            self.lost.callback(None)

    class Factory(VNCDoToolFactory):  # type: ignore[misc,valid-type]
        protocol = Client
        noisy = False

        def clientConnectionMade(self, protocol: Any) -> None:
            pass

        def clientConnectionFailed(self, connector: Any, reason: Any) -> None:
            pass

    return Client, Factory


async def _snapshot(
    reactor: Any, host: str, port: int, path: str | os.PathLike[str], timeout: float
) -> tuple[int, int]:
    _, factory_class = _classes()
    endpoint = HostnameEndpoint(reactor, host, port, timeout=max(1, int(timeout)))
    try:
        client: Any = await endpoint.connect(factory_class())
    except Exception as exc:
        raise SnapshotError(f"snapshot client: cannot connect to {host}:{port}: {exc}") from None

    def expire() -> None:
        client.fail(f"no full frame from {host}:{port} within {timeout:g} s")
        client.transport.abortConnection()

    timer = reactor.callLater(timeout, expire)
    try:
        image = await client.done
        image.save(os.fspath(path), format="PNG")
        size: tuple[int, int] = image.size
    finally:
        if timer.active():
            timer.cancel()
        client.transport.loseConnection()
        await client.lost
    return size


def take_snapshot(
    reactor: Any, host: str, port: int, path: str | os.PathLike[str], timeout: float = 30.0
) -> Deferred[tuple[int, int]]:
    """Connect to the RFB server at ``host:port``, save one full frame as PNG at ``path``.

    ``timeout``: seconds for the whole exchange. Returns a Deferred firing with
    ``(width, height)`` in pixels after the connection is closed again; it fails with
    :class:`SnapshotError` (a :class:`~secshadow.errors.ViewerError`) when the
    connection is refused or lost, the server is not RFB or wants a password, or no
    frame arrives in time.
    """
    return Deferred.fromCoroutine(_snapshot(reactor, host, port, path, timeout))


def read_pixel(path: str | os.PathLike[str], x: int, y: int) -> tuple[int, int, int]:
    """The ``(r, g, b)`` of pixel ``(x, y)`` in the image at ``path`` (Pillow)."""
    from PIL import Image

    with Image.open(path) as image:
        pixel = image.convert("RGB").getpixel((x, y))
    assert isinstance(pixel, tuple)
    return int(pixel[0]), int(pixel[1]), int(pixel[2])
