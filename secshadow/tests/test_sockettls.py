"""Unit tests of the socket-bound device TLS and the fast relay, with fakes only.

``SocketTLS`` and ``FastSplice`` are driven here through scripted stand-ins for the
socket and the ``SSL.Connection`` (the conftest guard forbids real sockets in unit
tests) on a ``MemoryReactorClock``, whose ``readers``/``writers`` sets show what each
side waits for. The real-socket behaviour is covered by the integration tests
(``test_fastpath_integration.py``) and the whole suite, which runs on this path.
"""

from __future__ import annotations

import socket
from collections import deque
from typing import Any

import pytest
from OpenSSL import SSL
from twisted.internet import error as ierror, tcp
from twisted.internet.interfaces import IHandshakeListener
from twisted.internet.protocol import Protocol
from twisted.internet.testing import MemoryReactorClock
from twisted.python.failure import Failure
from zope.interface import implementer

from secshadow.errors import PinMismatch
from secshadow.rfbfilter import RFBFilterError
from secshadow.fastrelay import FastSplice, can_relay_fast
from secshadow.sockettls import MAX_RECORD_PLAINTEXT, SocketTLS, reads_without_copy, record_reader


_DONE = Failure(ierror.ConnectionDone())


class FakeSock:
    """A non-blocking socket: ``capacity`` bytes may be sent before EAGAIN; ``incoming``
    chunks are received (``b""`` = the peer's end)."""

    def __init__(self, fd: int, capacity: int = 10**9) -> None:
        self.fd, self.capacity = fd, capacity
        self.sent = bytearray()
        self.incoming: deque[bytes] = deque()
        self.closed = False
        self.shut: list[int] = []

    def fileno(self) -> int:
        return self.fd

    def send(self, data: bytes) -> int:
        if self.capacity <= 0:
            raise BlockingIOError()
        n = min(len(data), self.capacity)
        self.capacity -= n
        self.sent += data[:n]
        return n

    def recv(self, size: int) -> bytes:
        if not self.incoming:
            raise BlockingIOError()
        return self.incoming.popleft()

    def shutdown(self, how: int) -> None:
        self.shut.append(how)

    def close(self) -> None:
        self.closed = True

    def setblocking(self, flag: bool) -> None:
        pass


class FakeTLS:
    """A client ``SSL.Connection`` after its script: handshake steps, records, a send window."""

    def __init__(self, handshake: list[Any] | None = None) -> None:
        self.handshake = handshake if handshake is not None else [SSL.WantReadError(), None]
        self.records: deque[Any] = deque()
        self.sent: list[bytes] = []
        self.blocked = False
        self.window = 10**9  # bytes one send accepts (pyOpenSSL's contexts allow partial writes)
        self.attempts: list[bytes] = []
        self.shutdowns = 0
        self.recv_calls = 0
        self._shutdown = 0

    def do_handshake(self) -> None:
        step = self.handshake.pop(0)
        if callable(step):
            step = step()
        if isinstance(step, Exception):
            raise step

    def recv(self, size: int) -> bytes:
        self.recv_calls += 1
        if not self.records:
            raise SSL.WantReadError()
        item = self.records.popleft()
        if isinstance(item, SSL.ZeroReturnError):
            self._shutdown |= SSL.RECEIVED_SHUTDOWN  # the peer's close_notify, as OpenSSL records it
        if isinstance(item, Exception):
            raise item
        return item

    def send(self, data: bytes) -> int:
        self.attempts.append(data)
        if self.blocked:
            raise SSL.WantWriteError()
        n = min(len(data), self.window)
        self.sent.append(data[:n])
        return n

    def shutdown(self) -> bool:
        self.shutdowns += 1
        self._shutdown |= SSL.SENT_SHUTDOWN
        return False

    def get_shutdown(self) -> int:
        return self._shutdown


@implementer(IHandshakeListener)
class Recorder(Protocol):
    def __init__(self) -> None:
        self.data: list[bytes] = []
        self.handshakes = 0
        self.lost: list[Failure] = []

    def handshakeCompleted(self) -> None:
        self.handshakes += 1

    def dataReceived(self, data: bytes) -> None:
        self.data.append(data)

    def connectionLost(self, reason: Failure = _DONE) -> None:
        self.lost.append(reason)


