"""The device side of ``bench_vs_stunnel.py``: a VNC-like backend and the lab's device emulator.

Run as child processes of the benchmark (never imported by the product)::

    python benchmarks/_peers.py backend               # prints {"event": "ports", ...}, then serves
    python benchmarks/_peers.py emulator CERT KEY VNC_PORT TWIN_CERT TWIN_KEY TWIN_VNC_PORT

**Backend** (a stand-in for a VNC server such as Xvnc, blocking sockets, one thread per
connection, ``TCP_NODELAY`` like TigerVNC), loopback only, with three listeners:

- ``procy``: a device's plaintext side behind a TLS front (stunnel server) or the direct
  path: it reads ``PROCYCMD PW_`` plus 36 characters (48 bytes; any password is accepted,
  anything else is closed), then sends the 12-byte RFB hello ``RFB 003.008\\n``;
- ``vnc``: a plain VNC server behind the device emulator: the hello at once;
- ``twin`` / ``twinvnc``: like ``procy`` / ``vnc``, behind the impostor device (a TLS
  front or the emulator); a connection that reaches either means the impostor let a
  console through, so the benchmark requires 0 (the negative control).

After the hello the viewer sends one 9-byte request, the way an RFB viewer answers the
hello: ``b"S"`` + u64 big-endian N streams N bytes to the viewer; ``b"E"`` + anything echoes
every byte until the viewer closes; ``b"H"`` + anything holds the connection silently.

Standard input takes ``stats`` (answered with one JSON line: commands per listener,
connections) and ends the process when closed.

**Emulator**: :class:`secshadow.lab.device.emulator.DeviceEmulator` (the lab's device, a
Twisted TLS server reusing the product's relay) with the ``current`` firmware narrowed to
TLS 1.3 / ``TLS_AES_256_GCM_SHA384``, and a password check that accepts any well-formed
``PROCYCMD`` (no IMI server needed). A second emulator with a twin certificate (same
name, another key) plays the impostor. ``stats`` answers the TLS versions and ciphers the
devices negotiated.
"""

from __future__ import annotations

import json
import socket
import sys
import threading
from pathlib import Path
from typing import Any

HELLO = b"RFB 003.008\n"
COMMAND_PREFIX = b"PROCYCMD PW_"
COMMAND_LENGTH = len(COMMAND_PREFIX) + 36
REQUEST_LENGTH = 9
#: Seconds a backend connection may wait for a read; every thread ends by then at the latest.
IO_TIMEOUT = 600.0
_CHUNK = memoryview(bytes(range(256)) * 4096)  # 1 MiB, sent again and again


def _recv_exact(conn: socket.socket, count: int) -> bytes:
    data = b""
    while len(data) < count:
        part = conn.recv(count - len(data))
        if not part:
            return data
        data += part
    return data


def _drain(conn: socket.socket) -> None:
    while conn.recv(65536):
        pass


