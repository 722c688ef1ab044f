"""Which local user owns the other end of a connection: the mechanism behind "accept a
viewer only from the user's own uid".

- **Unix sockets**: ``SO_PEERCRED`` (``unix(7)``), the credentials the kernel recorded
  when the peer called ``connect``.
- **TCP** (loopback, or any local address): one exact lookup of the peer's socket by its
  four addresses through ``NETLINK_SOCK_DIAG`` (``sock_diag(7)``, what ``ss`` uses; a few
  microseconds whatever the number of sockets on the host), and where that is not
  available the kernel's socket table for this network namespace, ``/proc/net/tcp`` and
  ``/proc/net/tcp6`` (``proc(5)``; reading it costs milliseconds with hundreds of
  sockets open, on every viewer connection). The peer's socket is the entry whose local address is our remote address and
  whose remote address is our local one; its ``uid`` column is the owner of that socket
  (the effective uid of the process that created it). An IPv4 client of a dual-stack
  listener appears as ``::ffff:a.b.c.d`` on our side and as ``a.b.c.d`` in its own
  entry; both are compared as IPv4. Entries in TIME_WAIT (uid 0, inode 0: the peer has
  already closed) and listeners are ignored.

Anything else (not Linux, a transport without a socket, a peer on another host, a
closed peer) is ``None``: unknown, for the caller to refuse.

What this cannot tell apart: two processes of the same uid, and root, which can act as
any user anyway.
"""

from __future__ import annotations

import ipaddress
import socket
import struct
import sys
from collections.abc import Iterable
from typing import Any

Address = tuple[ipaddress.IPv4Address | ipaddress.IPv6Address, int]

#: ``/proc/net/tcp*`` states to skip: 06 TIME_WAIT (a closed peer, reported as uid 0)
#: and 0A LISTEN.
_SKIPPED_STATES = {"06", "0A"}
_TABLES = ("/proc/net/tcp", "/proc/net/tcp6")


def peer_uid(transport: Any) -> int | None:
    """The uid owning the peer of ``transport``'s connection, or ``None`` when unknown.

    ``transport``: a Twisted transport whose ``getHandle()`` is the connected socket
    (``tcp.Server``, ``unix.Server``, and their clients). Unix sockets: ``SO_PEERCRED``.
    TCP: the owner of the peer socket from ``/proc/net/tcp`` and ``/proc/net/tcp6``,
    found only when the peer is on this host. Linux only; elsewhere ``None``. Never
    raises.
    """
    get_handle = getattr(transport, "getHandle", None)
    try:
        sock = get_handle() if callable(get_handle) else None
    except Exception:  # noqa: BLE001 - a transport without a socket: unknown
        return None
    if not isinstance(sock, socket.socket) or not sys.platform.startswith("linux"):
        return None
    try:
        if sock.family == socket.AF_UNIX:
            return _unix_peer_uid(sock)
        if sock.family in (socket.AF_INET, socket.AF_INET6):
            return _tcp_peer_uid(sock)
    except (OSError, ValueError):
        return None
    return None


def _unix_peer_uid(sock: socket.socket) -> int | None:
    option = getattr(socket, "SO_PEERCRED", None)
    if option is None:
        return None
    size = struct.calcsize("3i")  # struct ucred: pid_t pid; uid_t uid; gid_t gid
    _, uid, _ = struct.unpack("3i", sock.getsockopt(socket.SOL_SOCKET, option, size))
    return int(uid)


def _normalise(host: str, port: int) -> Address:
    address = ipaddress.ip_address(host.split("%", 1)[0])
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return address, port


def _tcp_peer_uid(sock: socket.socket) -> int | None:
    ours_raw, peer_raw = sock.getsockname(), sock.getpeername()
    ours, peer = _normalise(ours_raw[0], ours_raw[1]), _normalise(peer_raw[0], peer_raw[1])
    found = sock_diag_owner(peer=peer, ours=ours)
    if found is not _UNAVAILABLE:
        return found  # type: ignore[return-value]
    tables = []
    for path in _TABLES:
        try:
            with open(path, encoding="ascii", errors="replace") as f:
                tables.append(f.read())
        except OSError:
            continue
    return owner_in_tables(tables, peer=peer, ours=ours)


#: ``sock_diag(7)``: the netlink family, the request type, flags, TCP_TIME_WAIT.
_NETLINK_SOCK_DIAG, _SOCK_DIAG_BY_FAMILY, _NLM_F_REQUEST, _NLMSG_ERROR = 4, 20, 1, 2
_TCP_TIME_WAIT = 6
_INET_DIAG_NOCOOKIE = 0xFFFFFFFF
#: Offset of ``idiag_uid`` in a reply: nlmsghdr 16, then family/state/timer/retrans 4,
#: inet_diag_sockid 48, expires/rqueue/wqueue 12.
_UID_OFFSET = 16 + 4 + 48 + 12
_UNAVAILABLE = object()