def open_tls(records: list[Any] | None = None) -> tuple[MemoryReactorClock, SocketTLS, FakeTLS, FakeSock, Recorder]:
    reactor, sock, conn, proto = MemoryReactorClock(), FakeSock(7), FakeTLS(), Recorder()
    tls = SocketTLS(reactor, sock, proto)  # type: ignore[arg-type]
    tls.bind(conn)  # type: ignore[arg-type]
    tls.doRead()  # the server's flight came: the handshake completes
    conn.records.extend(records or [])
    return reactor, tls, conn, sock, proto


# ------------------------------------------------------------------ SocketTLS
def test_the_handshake_waits_for_the_socket_then_reports_and_reads():
    reactor, sock, conn, proto = MemoryReactorClock(), FakeSock(7), FakeTLS(), Recorder()
    tls = SocketTLS(reactor, sock, proto)  # type: ignore[arg-type]
    tls.bind(conn)  # type: ignore[arg-type]
    assert proto.handshakes == 0 and tls in reactor.readers and tls not in reactor.writers
    tls.write(b"PROCYCMD")  # written only once the handshake is done
    assert conn.sent == []
    tls.doRead()
    assert proto.handshakes == 1 and conn.sent == [b"PROCYCMD"] and tls in reactor.readers


def test_a_refused_pin_ends_the_handshake_with_the_pin_error_and_no_byte_written():
    reactor, sock, proto = MemoryReactorClock(), FakeSock(7), Recorder()
    tls = SocketTLS(reactor, sock, proto)  # type: ignore[arg-type]

    def verify_refuses() -> Exception:
        tls.failVerification(Failure(PinMismatch("not the pinned certificate")))
        return SSL.Error([("SSL routines", "", "certificate verify failed")])

    conn = FakeTLS([SSL.WantReadError(), verify_refuses])
    tls.bind(conn)  # type: ignore[arg-type]
    tls.write(b"PROCYCMD PW_secret")
    tls.doRead()
    assert proto.lost[0].check(PinMismatch) and proto.handshakes == 0
    assert conn.sent == [] and sock.closed
    assert tls not in reactor.readers and tls not in reactor.writers


def test_one_wake_up_reads_at_most_READ_RECORDS_and_pausing_stops_reading():
    reactor, tls, conn, _, proto = open_tls([b"r%d" % i for i in range(40)])
    tls.doRead()
    assert len(proto.data) == SocketTLS.READ_RECORDS
    tls.pauseProducing()
    assert tls not in reactor.readers
    tls.resumeProducing()  # reads what may be held without waiting for epoll
    assert len(proto.data) == 2 * SocketTLS.READ_RECORDS and tls in reactor.readers


def test_a_blocked_write_is_retried_with_the_same_object_and_pauses_the_producer():
    reactor, tls, conn, _, _ = open_tls()
    paused: list[str] = []

    class Producer:
        def pauseProducing(self) -> None:
            paused.append("pause")

        def resumeProducing(self) -> None:
            paused.append("resume")

    tls.registerProducer(Producer(), True)
    conn.blocked = True
    big = b"x" * (SocketTLS.HIGH_WATER + 1)
    tls.write(big)
    assert paused == ["pause"] and tls in reactor.writers and tls.out_size == len(big)
    conn.blocked = False
    tls.doWrite()
    assert conn.attempts[-1] is big and conn.sent == [big]  # OpenSSL's retry rule
    assert paused == ["pause", "resume"] and tls not in reactor.writers and tls.out_size == 0


def test_a_partial_write_keeps_the_rest_in_order():
    reactor, tls, conn, _, _ = open_tls()
    conn.window = 4
    tls.write(b"0123456789")
    tls.write(b"ab")
    assert b"".join(conn.sent) == b"0123456789ab" and tls.out_size == 0


def test_lose_connection_sends_what_waits_then_close_notify_and_ends_with_the_peer():
    reactor, tls, conn, sock, proto = open_tls()
    conn.blocked = True
    tls.write(b"last words")
    tls.loseConnection()
    tls.write(b"too late")
    assert conn.shutdowns == 0 and not proto.lost
    conn.blocked = False
    tls.doWrite()
    assert conn.sent == [b"last words"] and conn.shutdowns == 1 and sock.shut == [socket.SHUT_WR]
    assert not proto.lost  # waits for the device's end (the owner aborts after its grace)
    conn.records.append(SSL.ZeroReturnError())
    tls.doRead()
    assert proto.lost[0].check(ierror.ConnectionDone) and sock.closed


