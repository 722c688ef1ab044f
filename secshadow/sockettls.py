"""TLS to the device on the real socket: pyOpenSSL bound to the TCP socket, driven by the reactor.

Twisted's TLS (``TLSMemoryBIOProtocol``) pumps every record through memory BIOs and its
TCP transport's buffers: most of the proxy's CPU during bulk (``docs/performance.md``).
:class:`SocketTLS` instead binds an ``SSL.Connection`` to the connected socket itself
and is its own reactor descriptor (``addReader``/``addWriter`` on the socket's fd): the
handshake is ``do_handshake`` retried on ``WantRead``/``WantWrite``, reads are up to
:attr:`SocketTLS.READ_RECORDS` ``SSL_read`` calls per wake-up, writes go out at once.

Nothing of the pin changes: the connection comes from
:meth:`~secshadow.pinning.PinnedConnectionCreator.connection_for` (the shared context that
can resume nothing, the pin as this connection's verify callback, failing the handshake
inside OpenSSL through :meth:`SocketTLS.failVerification`); :class:`~secshadow.tunnel.DeviceLink`
re-checks the peer after the handshake and before ``PROCYCMD`` through :meth:`getHandle`.

To the protocol (a ``DeviceLink``) it is the transport Twisted's TLS is: ``write``,
``loseConnection`` (``close_notify``, then the peer's end), ``abortConnection``,
``getHandle``, ``getPeer``/``getHost``, push producer (pause/resume reading) and
consumer (a registered producer is paused while more than :attr:`SocketTLS.HIGH_WATER`
plaintext bytes wait). :mod:`secshadow.fastrelay` sets :attr:`SocketTLS.view_receiver`
to send each record straight to a viewer's socket from the buffer OpenSSL decrypted it
into (:func:`record_reader`: no allocation and no copy per record).
"""

from __future__ import annotations

import socket
from collections import deque
from typing import Any, Callable

from OpenSSL import SSL

try:  # pyOpenSSL's cffi binding: record_reader reads records without a copy through it
    from OpenSSL._util import ffi as _ffi, lib as _lib
except ImportError:  # pragma: no cover - another pyOpenSSL: record_reader falls back to recv
    _ffi = _lib = None
from twisted.internet import error as ierror
from twisted.internet.interfaces import IConsumer, IHandshakeListener, IPushProducer, IReadWriteDescriptor
from twisted.internet.posixbase import PosixReactorBase
from twisted.internet.protocol import Protocol
from twisted.python.failure import Failure
from zope.interface import implementer

_DONE = Failure(ierror.ConnectionDone())

HANDSHAKE, OPEN, SHUTDOWN, CLOSED = "handshake", "open", "shutdown", "closed"


