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

The PNG shows the device's screen, so it is written privately (:func:`write_private`):
a new file created ``O_EXCL | O_NOFOLLOW`` with mode 0600 in the target directory, then
renamed over the destination. A destination that is a symbolic link, not a regular
file, or owned by another user is refused (:func:`check_destination`), before the
connection and again before the rename. Every failure is a :class:`SnapshotError` whose
message says what happened, including a stop before the frame arrived.
"""

from __future__ import annotations

import io
import os
import secrets
import stat
from functools import lru_cache
from pathlib import Path
from typing import Any

from twisted.internet import error as neterror
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.endpoints import HostnameEndpoint

from secshadow.errors import ViewerError

_MAX_DIMENSION = 0x4000


class SnapshotError(ViewerError):
    """The snapshot client failed: connection refused or lost, not RFB, no frame in time."""


def _reason(exc: BaseException) -> str:
    """A non-empty description of ``exc``."""
    return str(exc).strip() or type(exc).__name__


def check_destination(path: str | os.PathLike[str]) -> Path:
    """Check that the snapshot may be written at ``path``; returns it as a :class:`Path`.

    Raises :class:`SnapshotError` naming the path when its directory does not exist, or
    when something already there is a symbolic link (never followed, never replaced),
    not a regular file, or owned by another user than this process's effective uid.
    """
    target = Path(os.fspath(path))
    try:
        info = os.lstat(target)
    except FileNotFoundError:
        if not target.parent.is_dir():
            raise SnapshotError(f"snapshot file {target}: no such directory {target.parent}") from None
        return target
    except OSError as e:
        raise SnapshotError(f"snapshot file {target}: {e.strerror or _reason(e)}") from None
    if stat.S_ISLNK(info.st_mode):
        raise SnapshotError(f"snapshot file {target} is a symbolic link; it is not followed or replaced "
                            f"(give the path of a regular file)")
    if not stat.S_ISREG(info.st_mode):
        raise SnapshotError(f"snapshot file {target} exists and is not a regular file")
    if info.st_uid != os.geteuid():
        raise SnapshotError(f"snapshot file {target} belongs to another user (uid {info.st_uid}); "
                            f"it is not replaced (choose another path)")
    return target


def write_private(path: str | os.PathLike[str], data: bytes) -> None:
    """Write ``data`` to ``path`` readable by this user only (mode 0600, whatever the umask).

    A new file is created with ``O_CREAT | O_EXCL | O_NOFOLLOW`` under a random name in
    the same directory, written, synced, checked again with :func:`check_destination`,
    and renamed over ``path`` (``os.replace``: atomic, and a rename never follows a
    symbolic link). Raises :class:`SnapshotError` with the reason; nothing is left behind.
    """
    target = check_destination(path)
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
    temporary = target.with_name(f".{target.name}.{secrets.token_hex(8)}.tmp")
    try:
        fd = os.open(temporary, flags, 0o600)
    except OSError as e:
        raise SnapshotError(f"snapshot file {target}: cannot create a file in {target.parent}: "
                            f"{e.strerror or _reason(e)}") from None
    try:
        try:
            os.fchmod(fd, 0o600)  # a umask such as 0o277 would have taken the owner's write bit
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        finally:
            os.close(fd)
        check_destination(target)
        os.replace(temporary, target)
    except BaseException as e:
        try:
            os.unlink(temporary)
        except OSError:
            pass
        if isinstance(e, OSError):
            raise SnapshotError(f"snapshot file {target}: cannot write it: {e.strerror or _reason(e)}") from None
        raise


@lru_cache(maxsize=1)
def _classes() -> tuple[type[Any], type[Any]]:
    # Imported lazily: vncdotool.client imports the global reactor at import time, which
    # must not happen before the application has chosen its reactor.
    from PIL import Image
    from vncdotool.client import VNCDoToolClient, VNCDoToolFactory

    class Client(VNCDoToolClient):
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

    class Factory(VNCDoToolFactory):
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
    check_destination(path)
    endpoint = HostnameEndpoint(reactor, host, port, timeout=max(1, int(timeout)))
    try:
        client: Any = await endpoint.connect(factory_class())
    except (CancelledError, neterror.ConnectingCancelledError):
        raise SnapshotError(f"snapshot client: stopped while connecting to {host}:{port}") from None
    except Exception as exc:
        raise SnapshotError(f"snapshot client: cannot connect to {host}:{port}: {_reason(exc)}") from None

    def expire() -> None:
        client.fail(f"no full frame from {host}:{port} within {timeout:g} s")
        client.transport.abortConnection()

    timer = reactor.callLater(timeout, expire)
    try:
        image = await client.done
    except CancelledError:
        # Stopped from outside: answer now, with a reason (the connection closes by itself).
        client.transport.abortConnection()
        raise SnapshotError(f"snapshot client: stopped before a full frame arrived from {host}:{port}") from None
    except BaseException:
        client.transport.loseConnection()
        await client.lost
        raise
    finally:
        if timer.active():
            timer.cancel()
    try:
        png = io.BytesIO()
        image.save(png, format="PNG")
        write_private(path, png.getvalue())
        size: tuple[int, int] = image.size
    finally:
        client.transport.loseConnection()
        await client.lost
    return size


def take_snapshot(
    reactor: Any, host: str, port: int, path: str | os.PathLike[str], timeout: float = 30.0
) -> Deferred[tuple[int, int]]:
    """Connect to the RFB server at ``host:port``, save one full frame as PNG at ``path``.

    ``timeout``: seconds for the whole exchange. The file is written by
    :func:`write_private` (mode 0600, never through a symbolic link, never over another
    user's file). Returns a Deferred firing with ``(width, height)`` in pixels after the
    connection is closed again; it fails with :class:`SnapshotError` (a
    :class:`~secshadow.errors.ViewerError`) when the destination is refused, the
    connection is refused or lost, the server is not RFB or wants a password, no frame
    arrives in time, or the Deferred is cancelled ("stopped before a full frame
    arrived"); the message is never empty.
    """
    return Deferred.fromCoroutine(_snapshot(reactor, host, port, path, timeout))


def read_pixel(path: str | os.PathLike[str], x: int, y: int) -> tuple[int, int, int]:
    """The ``(r, g, b)`` of pixel ``(x, y)`` in the image at ``path`` (Pillow)."""
    from PIL import Image

    with Image.open(path) as image:
        pixel = image.convert("RGB").getpixel((x, y))
    assert isinstance(pixel, tuple)
    return int(pixel[0]), int(pixel[1]), int(pixel[2])
