"""Which local user is at the other end of a viewer connection (issue 9 item 5, the
mechanism): real sockets, real processes of another uid (root forks a child that drops to
uid 65534 and connects), for a Unix socket, loopback TCP over IPv4 and over IPv6."""

from __future__ import annotations

import os
import socket
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.testing import StringTransport

from secshadow.peercred import decode_proc_address, owner_in_tables, peer_uid

NOBODY = 65534
linux_root = pytest.mark.skipif(
    not sys.platform.startswith("linux") or os.geteuid() != 0,
    reason="needs Linux and root (to start a client process of another uid)",
)


def ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
    except OSError:
        return False
    return True


class Recorder(Protocol):
    """Records ``peer_uid`` of each accepted connection, then keeps it open until told."""

    def __init__(self, seen: list[int | None], arrived: Deferred[None]) -> None:
        self.seen, self.arrived = seen, arrived

    def connectionMade(self) -> None:
        self.seen.append(peer_uid(self.transport))
        if not self.arrived.called:
            self.arrived.callback(None)


def connect_as(uid: int | None, family: int, address: Any) -> int:
    """Fork a child that (optionally) drops to ``uid``, connects, and waits for the close."""
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        code = 1
        try:
            if uid is not None:
                os.setgroups([])
                os.setgid(uid)
                os.setuid(uid)
            s = socket.socket(family, socket.SOCK_STREAM)
            s.settimeout(10)
            s.connect(address)
            s.recv(1)
            code = 0
        finally:
            os._exit(code)
    return pid


def reap(pid: int, timeout: float = 10) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        time.sleep(0.02)
    os.kill(pid, 9)
    os.waitpid(pid, 0)
    raise AssertionError("the client process did not end")


async def uid_seen_by_server(listen: Any, family: int, address_of: Any, uid: int | None) -> int | None:
    seen: list[int | None] = []
    arrived: Deferred[None] = Deferred()
    protocols: list[Recorder] = []

    def build() -> Recorder:
        p = Recorder(seen, arrived)
        protocols.append(p)
        return p

    port = listen(Factory.forProtocol(build))
    try:
        pid = connect_as(uid, family, address_of(port))
        arrived.addTimeout(10, reactor)
        await arrived
        for p in protocols:
            p.transport.loseConnection()  # type: ignore[union-attr]
        assert await deferToReap(pid) == 0
    finally:
        await port.stopListening()
    assert len(seen) == 1
    return seen[0]


def deferToReap(pid: int) -> Deferred[int]:
    from twisted.internet.threads import deferToThread

    return deferToThread(reap, pid)


@linux_root
@pytest.mark.integration
@pytest.mark.parametrize("uid", [NOBODY, None], ids=["uid-65534", "root"])
@pytest_twisted.ensureDeferred
async def test_tcp_ipv4_loopback_peer_uid(uid: int | None) -> None:
    got = await uid_seen_by_server(
        lambda f: reactor.listenTCP(0, f, interface="127.0.0.1"), socket.AF_INET,
        lambda port: ("127.0.0.1", port.getHost().port), uid)
    assert got == (NOBODY if uid is not None else 0)


@linux_root
@pytest.mark.integration
@pytest.mark.skipif(not ipv6_loopback(), reason="no IPv6 loopback here")
@pytest.mark.parametrize("uid", [NOBODY, None], ids=["uid-65534", "root"])
@pytest_twisted.ensureDeferred
async def test_tcp_ipv6_loopback_peer_uid(uid: int | None) -> None:
    got = await uid_seen_by_server(
        lambda f: reactor.listenTCP(0, f, interface="::1"), socket.AF_INET6,
        lambda port: ("::1", port.getHost().port), uid)
    assert got == (NOBODY if uid is not None else 0)


@linux_root
@pytest.mark.integration
@pytest.mark.skipif(not ipv6_loopback(), reason="no IPv6 here")
@pytest_twisted.ensureDeferred
async def test_tcp_dual_stack_listener_sees_an_ipv4_client_as_mapped() -> None:
    """A listener on ``::`` gets an IPv4 client as ``::ffff:127.0.0.1`` (its entry in
    ``/proc/net/tcp``, ours in ``tcp6``): still found."""
    got = await uid_seen_by_server(
        lambda f: reactor.listenTCP(0, f, interface="::"), socket.AF_INET,
        lambda port: ("127.0.0.1", port.getHost().port), NOBODY)
    assert got == NOBODY