def test_the_device_close_notify_is_a_clean_end_and_abort_is_an_abort():
    _, tls, conn, sock, proto = open_tls([b"bye", SSL.ZeroReturnError()])
    tls.doRead()
    assert proto.data == [b"bye"] and proto.lost[0].check(ierror.ConnectionDone) and conn.shutdowns == 1
    _, tls, conn, sock, proto = open_tls()
    tls.abortConnection()
    tls.abortConnection()
    assert len(proto.lost) == 1 and proto.lost[0].check(ierror.ConnectionAborted)
    assert conn.shutdowns == 0 and sock.closed


def test_a_tls_error_while_reading_is_a_lost_connection():
    _, tls, _, _, proto = open_tls([SSL.SysCallError(104, "ECONNRESET")])
    tls.doRead()
    assert proto.lost[0].check(ierror.ConnectionLost)


# ------------------------------------------------------------------ FastSplice
class ViewerProto(Protocol):
    def __init__(self) -> None:
        self.lost: list[Failure] = []

    def connectionLost(self, reason: Failure = _DONE) -> None:
        self.lost.append(reason)


def relay(records: list[bytes], viewer_capacity: int = 10**9, to_viewer: Any = None,
          to_device: Any = None) -> Any:
    reactor, tls, conn, _, device_proto = open_tls()
    vsock = FakeSock(9, viewer_capacity)
    viewer = tcp.Connection(vsock, ViewerProto(), reactor)  # type: ignore[arg-type]
    viewer.connected = True
    viewer.startReading()
    assert can_relay_fast(tls, viewer)
    refused: list[Exception] = []
    closed: list[str] = []
    splice = FastSplice(reactor, tls, viewer, reactor, on_closed=closed.append, on_refused=refused.append,
                        left_to_right=to_viewer, right_to_left=to_device)
    splice.start()
    conn.records.extend(records)

    class Run:
        pass

    run = Run()
    run.__dict__.update(reactor=reactor, tls=tls, conn=conn, vsock=vsock, viewer=viewer, splice=splice,
                        refused=refused, closed=closed, device_proto=device_proto)
    return run


def test_the_relay_owns_the_viewer_socket_and_sends_each_record_straight():
    run = relay([b"hello ", b"world"])
    assert run.viewer not in run.reactor.readers and run.splice in run.reactor.readers
    run.tls.doRead()
    assert bytes(run.vsock.sent) == b"hello world" and run.device_proto.data == []
    assert run.splice.bytes_left_to_right == 11


def test_a_viewer_that_stops_reading_stops_the_device_with_at_most_one_record_kept():
    records = [b"a" * 16384 for _ in range(40)]
    run = relay(records, viewer_capacity=20000)
    run.tls.doRead()
    assert run.conn.recv_calls == 2  # the second record did not fit: no third read
    assert run.tls not in run.reactor.readers and run.splice in run.reactor.writers
    for _ in range(5):  # the device's socket stays readable: nothing more is read
        run.tls.doRead()
    assert run.conn.recv_calls == 2 and len(run.splice._pending) == 2 * 16384 - 20000
    run.vsock.capacity = 10**9
    run.splice.doWrite()  # the viewer drained: the rest goes, the device reads again
    assert run.splice not in run.reactor.writers and run.tls in run.reactor.readers
    run.tls.doRead()
    run.tls.doRead()
    assert len(run.vsock.sent) == 40 * 16384 and run.splice.bytes_left_to_right == 40 * 16384


def test_a_device_that_stops_reading_stops_the_viewer():
    run = relay([])
    run.conn.blocked = True
    for _ in range(3):
        run.vsock.incoming.append(b"k" * 30000)
        run.splice.doRead()
    assert run.tls.out_size == 90000 and run.splice not in run.reactor.readers
    run.conn.blocked = False
    run.tls.doWrite()
    assert run.splice in run.reactor.readers and b"".join(run.conn.sent) == b"k" * 90000