@implementer(IReadWriteDescriptor, IPushProducer, IConsumer)
class SocketTLS:
    """A client TLS connection on the connected, non-blocking socket ``sock``.

    ``reactor``: a real reactor (``IReactorFDSet``, ``callLater``). ``connection``: an
    ``SSL.Connection`` bound to ``sock`` in connect state (its app data is this object:
    see :meth:`bind`). ``protocol``: gets ``makeConnection``, ``handshakeCompleted`` (if
    an ``IHandshakeListener``), ``dataReceived`` and ``connectionLost`` (``ConnectionDone``
    for a clean end, ``ConnectionLost`` for a TLS or socket error, ``ConnectionAborted``
    after :meth:`abortConnection`, the pin's :class:`~secshadow.errors.PinMismatch` when
    the verify callback refused the peer). ``peer``/``host``: Twisted addresses.
    """

    #: ``SSL_read`` calls per readable event before the reactor runs others (fairness).
    READ_RECORDS = 16
    #: Plaintext bytes waiting for the socket above which a registered producer is paused.
    HIGH_WATER = 64 * 1024

    def __init__(self, reactor: Any, sock: socket.socket, protocol: Any, peer: Any = None, host: Any = None) -> None:
        #: The reactor this connection's descriptor is registered with (a relay joins it).
        self.reactor = reactor
        self.socket = sock
        self._fd = sock.fileno()
        self.protocol = protocol
        self._peer, self._host = peer, host
        self._conn: SSL.Connection | None = None
        self._read_record: Callable[[], Any] = lambda: b""
        self.state = HANDSHAKE
        #: Called with each decrypted record (bytes); the protocol's ``dataReceived`` by default.
        self.receiver: Callable[[bytes], None] = protocol.dataReceived
        #: If set, called instead of :attr:`receiver` with each record as a buffer that is
        #: only valid during the call (reused for the next record): no copy per record.
        self.view_receiver: Callable[[Any], None] | None = None
        self._out: deque[bytes] = deque()
        self.out_size = 0
        self._paused = False
        self._read_wants_write = False
        self._handshake_wants = "write"
        self._disconnecting = False
        self._notify_sent = False
        self._verify_failure: Failure | None = None
        self._producer: Any = None
        self._producer_paused = False
        self._events = Interest(reactor, self)
        self.connected = True

    def bind(self, connection: SSL.Connection) -> None:
        """Take ``connection`` (bound to this socket), tell the protocol, start the handshake."""
        self._conn = connection
        self._read_record = record_reader(connection)
        self.protocol.makeConnection(self)
        self._handshake()

    # ------------------------------------------------------------ descriptor
    def fileno(self) -> int:
        return self._fd

    def logPrefix(self) -> str:
        return "SocketTLS"

    def doRead(self) -> None:
        if self.state == HANDSHAKE:
            self._handshake()
        elif self.state == OPEN:
            if self._read_wants_write:
                return
            self._read_records()
        elif self.state == SHUTDOWN:
            self._drain_until_end()

    def doWrite(self) -> None:
        if self.state == HANDSHAKE:
            self._handshake()
            return
        if self.state == SHUTDOWN:
            if not self._notify_sent:
                self._shutdown()
            return
        if self._read_wants_write:
            self._read_wants_write = False
            self._read_records()
        if self.state == OPEN:
            self._flush()

    def connectionLost(self, reason: Failure) -> None:
        """The reactor's report of a failure on this descriptor."""
        self._close(reason)

    # ------------------------------------------------------------ the handshake
    def failVerification(self, reason: Failure) -> None:
        """The pin refused the peer (called from inside ``do_handshake``)."""
        self._verify_failure = reason

    def _handshake(self) -> None:
        assert self._conn is not None
        try:
            self._conn.do_handshake()
        except SSL.WantReadError:
            self._handshake_wants = "read"
        except SSL.WantWriteError:
            self._handshake_wants = "write"
        except SSL.Error as e:
            self._close(self._verify_failure or Failure(e))
            return
        else:
            self.state = OPEN
            if IHandshakeListener.providedBy(self.protocol):
                self.protocol.handshakeCompleted()
            if self.state == OPEN:
                self._flush()
        self._interest()

    # ------------------------------------------------------------ reading
    def _read_records(self) -> None:
        conn = self._conn
        assert conn is not None
        read = self._read_record
        for _ in range(self.READ_RECORDS):
            if self._paused or self.state != OPEN:
                break
            try:
                record = read()
            except SSL.WantReadError:
                break
            except SSL.WantWriteError:
                self._read_wants_write = True
                break
            except SSL.ZeroReturnError:  # the device's close_notify
                self._disconnecting = True
                self._shutdown()
                return
            except SSL.Error as e:
                self._close(Failure(ierror.ConnectionLost(str(e))))
                return
            if self.view_receiver is not None:
                self.view_receiver(record)
            else:
                self.receiver(record[:])
        self._interest()

    def _drain_until_end(self) -> None:
        """After our close_notify: discard what comes until the peer's end."""
        assert self._conn is not None
        for _ in range(self.READ_RECORDS):
            try:
                self._conn.recv(65536)
            except (SSL.WantReadError, SSL.WantWriteError):
                return
            except SSL.Error:  # close_notify (ZeroReturnError), EOF, reset
                self._close(_DONE)
                return

    # ------------------------------------------------------------ writing
    def write(self, data: bytes) -> None:
        """Encrypt and send ``data`` now; what the socket cannot take waits (in order)."""
        if not data or self._disconnecting or self.state == CLOSED:
            return
        self._out.append(data)
        self.out_size += len(data)
        if self.state == OPEN:
            self._flush()
        if self._producer is not None and self.out_size > self.HIGH_WATER and not self._producer_paused:
            self._producer_paused = True
            self._producer.pauseProducing()

    def writeSequence(self, data: list[bytes]) -> None:
        for chunk in data:
            self.write(chunk)

    def _flush(self) -> None:
        conn = self._conn
        assert conn is not None
        while self._out:
            chunk = self._out[0]  # after WantWrite, retried as the same object
            try:
                sent = conn.send(chunk)
            except (SSL.WantWriteError, SSL.WantReadError):
                self._interest()
                return
            except SSL.Error as e:
                self._close(Failure(ierror.ConnectionLost(str(e))))
                return
            self.out_size -= sent
            if sent < len(chunk):  # pyOpenSSL's contexts allow partial writes: keep the rest
                self._out[0] = chunk[sent:]
            else:
                self._out.popleft()
        if self._producer is not None and self._producer_paused:
            self._producer_paused = False
            self._producer.resumeProducing()
        if self._disconnecting and self.state == OPEN:
            self._shutdown()
            return
        self._interest()

    # ------------------------------------------------------------ producer / consumer
    def pauseProducing(self) -> None:
        self._paused = True
        self._interest()

    def resumeProducing(self) -> None:
        if self._paused:
            self._paused = False
            if self.state == OPEN and not self._read_wants_write:
                self._read_records()  # what OpenSSL may already hold is not signalled by epoll
            self._interest()

    def stopProducing(self) -> None:
        self.loseConnection()

    def registerProducer(self, producer: Any, streaming: bool) -> None:
        self._producer, self._producer_paused = producer, False

    def unregisterProducer(self) -> None:
        self._producer = None

    # ------------------------------------------------------------ the end
    def loseConnection(self) -> None:
        """Send what waits, then ``close_notify``; ``connectionLost(ConnectionDone)`` once the
        peer ended too (the owner aborts after its grace period if it never does)."""
        if self._disconnecting or self.state == CLOSED:
            return
        self._disconnecting = True
        if self.state == HANDSHAKE:
            self._close(_DONE)
        elif not self._out:
            self._shutdown()

    def _shutdown(self) -> None:
        assert self._conn is not None
        self.state = SHUTDOWN
        try:
            self._conn.shutdown()
        except (SSL.WantWriteError, SSL.WantReadError):
            self._interest()
            return
        except SSL.Error:
            self._close(_DONE)
            return
        self._notify_sent = True
        if self._conn.get_shutdown() & SSL.RECEIVED_SHUTDOWN:
            self._close(_DONE)
            return
        try:
            self.socket.shutdown(socket.SHUT_WR)
        except OSError:
            self._close(_DONE)
            return
        self._out.clear()
        self._interest()

    def abortConnection(self) -> None:
        """Close the socket now, no ``close_notify``; ``connectionLost(ConnectionAborted)``."""
        if self.state == CLOSED:
            return
        self._close(Failure(ierror.ConnectionAborted()))

    def _close(self, reason: Failure) -> None:
        if self.state == CLOSED:
            return
        self.state = CLOSED
        self.connected = False
        self._out.clear()
        self._interest()
        self.socket.close()
        self._producer = None
        self.receiver = self.protocol.dataReceived
        self.view_receiver = None
        self.protocol.connectionLost(reason)

    # ------------------------------------------------------------ helpers
    def _interest(self) -> None:
        """Register for exactly the events this state waits for."""
        state = self.state
        if state == HANDSHAKE:
            read, write = self._handshake_wants == "read", self._handshake_wants == "write"
        elif state == OPEN:
            read, write = not self._paused and not self._read_wants_write, bool(self._out) or self._read_wants_write
        elif state == SHUTDOWN:
            read, write = self._notify_sent, not self._notify_sent
        else:
            read = write = False
        self._events.want(read, write)

    def getHandle(self) -> SSL.Connection | None:
        return self._conn

    def getPeer(self) -> Any:
        return self._peer

    def getHost(self) -> Any:
        return self._host