def sock_diag_owner(*, peer: Address, ours: Address) -> int | None | object:
    """The uid owning the TCP socket whose local end is ``peer`` and remote end ``ours``,
    by one ``SOCK_DIAG_BY_FAMILY`` exact lookup (``sock_diag(7)``, ``inet_diag``). IPv4
    addresses are looked up as IPv4 sockets, then as IPv4-mapped IPv6 ones (a client of
    a dual-stack listener may hold either). ``None``: no such socket (or only in
    TIME_WAIT: the peer has closed); :data:`_UNAVAILABLE`: netlink cannot answer here
    (the caller falls back to ``/proc/net/tcp``)."""
    attempts: list[tuple[int, bytes, bytes]] = []
    (peer_ip, peer_port), (our_ip, our_port) = peer, ours
    if isinstance(peer_ip, ipaddress.IPv4Address) and isinstance(our_ip, ipaddress.IPv4Address):
        attempts.append((socket.AF_INET, peer_ip.packed + bytes(12), our_ip.packed + bytes(12)))
        mapped = [ipaddress.IPv6Address(b"\0" * 10 + b"\xff\xff" + ip.packed) for ip in (peer_ip, our_ip)]
        attempts.append((socket.AF_INET6, mapped[0].packed, mapped[1].packed))
    else:
        attempts.append((socket.AF_INET6, _v6(peer_ip).packed, _v6(our_ip).packed))
    try:
        with socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM, _NETLINK_SOCK_DIAG) as netlink:
            netlink.settimeout(1.0)
            for family, source, destination in attempts:
                uid = _diag_lookup(netlink, family, peer_port, source, our_port, destination)
                if uid is not None:
                    return uid
    except (OSError, struct.error):
        return _UNAVAILABLE
    return None


def _v6(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> ipaddress.IPv6Address:
    if isinstance(address, ipaddress.IPv6Address):
        return address
    return ipaddress.IPv6Address(b"\0" * 10 + b"\xff\xff" + address.packed)


def _diag_lookup(netlink: socket.socket, family: int, sport: int, source: bytes, dport: int,
                 destination: bytes) -> int | None:
    """One ``inet_diag_req_v2`` for the exact 4-tuple; the owner's uid, or ``None``."""
    sockid = struct.pack(">HH", sport, dport) + source + destination
    sockid += struct.pack("=III", 0, _INET_DIAG_NOCOOKIE, _INET_DIAG_NOCOOKIE)
    body = struct.pack("=BBBBI", family, socket.IPPROTO_TCP, 0, 0, 0xFFFFFFFF) + sockid
    netlink.send(struct.pack("=IHHII", 16 + len(body), _SOCK_DIAG_BY_FAMILY, _NLM_F_REQUEST, 1, 0) + body)
    reply = netlink.recv(65536)
    _, kind = struct.unpack_from("=IH", reply)
    if kind == _NLMSG_ERROR:
        (error,) = struct.unpack_from("=i", reply, 16)
        if error in (0, -2):  # ENOENT: no such socket in this family
            return None
        raise OSError(-error, "sock_diag lookup failed")
    if kind != _SOCK_DIAG_BY_FAMILY or reply[17] == _TCP_TIME_WAIT:
        return None
    (uid,) = struct.unpack_from("=I", reply, _UID_OFFSET)
    return int(uid)


def decode_proc_address(text: str) -> Address:
    """Decode ``/proc/net/tcp*``'s ``ADDR:PORT`` (``0100007F:1F90`` -> 127.0.0.1, 8080).

    The kernel prints the address as 32-bit words in host byte order (8 hex digits for
    IPv4, four words for IPv6) and the port as a host-order number. IPv4-mapped IPv6
    addresses become IPv4. Raises :class:`ValueError` for malformed text.
    """
    hex_address, _, hex_port = text.partition(":")
    if len(hex_address) not in (8, 32) or not hex_port:
        raise ValueError(f"not a /proc/net/tcp address: {text!r}")
    raw = b"".join(struct.pack("=I", int(hex_address[i:i + 8], 16)) for i in range(0, len(hex_address), 8))
    address = ipaddress.ip_address(raw)
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return address, int(hex_port, 16)


def owner_in_tables(tables: Iterable[str], *, peer: Address, ours: Address) -> int | None:
    """The ``uid`` of the socket whose local address is ``peer`` and remote is ``ours``,
    in the text of ``/proc/net/tcp``-format ``tables``; ``None`` when there is none, or
    when several entries disagree. Listeners, TIME_WAIT entries, entries with inode 0
    and malformed lines are skipped."""
    owners: set[int] = set()
    for table in tables:
        for line in table.splitlines()[1:]:
            fields = line.split()
            if len(fields) < 10 or fields[3] in _SKIPPED_STATES or fields[9] == "0":
                continue
            try:
                local, remote = decode_proc_address(fields[1]), decode_proc_address(fields[2])
                uid = int(fields[7])
            except ValueError:
                continue
            if local == peer and remote == ours:
                owners.add(uid)
    return owners.pop() if len(owners) == 1 else None