def test_the_view_only_filter_sees_the_viewer_bytes_and_its_refusal_ends_the_relay():
    def no_input(data: bytes) -> bytes:
        if data.startswith(b"\x05"):
            raise RFBFilterError("a pointer event in a view-only session")
        return data

    run = relay([], to_device=no_input)
    run.vsock.incoming.append(b"\x03ok")
    run.splice.doRead()
    run.vsock.incoming.append(b"\x05click")
    run.splice.doRead()
    assert run.conn.sent == [b"\x03ok"] and isinstance(run.refused[0], RFBFilterError)
    assert run.splice.closed_by == "refused" and run.splice not in run.reactor.readers
    with pytest.raises(RFBFilterError):  # through deliver (early bytes), the caller hears it
        relay([], to_device=no_input).splice.deliver("right", b"\x05")


def test_the_viewer_end_is_handed_back_to_its_transport_which_reports_it():
    run = relay([])
    run.vsock.incoming.append(b"")
    run.splice.doRead()
    assert run.splice not in run.reactor.readers and run.viewer in run.reactor.readers
    assert not run.device_proto.lost  # the owner closes the device when the transport reports


def test_stop_gives_the_unsent_rest_to_the_viewer_transport():
    run = relay([b"z" * 100], viewer_capacity=40)
    run.tls.doRead()
    run.splice.stop("closed by the console")
    assert run.splice not in run.reactor.writers and run.viewer in run.reactor.writers
    assert run.tls.receiver == run.device_proto.dataReceived
    run.vsock.capacity = 10**9
    run.viewer.doWrite()
    assert bytes(run.vsock.sent) == b"z" * 100
    run.splice.deliver("left", b"after")  # a stopped relay forwards nothing
    assert bytes(run.vsock.sent) == b"z" * 100


# ---------------------------------------------------------------- record_reader, real TLS
def _memory_pair() -> tuple[SSL.Connection, SSL.Connection]:
    """A pinned client and a device-like server, both on memory BIOs, handshake done."""
    from secshadow.lab.certs import der_of
    from secshadow.pinning import PinnedConnectionCreator, TLSProfile
    from secshadow.tests._tls import ServerCreator, device_cert

    cert, key = device_cert()
    server = ServerCreator(cert, key).serverConnectionForTLS(None)
    server.set_accept_state()
    app = Recorder()
    client = PinnedConnectionCreator(der_of(cert), TLSProfile.MODERN).connection_for(app, None)
    for _ in range(20):
        for a, b in ((client, server), (server, client)):
            try:
                a.do_handshake()
            except SSL.WantReadError:
                pass
            _move(a, b)
        if client.get_state_string() == b"SSL negotiation finished successfully" and \
                server.get_state_string() == b"SSL negotiation finished successfully":
            return client, server
    raise AssertionError("the in-memory handshake did not finish")


def _move(source: SSL.Connection, target: SSL.Connection) -> None:
    while True:
        try:
            target.bio_write(source.bio_read(65536))
        except SSL.WantReadError:
            return


def test_the_installed_pyopenssl_lets_records_be_read_without_a_copy():
    # If a pyOpenSSL update removes the binding, the relay still works (recv) but is
    # slower: this makes that visible instead of silent.
    client, _ = _memory_pair()
    assert reads_without_copy(client)
    assert not reads_without_copy(FakeTLS())


def test_record_reader_gives_each_record_whole_then_want_read_then_the_clean_end():
    client, server = _memory_pair()
    read = record_reader(client)
    full, small = bytes(range(256)) * 64, b"RFB 003.008\n"  # one 16 KiB record, one small
    server.send(full)
    server.send(small)
    _move(server, client)
    first = read()
    assert len(first) == MAX_RECORD_PLAINTEXT and first[:] == full
    assert read()[:] == small
    with pytest.raises(SSL.WantReadError):
        read()
    server.shutdown()
    _move(server, client)
    with pytest.raises(SSL.ZeroReturnError):
        read()


def test_a_record_buffer_is_valid_until_the_next_read_only():
    # The contract the relay relies on: it sends or copies a record during the call.
    client, server = _memory_pair()
    read = record_reader(client)
    server.send(b"a" * 100)
    server.send(b"b" * 100)
    _move(server, client)
    first = read()
    kept = first[:]
    read()
    assert kept == b"a" * 100 and first[:] == b"b" * 100  # the buffer was reused


def test_without_the_binding_the_reader_is_recv():
    fake = FakeTLS()
    fake.records.append(b"record")
    assert record_reader(fake)() == b"record"