@linux_root
@pytest.mark.integration
@pytest.mark.parametrize("uid", [NOBODY, None], ids=["uid-65534", "root"])
@pytest_twisted.ensureDeferred
async def test_unix_socket_peer_uid(uid: int | None) -> None:
    directory = Path(tempfile.mkdtemp(prefix="secshadow-peercred-"))
    directory.chmod(0o755)
    path = str(directory / "viewer.sock")
    try:
        got = await uid_seen_by_server(
            lambda f: reactor.listenUNIX(path, f, mode=0o666), socket.AF_UNIX, lambda port: path, uid)
    finally:
        if os.path.exists(path):
            os.unlink(path)
        directory.rmdir()
    assert got == (NOBODY if uid is not None else 0)


def test_unknown_transports_say_none() -> None:
    assert peer_uid(StringTransport()) is None
    assert peer_uid(object()) is None


@pytest.mark.skipif(sys.byteorder != "little", reason="the samples are /proc text from a little-endian host")
def test_proc_net_addresses_are_decoded_as_the_kernel_prints_them() -> None:
    import ipaddress

    assert decode_proc_address("0100007F:1F90") == (ipaddress.ip_address("127.0.0.1"), 8080)
    assert decode_proc_address("00000000000000000000000001000000:0050") == (ipaddress.ip_address("::1"), 80)
    # IPv4-mapped IPv6 is compared as the IPv4 address it maps.
    assert decode_proc_address("0000000000000000FFFF00000100007F:A1B2") == (
        ipaddress.ip_address("127.0.0.1"), 0xA1B2)


@pytest.mark.skipif(sys.byteorder != "little", reason="the samples are /proc text from a little-endian host")
def test_owner_lookup_skips_listeners_and_time_wait_entries() -> None:
    """A closed peer lingers in TIME_WAIT with uid 0 and inode 0: that is "unknown",
    never "root"; a listener on the peer's address is not the peer."""
    import ipaddress

    header = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n"
    ours = (ipaddress.ip_address("127.0.0.1"), 5900)
    peer = (ipaddress.ip_address("127.0.0.1"), 40000)
    time_wait = "   0: 0100007F:9C40 0100007F:170C 06 00000000:00000000 03:00000F9C 00000000     0        0 0 3\n"
    listening = "   1: 0100007F:9C40 00000000:0000 0A 00000000:00000000 00:00000000 00000000  1000        0 77 1\n"
    established = "   2: 0100007F:9C40 0100007F:170C 01 00000000:00000000 00:00000000 00000000  1000        0 99 1\n"
    assert owner_in_tables([header + time_wait + listening], peer=peer, ours=ours) is None
    assert owner_in_tables([header + time_wait + established], peer=peer, ours=ours) == 1000
    assert owner_in_tables([header + "garbage line\n" + established], peer=peer, ours=ours) == 1000


@linux_root
@pytest.mark.integration
@pytest.mark.parametrize("family, host", [(socket.AF_INET, "127.0.0.1"), (socket.AF_INET6, "::1")], ids=["ipv4", "ipv6"])
def test_sock_diag_and_the_proc_tables_name_the_same_owner(family: int, host: str) -> None:
    # Both ways of finding the peer socket's owner (the netlink exact lookup, and the
    # /proc/net/tcp* fallback) agree on a real client of uid 65534 and on one of root.
    from secshadow import peercred

    if family == socket.AF_INET6 and not ipv6_loopback():
        pytest.skip("no IPv6 loopback here")
    for uid in (NOBODY, None):
        with socket.socket(family, socket.SOCK_STREAM) as server:
            server.bind((host, 0))
            server.listen(1)
            pid = connect_as(uid, family, server.getsockname()[:2])
            server.settimeout(10)
            conn, _ = server.accept()
            with conn:
                ours = peercred._normalise(*conn.getsockname()[:2])
                peer = peercred._normalise(*conn.getpeername()[:2])
                by_netlink = peercred.sock_diag_owner(peer=peer, ours=ours)
                tables = [Path(p).read_text() for p in ("/proc/net/tcp", "/proc/net/tcp6") if Path(p).exists()]
                by_tables = owner_in_tables(tables, peer=peer, ours=ours)
            assert reap(pid) == 0
        expected = NOBODY if uid is not None else 0
        assert (by_netlink, by_tables) == (expected, expected)


@linux_root
@pytest.mark.integration
def test_the_proc_fallback_is_used_when_netlink_cannot_answer(monkeypatch: pytest.MonkeyPatch) -> None:
    from secshadow import peercred

    monkeypatch.setattr(peercred, "sock_diag_owner", lambda **kw: peercred._UNAVAILABLE)
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(1)
        pid = connect_as(NOBODY, socket.AF_INET, server.getsockname())
        server.settimeout(10)
        conn, _ = server.accept()
        with conn:
            got = peercred._tcp_peer_uid(conn)
        assert reap(pid) == 0
    assert got == NOBODY