class Backend:
    """Three loopback listeners (see the module docstring) and their counters."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.commands = {"procy": 0, "vnc": 0, "twin": 0, "twinvnc": 0}
        self.connections = dict(self.commands)
        self.bad = 0
        self.sockets: dict[str, socket.socket] = {}
        for name in self.commands:
            sock = socket.socket()
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(("127.0.0.1", 0))
            sock.listen(4096)
            self.sockets[name] = sock

    def ports(self) -> dict[str, int]:
        return {name: sock.getsockname()[1] for name, sock in self.sockets.items()}

    def start(self) -> None:
        for name, sock in self.sockets.items():
            threading.Thread(target=self._accept, args=(name, sock), daemon=True).start()

    def _accept(self, name: str, sock: socket.socket) -> None:
        while True:
            try:
                conn, _ = sock.accept()
            except OSError:
                return
            with self.lock:
                self.connections[name] += 1
            threading.Thread(target=self._serve, args=(name, conn), daemon=True).start()

    def _serve(self, name: str, conn: socket.socket) -> None:
        with conn:
            try:
                conn.settimeout(IO_TIMEOUT)
                conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                if name in ("procy", "twin"):
                    command = _recv_exact(conn, COMMAND_LENGTH)
                    if len(command) != COMMAND_LENGTH or not command.startswith(COMMAND_PREFIX):
                        with self.lock:
                            self.bad += 1
                        return
                    with self.lock:
                        self.commands[name] += 1
                conn.sendall(HELLO)
                request = _recv_exact(conn, REQUEST_LENGTH)
                if len(request) != REQUEST_LENGTH:
                    return
                kind, count = request[:1], int.from_bytes(request[1:], "big")
                if kind == b"S":
                    size = len(_CHUNK)
                    while count > 0:
                        step = min(count, size)
                        conn.sendall(_CHUNK[:step])
                        count -= step
                    _drain(conn)
                elif kind == b"E":
                    while True:
                        data = conn.recv(65536)
                        if not data:
                            return
                        conn.sendall(data)
                else:
                    _drain(conn)
            except OSError:
                return

    def stats(self) -> dict[str, Any]:
        with self.lock:
            return {"commands": dict(self.commands), "connections": dict(self.connections), "bad": self.bad}


def _serve_stdin(answer: Any) -> None:
    """Answer ``stats`` lines on standard input until it closes."""
    for line in sys.stdin:
        if line.strip() == "stats":
            sys.stdout.write(json.dumps({"event": "stats", **answer()}) + "\n")
            sys.stdout.flush()


def run_backend() -> None:
    threading.stack_size(256 * 1024)
    backend = Backend()
    backend.start()
    sys.stdout.write(json.dumps({"event": "ports", **backend.ports()}) + "\n")
    sys.stdout.flush()
    _serve_stdin(backend.stats)


def run_emulator(cert: str, key: str, vnc_port: int, twin_cert: str, twin_key: str, twin_vnc_port: int) -> None:
    import dataclasses
    from collections import Counter

    from twisted.internet import reactor
    from twisted.internet.defer import succeed

    from secshadow.lab.device.emulator import DeviceEmulator, TLSEstablished
    from secshadow.lab.device.firmware import get_profile

    profile = dataclasses.replace(
        get_profile("current"), name="bench-tls13", min_tls="TLSv1.3",
        tls13_ciphersuites="TLS_AES_256_GCM_SHA384",
    )
    negotiated: Counter[str] = Counter()

    def on_event(event: Any) -> None:
        if isinstance(event, TLSEstablished):
            negotiated[f"{event.version} {event.cipher}"] += 1

    def accept_any(password: str) -> Any:
        return succeed(True)  # the CommandParser already checked the PROCYCMD format

    devices = {
        "device": DeviceEmulator(reactor, profile, Path(cert).read_bytes(), Path(key).read_bytes(), accept_any,
                                 vnc_port=vnc_port, on_event=on_event),
        "twin": DeviceEmulator(reactor, profile, Path(twin_cert).read_bytes(), Path(twin_key).read_bytes(),
                               accept_any, vnc_port=twin_vnc_port, on_event=on_event),
    }
    ports: dict[str, int] = {}

    def listening(_: Any) -> None:
        for name, device in devices.items():
            assert device.port is not None
            ports[name] = device.port.getHost().port  # type: ignore[attr-defined]
        sys.stdout.write(json.dumps({"event": "ports", **ports}) + "\n")
        sys.stdout.flush()
        threading.Thread(target=stdin_loop, daemon=True).start()

    def stdin_loop() -> None:
        _serve_stdin(lambda: {"negotiated": dict(negotiated)})
        reactor.callFromThread(reactor.stop)  # type: ignore[attr-defined]

    from twisted.internet.defer import gatherResults

    gatherResults([d.listen("tcp:0:interface=127.0.0.1:backlog=4096") for d in devices.values()]).addCallback(
        listening)
    reactor.run()


def main(argv: list[str]) -> None:
    if argv[:1] == ["backend"]:
        run_backend()
    elif argv[:1] == ["emulator"] and len(argv) == 7:
        run_emulator(argv[1], argv[2], int(argv[3]), argv[4], argv[5], int(argv[6]))
    else:
        sys.exit("usage: _peers.py backend | emulator CERT KEY VNC_PORT TWIN_CERT TWIN_KEY TWIN_VNC_PORT")


if __name__ == "__main__":
    main(sys.argv[1:])
