"""Peers that hold a shadowing session at one stage for as long as a test likes (issue 9,
item 1: every stop ends the session at every stage).

A :class:`Stage` sets up the loopback peers for one stage, says how a session reaches it
(the secret to use, whether a viewer must connect) and when it is there. The same stages
drive the CLI (signals), control mode (``close``, ``shutdown``, end of input) and the API
(``Shadowing.stop``):

========== ================================================================================
stage      what holds it there
========== ================================================================================
connect    the device's port is a listener whose accept queue is full (``listen(0)`` and
           one connection never accepted): the proxy's SYNs go unanswered (``SYN-SENT``)
tls        the device accepts TCP and never answers the ClientHello
reconnect  the device drops the idle pinned connection; the viewer arrives; the reconnect
           hangs in TLS as above
fetch      the UMS completes TLS, reads the login request, and never answers
hello      the device reads ``PROCYCMD`` and never sends its RFB ProtocolVersion
relay      the device answered; bytes flow (the viewer has the greeting)
========== ================================================================================

Everything listens on 127.0.0.1; every thread is a daemon ending with its socket.
"""

from __future__ import annotations

import json
import select
import socket
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from secshadow.lab import certs
from secshadow.lab.harness import child_environment
from secshadow.lab.scripted import HELLO, DeviceConn, PeerClosed, ScriptedDevice, script_hello_then_echo, secret_json

STAGES = ("connect", "tls", "reconnect", "fetch", "hello", "relay")
#: The IMI user and password a stage's silent UMS is asked with (it never checks them).
UMS_USER, UMS_PASSWORD = "admin", "stage-ums-password"
DEVICE_ID = "27"

CERT, KEY = certs.generate_self_signed()
UMS_CERT, UMS_KEY = certs.generate_self_signed(san_ips=["127.0.0.1"])


def proxy_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment of a ``secshadow-proxy`` under test (one place, so a check of the
    tests against an older checkout can point the proxy, and only it, elsewhere)."""
    return child_environment(extra)


def wait_until(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"not reached within {timeout:g} s: {what}")
        time.sleep(0.02)


def syn_sent_to(port: int) -> bool:
    """Whether some local socket is in ``SYN-SENT`` towards 127.0.0.1:``port`` (/proc/net/tcp)."""
    with open("/proc/net/tcp") as f:
        next(f)
        for line in f:
            fields = line.split()
            if fields[3] == "02" and fields[2] == f"0100007F:{port:04X}":
                return True
    return False


class Backlogged:
    """A loopback port whose accept queue is full: a TCP connect to it hangs in
    ``SYN-SENT`` (Linux drops SYNs to a full queue) until the connector gives up."""

    def __init__(self) -> None:
        self._listener = socket.socket()
        self._listener.bind(("127.0.0.1", 0))
        self._listener.listen(0)
        self.port = int(self._listener.getsockname()[1])
        # The queue of a listen(0) socket holds one connection: this one, never accepted.
        self._filler = socket.create_connection(("127.0.0.1", self.port), timeout=5)

    def stop(self) -> None:
        self._filler.close()
        self._listener.close()


@dataclass
class SilentConn:
    """One connection a :class:`SilentDevice` holds without answering."""

    received: bytearray = field(default_factory=bytearray)
    closed_at: float | None = None


class SilentDevice(ScriptedDevice):
    """A TLS "device" whose connections from number ``silent_from`` on are accepted and
    never answered: not a byte, not even a ServerHello. Earlier connections run ``script``
    after a normal handshake (default: close at once, a device dropping the idle link)."""

    def __init__(self, cert_pem: bytes, key_pem: bytes, silent_from: int = 0,
                 script: Callable[[DeviceConn], None] = lambda conn: None) -> None:
        self.silent_from = silent_from
        self.silent: list[SilentConn] = []
        super().__init__(cert_pem, key_pem, script)

    def _serve(self, sock: socket.socket, index: int) -> None:
        if index < self.silent_from:
            super()._serve(sock, index)
            return
        held = SilentConn()
        self.silent.append(held)
        try:
            while not self._stopped.is_set():
                readable, _, _ = select.select([sock], [], [], 0.2)
                if not readable:
                    continue
                try:
                    data = sock.recv(65536)
                except OSError:
                    data = b""
                if not data:
                    break
                held.received += data
        finally:
            held.closed_at = time.monotonic()
            sock.close()


def _hold_after_command(conn: DeviceConn) -> None:
    """Read PROCYCMD, then say nothing until the proxy closes."""
    conn.recv_command()
    conn.drain(120)


def _hold_request(conn: DeviceConn) -> None:
    """A UMS that reads the login request and never answers."""
    conn.drain(120)


class Viewer:
    """A plain viewer socket from this process (same uid as the proxy under test)."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=5)
        self.sock.setblocking(False)
        self.data = bytearray()

    def poll(self) -> bytes:
        try:
            while True:
                chunk = self.sock.recv(65536)
                if not chunk:
                    break
                self.data += chunk
        except (BlockingIOError, OSError):
            pass
        return bytes(self.data)

    def close(self) -> None:
        self.sock.close()