class Interest:
    """The events a descriptor is registered for with its reactor (``IReactorFDSet``).

    :meth:`want` registers for exactly the given ones, calling the reactor only for what
    changed (``addReader``/``removeReader``, ``addWriter``/``removeWriter``).
    """

    def __init__(self, reactor: Any, descriptor: Any) -> None:
        self._reactor, self._descriptor = reactor, descriptor
        self.reading = self.writing = False

    def want(self, read: bool, write: bool) -> None:
        if read != self.reading:
            self.reading = read
            (self._reactor.addReader if read else self._reactor.removeReader)(self._descriptor)
        if write != self.writing:
            self.writing = write
            (self._reactor.addWriter if write else self._reactor.removeWriter)(self._descriptor)


#: The most plaintext one TLS record carries (RFC 8446 section 5.1: 2^14 bytes).
MAX_RECORD_PLAINTEXT = 16384
_read_buffer: Any = None


def reads_without_copy(conn: Any) -> bool:
    """Whether :func:`record_reader` can read ``conn`` through pyOpenSSL's cffi binding
    (``OpenSSL._util``, ``Connection._ssl``, ``Connection._raise_ssl_error``); False for
    a pyOpenSSL without them, or a stand-in."""
    return _lib is not None and isinstance(conn, SSL.Connection) and hasattr(conn, "_ssl") \
        and hasattr(conn, "_raise_ssl_error")