class Stage:
    """One stage's peers. ``secret``: the short-form secret document (``None`` for
    ``fetch``, whose secret comes from :attr:`ums_url`); ``needs_viewer``; the predicates
    :meth:`viewer_may_come` and :meth:`reached`; :meth:`stop` ends every peer."""

    def __init__(self, name: str) -> None:
        assert name in STAGES, name
        self.name = name
        self.password = str(uuid.uuid4())
        self.needs_viewer = name in ("reconnect", "hello", "relay")
        self.viewer: Viewer | None = None
        self.backlog: Backlogged | None = None
        self.device: ScriptedDevice | None = None
        self.ums: ScriptedDevice | None = None
        self._drop_seen: float | None = None
        if name == "connect":
            self.backlog = Backlogged()
            port = self.backlog.port
        elif name == "fetch":
            self.ums = ScriptedDevice(UMS_CERT, UMS_KEY, _hold_request)
            port = 0
        else:
            if name == "tls":
                self.device = SilentDevice(CERT, KEY, silent_from=0)
            elif name == "reconnect":
                self.device = SilentDevice(CERT, KEY, silent_from=1)
            elif name == "hello":
                self.device = ScriptedDevice(CERT, KEY, _hold_after_command)
            else:
                self.device = ScriptedDevice(CERT, KEY, script_hello_then_echo)
            port = self.device.port
        self.device_port = port

    # -- how a session is pointed here --------------------------------------------
    @property
    def secret(self) -> dict[str, Any] | None:
        if self.name == "fetch":
            return None
        return dict(json.loads(secret_json(CERT, self.password, self.device_port)))

    @property
    def ums_url(self) -> str:
        assert self.ums is not None
        return f"https://127.0.0.1:{self.ums.port}"

    @staticmethod
    def ums_fingerprint() -> str:
        return certs.certificate_sha256(UMS_CERT)

    def cli_source_args(self) -> list[str]:
        """The CLI's secret flags for this stage (with :meth:`cli_stdin`, :func:`proxy_env`
        and :meth:`cli_env`)."""
        if self.name == "fetch":
            return ["--ums", self.ums_url, "--device", DEVICE_ID, "--ums-user", UMS_USER,
                    "--ums-fingerprint", self.ums_fingerprint()]
        return ["--secret-file", "-"]

    def cli_stdin(self) -> bytes:
        return b"" if self.secret is None else json.dumps(self.secret).encode()

    @staticmethod
    def cli_env() -> dict[str, str]:
        return {"SECSHADOW_UMS_PASSWORD": UMS_PASSWORD}

    # -- progress -----------------------------------------------------------------
    def viewer_may_come(self) -> bool:
        """For ``reconnect``: the device dropped the idle link a moment ago (the proxy
        has seen the close); otherwise at once."""
        if self.name != "reconnect":
            return True
        assert isinstance(self.device, SilentDevice)
        first = self.device.conns[0] if self.device.conns else None
        if first is None or first.sock.fileno() != -1:
            return False
        if self._drop_seen is None:
            self._drop_seen = time.monotonic()
        return time.monotonic() - self._drop_seen > 0.3

    def connect_viewer(self, port: int) -> Viewer:
        self.viewer = Viewer(port)
        return self.viewer

    def reached(self) -> bool:
        """Whether the session is now held at this stage."""
        if self.name == "connect":
            assert self.backlog is not None
            return syn_sent_to(self.backlog.port)
        if self.name in ("tls", "reconnect"):
            assert isinstance(self.device, SilentDevice)
            return any(c.received[:1] == b"\x16" for c in self.device.silent)  # a ClientHello came
        if self.name == "fetch":
            assert self.ums is not None
            return any(b"\r\n\r\n" in c.received for c in self.ums.conns)  # the login request came
        if self.name == "hello":
            assert self.device is not None
            return any(len(c.received) >= 48 for c in self.device.conns)  # PROCYCMD came
        return self.viewer is not None and self.viewer.poll().startswith(HELLO)

    def peers_released(self) -> bool:
        """Whether the proxy closed its connection to the peer holding the stage (for the
        stages where one is open: tls, reconnect, fetch, hello, relay)."""
        if isinstance(self.device, SilentDevice):
            return all(c.closed_at is not None for c in self.device.silent)
        holder = self.ums if self.name == "fetch" else self.device
        if holder is None:
            return True
        return all(c.peer_closed or c.sock.fileno() == -1 for c in holder.conns)

    def stop(self) -> None:
        if self.viewer is not None:
            self.viewer.close()
        for peer in (self.backlog, self.device, self.ums):
            if peer is not None:
                peer.stop()

    def __enter__(self) -> Stage:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


__all__ = ["STAGES", "Stage", "Viewer", "proxy_env", "wait_until", "PeerClosed"]