def record_reader(conn: Any) -> Callable[[], Any]:
    """``read()`` for ``conn``: one ``SSL_read`` into one buffer shared by the process (the
    reactor's thread reads one record at a time), returned as a cffi buffer holding the
    record's plaintext (``len``, slicing gives ``bytes``, ``socket.send`` takes it),
    valid until the next read. Errors are raised as ``SSL.Connection.recv`` raises them
    (``WantReadError``, ``ZeroReturnError``, ``SysCallError``, ...), by the same mapping.

    Why: pyOpenSSL's ``recv`` allocates a buffer and copies the record into a new
    ``bytes`` on every call; the relay sends the record on at once, so neither is needed
    (about a fifth of the proxy's CPU per GB, ``docs/performance.md``). The buffer holds a
    whole record, so OpenSSL never keeps part of one that epoll would not report. Without
    the binding (:func:`reads_without_copy`), ``conn.recv``: same results, one copy more.
    """
    global _read_buffer
    if not reads_without_copy(conn):
        return lambda: conn.recv(MAX_RECORD_PLAINTEXT)
    if _read_buffer is None:
        _read_buffer = _ffi.new("char[]", MAX_RECORD_PLAINTEXT)
    buf, ssl, ssl_read, as_buffer, raise_error = (_read_buffer, conn._ssl, _lib.SSL_read, _ffi.buffer,
                                                  conn._raise_ssl_error)

    def read() -> Any:
        count = ssl_read(ssl, buf, MAX_RECORD_PLAINTEXT)
        if count <= 0:
            raise_error(ssl, count)  # raises: WantReadError, ZeroReturnError, ...
        return as_buffer(buf, count)

    return read


class SocketHandover(Protocol):
    """Takes the socket of a just-connected Twisted TCP transport for a :class:`SocketTLS`.

    ``make_protocol()``: builds the TLS connection's protocol (a ``DeviceLink``);
    ``connection_for(app, sock)``: the pinned connection factory
    (:meth:`~secshadow.pinning.PinnedConnectionCreator.connection_for`). After
    ``connectionMade``, :attr:`tls` is the :class:`SocketTLS` and :attr:`protocol` its
    protocol; the Twisted transport no longer reads or writes that socket.
    """

    def __init__(self, reactor: Any, make_protocol: Callable[[], Any],
                 connection_for: Callable[[Any, socket.socket], SSL.Connection]) -> None:
        self._reactor = reactor
        self._make_protocol = make_protocol
        self._connection_for = connection_for
        self.tls: SocketTLS | None = None
        self.protocol: Any = None
        #: The protocol's ``ready`` Deferred, taken before the handshake starts.
        self.ready: Any = None

    def connectionMade(self) -> None:
        transport: Any = self.transport
        transport.stopReading()
        transport.stopWriting()
        sock = transport.socket
        no_delay(sock)
        self.protocol = self._make_protocol()
        self.ready = getattr(self.protocol, "ready", None)
        self.tls = SocketTLS(self._reactor, sock, self.protocol, transport.getPeer(), transport.getHost())
        self.tls.bind(self._connection_for(self.tls, sock))


def no_delay(sock: socket.socket) -> None:
    """``TCP_NODELAY`` on a TCP socket (as stunnel and Xvnc do): small RFB messages leave
    at once instead of waiting for the previous segment's ACK."""
    if getattr(sock, "family", None) in (socket.AF_INET, socket.AF_INET6):
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:
            pass


def has_real_sockets(reactor: Any) -> bool:
    """Whether ``reactor`` runs real descriptors (epoll, poll, select), not a test double."""
    return isinstance(reactor, PosixReactorBase)
