"""Scripted peers for the security tests: fake devices, fake viewers, fake UMS servers,
``openssl s_server`` impostors, and a runner for the real ``secshadow-proxy`` CLI.

Everything listens on 127.0.0.1 only, every wait has a deadline, and every thread is a
daemon that ends with its socket. The devices are *real* TLS servers (pyOpenSSL, on real
loopback sockets) so the proxy under test runs its real pinning code; each connection is
driven by a *script*, a function that gets a :class:`DeviceConn` and misbehaves at the
stage the test chooses. Every decrypted byte a device receives is recorded, so a test can
assert that an impostor received nothing.
"""

from __future__ import annotations

import json
import os
import select
import socket
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from OpenSSL import SSL

from secshadow.lab.harness import child_environment, python_module

HELLO = b"RFB 003.008\n"
COMMAND_LENGTH = len(b"PROCYCMD PW_") + 36  # a UUID password, no terminator


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def fd_count(pid: int | str = "self") -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def rss_kib(pid: int | str = "self") -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError("no VmRSS")


def children_of(pid: int) -> list[int]:
    """Direct children of ``pid`` (from /proc/<pid>/task/*/children)."""
    found: list[int] = []
    for task in os.listdir(f"/proc/{pid}/task"):
        try:
            text = Path(f"/proc/{pid}/task/{task}/children").read_text()
        except OSError:
            continue
        found += [int(x) for x in text.split()]
    return found


# --------------------------------------------------------------------------- devices
class PeerClosed(Exception):
    """The proxy closed the TLS connection (or it broke)."""


class DeviceConn:
    """One accepted TLS connection as a script sees it; all methods have deadlines."""

    def __init__(self, server: ScriptedDevice, sock: socket.socket, index: int) -> None:
        self.server = server
        self.sock = sock
        self.index = index
        self.tls: SSL.Connection | None = None
        self.received = bytearray()
        self.handshake_ok = False
        self.error: str | None = None
        self.peer_closed = False
        self.renegotiation_failed = False

    # -- low level ------------------------------------------------------------
    def _wait(self, readable: bool, deadline: float) -> None:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError("scripted device: deadline passed")
        r, w, _ = select.select([self.sock] if readable else [], [] if readable else [self.sock], [],
                                min(remaining, 0.5))
        del r, w

    def _call(self, fn: Callable[..., Any], *args: Any, timeout: float = 10.0) -> Any:
        deadline = time.monotonic() + timeout
        while True:
            try:
                return fn(*args)
            except SSL.WantReadError:
                self._wait(True, deadline)
            except SSL.WantWriteError:
                self._wait(False, deadline)

    def handshake(self, timeout: float = 10.0) -> None:
        self._call(self.tls.do_handshake, timeout=timeout)  # type: ignore[union-attr]
        self.handshake_ok = True

    # -- for scripts ------------------------------------------------------------
    def recv(self, timeout: float = 10.0) -> bytes:
        """Next decrypted chunk; raises PeerClosed at the end of the stream."""
        try:
            data: bytes = self._call(self.tls.recv, 65536, timeout=timeout)  # type: ignore[union-attr]
        except (SSL.ZeroReturnError, SSL.SysCallError) as e:
            self.peer_closed = True
            raise PeerClosed(str(e)) from None
        except SSL.Error as e:
            self.peer_closed = True
            self.error = str(e)
            raise PeerClosed(str(e)) from None
        if not data:
            self.peer_closed = True
            raise PeerClosed("eof")
        self.received += data
        return data

    def recv_exactly(self, n: int, timeout: float = 10.0) -> bytes:
        deadline = time.monotonic() + timeout
        start = len(self.received)
        while len(self.received) - start < n:
            self.recv(max(0.01, deadline - time.monotonic()))
        return bytes(self.received[start:start + n])

    def recv_command(self, timeout: float = 10.0) -> bytes:
        """Read the 48-byte PROCYCMD (UUID password, no terminator)."""
        return self.recv_exactly(COMMAND_LENGTH, timeout)

    def send(self, data: bytes, timeout: float = 30.0) -> None:
        view = memoryview(data)
        deadline = time.monotonic() + timeout
        while view:
            try:
                n = self._call(self.tls.send, bytes(view[:16384]),  # type: ignore[union-attr]
                               timeout=max(0.01, deadline - time.monotonic()))
            except SSL.Error as e:
                raise PeerClosed(str(e)) from None
            view = view[n:]

    def drain(self, timeout: float = 10.0) -> None:
        """Read until the proxy closes (or the deadline passes)."""
        deadline = time.monotonic() + timeout
        try:
            while time.monotonic() < deadline:
                self.recv(max(0.01, deadline - time.monotonic()))
        except (PeerClosed, TimeoutError):
            pass

    def shutdown_write(self) -> None:
        """TLS close_notify plus a TCP half-close: 'no more bytes from the device'."""
        try:
            self.tls.shutdown()  # type: ignore[union-attr]
        except SSL.Error:
            pass
        try:
            self.sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass

    def renegotiate_to(self, cert_pem: bytes, key_pem: bytes, timeout: float = 5.0) -> None:
        """Switch to another certificate and renegotiate (TLS 1.2); records whether the
        client refused (it must: OP_NO_RENEGOTIATION)."""
        tls = self.tls
        assert tls is not None
        tls.use_certificate(x509.load_pem_x509_certificate(cert_pem))
        tls.use_privatekey(serialization.load_pem_private_key(key_pem, None))  # type: ignore[arg-type]
        tls.renegotiate()
        try:
            self._call(tls.do_handshake, timeout=timeout)
            # The HelloRequest is out; the client's answer arrives with the next read.
            self.recv(timeout)
        except (SSL.Error, PeerClosed, TimeoutError) as e:
            self.renegotiation_failed = True
            self.error = str(e)

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass


Script = Callable[[DeviceConn], None]


def script_hello_then_echo(conn: DeviceConn) -> None:
    """A well-behaved device: read PROCYCMD, answer the RFB hello, echo until closed."""
    conn.recv_command()
    conn.send(HELLO)
    try:
        while True:
            data = conn.recv(30)
            conn.send(data)
    except (PeerClosed, TimeoutError):
        pass


class ScriptedDevice:
    """A TLS server on 127.0.0.1 presenting ``cert_pem``; each connection runs ``script``
    in a daemon thread. ``raw_script``: instead of TLS, get the plain socket (e.g. to drop
    mid-handshake). ``conns``: every connection, in accept order."""

    def __init__(self, cert_pem: bytes, key_pem: bytes, script: Script = script_hello_then_echo, *,
                 raw_script: Callable[[socket.socket, int], None] | None = None,
                 max_version: int | None = None, min_version: int | None = None,
                 ciphers: bytes = b"DEFAULT:@SECLEVEL=0", chain_pem: bytes | None = None,
                 pair_for: Callable[[int], tuple[bytes, bytes]] | None = None) -> None:
        self.cert_pem, self.key_pem = cert_pem, key_pem
        self.pair_for = pair_for
        self.script = script
        self.raw_script = raw_script
        self.max_version, self.min_version = max_version, min_version
        self.ciphers = ciphers
        self.chain_pem = chain_pem
        self.conns: list[DeviceConn] = []
        self.accepted = 0
        self._listener = socket.socket()
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listener.bind(("127.0.0.1", 0))
        self._listener.listen(1024)
        self.port = int(self._listener.getsockname()[1])
        self._stopped = threading.Event()
        self._threads: list[threading.Thread] = []
        self._accept_thread = threading.Thread(target=self._accept_loop, daemon=True)
        self._accept_thread.start()

    def _context(self, index: int) -> SSL.Context:
        cert_pem, key_pem = self.pair_for(index) if self.pair_for else (self.cert_pem, self.key_pem)
        ctx = SSL.Context(SSL.TLS_SERVER_METHOD)
        if self.min_version:
            ctx.set_min_proto_version(self.min_version)
        if self.max_version:
            ctx.set_max_proto_version(self.max_version)
        ctx.set_cipher_list(self.ciphers)
        ctx.use_certificate(x509.load_pem_x509_certificate(cert_pem))
        ctx.use_privatekey(serialization.load_pem_private_key(key_pem, None))  # type: ignore[arg-type]
        if self.chain_pem:
            ctx.add_extra_chain_cert(x509.load_pem_x509_certificate(self.chain_pem))
        return ctx

    def _accept_loop(self) -> None:
        while not self._stopped.is_set():
            r, _, _ = select.select([self._listener], [], [], 0.2)
            if not r:
                continue
            try:
                sock, _ = self._listener.accept()
            except OSError:
                return
            index = self.accepted
            self.accepted += 1
            thread = threading.Thread(target=self._serve, args=(sock, index), daemon=True)
            self._threads = [t for t in self._threads if t.is_alive()]
            self._threads.append(thread)
            thread.start()

    def _serve(self, sock: socket.socket, index: int) -> None:
        if self.raw_script is not None:
            try:
                self.raw_script(sock, index)
            finally:
                sock.close()
            return
        sock.setblocking(False)
        conn = DeviceConn(self, sock, index)
        self.conns.append(conn)
        conn.tls = SSL.Connection(self._context(index), sock)
        conn.tls.set_accept_state()
        try:
            conn.handshake()
            self.script(conn)
        except (SSL.Error, PeerClosed, TimeoutError, OSError) as e:
            conn.error = conn.error or f"{type(e).__name__}: {e}"
        finally:
            conn.close()

    def app_bytes(self) -> int:
        return sum(len(c.received) for c in self.conns)

    def stop(self) -> None:
        self._stopped.set()
        self._listener.close()
        # A script may stop its own device from a connection thread: never join oneself.
        current = threading.current_thread()
        for thread in [self._accept_thread, *self._threads]:
            if thread is not current:
                thread.join(2)

    def __enter__(self) -> ScriptedDevice:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


# --------------------------------------------------------------------------- viewers
def recv_until_closed(sock: socket.socket, timeout: float, limit: int = 1 << 30) -> tuple[bytes, bool]:
    """Read until EOF/reset or ``timeout``; returns (bytes, closed_by_peer)."""
    sock.settimeout(0.2)
    data = bytearray()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and len(data) < limit:
        try:
            chunk = sock.recv(65536)
        except TimeoutError:
            continue
        except OSError:
            return bytes(data), True
        if not chunk:
            return bytes(data), True
        data += chunk
    return bytes(data), False


# --------------------------------------------------------------------------- the CLI
@dataclass
class CliRun:
    """What one run of ``secshadow-proxy`` did. ``viewer_bytes``: what a fake viewer that
    connected on the ``listening`` event received from the tunnel."""

    code: int | None
    events: list[dict[str, Any]]
    stderr: str
    stdout: str
    viewer_bytes: bytes = b""
    viewer_connected: bool = False
    pid: int = 0
    proc_snapshots: dict[str, Any] = field(default_factory=dict)


def run_cli(args: list[str], *, stdin: bytes | None = None, env: dict[str, str] | None = None,
            timeout: float = 60.0, viewer: bool = True, viewer_send: bytes = b"",
            viewer_hold: float = 0.5, on_listening: Callable[[subprocess.Popen[bytes], dict[str, Any]], Any]
            | None = None) -> CliRun:
    """Run ``python -m secshadow.cli ARGS --json``. If a ``listening`` event appears and
    ``viewer`` is true, a fake viewer connects (sends ``viewer_send``) and reads until the
    proxy closes it. Kills the proxy after ``timeout`` seconds."""
    argv = [*python_module("secshadow.cli"), "--json", *args]
    process = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               env=env or child_environment())
    run = CliRun(code=None, events=[], stderr="", stdout="", pid=process.pid)
    err_chunks: list[bytes] = []
    err_thread = threading.Thread(target=lambda: err_chunks.append(process.stderr.read()),  # type: ignore[union-attr]
                                  daemon=True)
    err_thread.start()
    assert process.stdin is not None and process.stdout is not None
    if stdin is not None:
        process.stdin.write(stdin)
    process.stdin.close()
    out_lines: list[str] = []
    deadline = time.monotonic() + timeout
    viewer_thread: threading.Thread | None = None

    def viewer_job(port: int) -> None:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
                run.viewer_connected = True
                if viewer_send:
                    s.sendall(viewer_send)
                data, _ = recv_until_closed(s, max(1.0, deadline - time.monotonic()))
                run.viewer_bytes = data
        except OSError:
            pass

    for raw in process.stdout:
        line = raw.decode("utf-8", "replace")
        out_lines.append(line)
        try:
            event = json.loads(line)
        except ValueError:
            continue
        run.events.append(event)
        if event.get("event") == "listening":
            if on_listening is not None:
                on_listening(process, event)
            if viewer and event.get("port"):
                viewer_thread = threading.Thread(target=viewer_job, args=(int(event["port"]),), daemon=True)
                viewer_thread.start()
        if time.monotonic() > deadline:
            break
    try:
        run.code = process.wait(timeout=max(0.1, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(10)
        run.code = None
    if viewer_thread is not None:
        viewer_thread.join(10)
    err_thread.join(10)
    run.stderr = b"".join(err_chunks).decode("utf-8", "replace")
    run.stdout = "".join(out_lines)
    return run


def names(events: list[dict[str, Any]]) -> list[str]:
    return [e["event"] for e in events]


def secret_json(cert_pem: bytes, password: str, port: int, host: str = "127.0.0.1") -> bytes:
    return json.dumps({"certificate": cert_pem.decode(), "password": password, "host": host,
                       "port": port}).encode()


# --------------------------------------------------------------------------- s_server
class SServer:
    """``openssl s_server`` on 127.0.0.1 as an impostor. ``quiet``: stdout is exactly the
    decrypted application data it received (s_server -quiet writes nothing else there);
    otherwise stdin commands (``r``: renegotiate) work and stdout also carries its report."""

    def __init__(self, workdir: Path, args: list[str], quiet: bool = True) -> None:
        self.port = free_port()
        self.out_path = workdir / f"s_server-{self.port}.out"
        self.err_path = workdir / f"s_server-{self.port}.err"
        self._out = open(self.out_path, "wb")  # noqa: SIM115 - closed in stop()
        self._err = open(self.err_path, "wb")  # noqa: SIM115
        argv = ["openssl", "s_server", "-accept", f"127.0.0.1:{self.port}", *args]
        if quiet:
            argv.append("-quiet")
        self.process = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=self._out, stderr=self._err)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"s_server exited: {self.err_path.read_text(errors='replace')}")
            if quiet:
                try:
                    socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                    break
                except OSError:
                    time.sleep(0.05)
            else:
                if b"ACCEPT" in self.out_path.read_bytes():
                    break
                time.sleep(0.05)
        else:
            raise RuntimeError("s_server did not start")
        self._ready_mark = len(self.out_path.read_bytes())

    def command(self, text: str) -> None:
        assert self.process.stdin is not None
        self.process.stdin.write(text.encode())
        self.process.stdin.flush()

    def output(self) -> bytes:
        self._out.flush()
        return self.out_path.read_bytes()

    def app_output(self) -> bytes:
        """Stdout after start-up (in quiet mode: exactly the decrypted bytes received)."""
        return self.output()[self._ready_mark:]

    def errors(self) -> str:
        self._err.flush()
        return self.err_path.read_text(errors="replace")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)
        if self.process.stdin is not None:
            try:
                self.process.stdin.close()
            except OSError:
                pass
        self._out.close()
        self._err.close()


# --------------------------------------------------------------------------- UMS
class HTTPScript:
    """A misbehaving HTTPS "UMS" on 127.0.0.1 (threaded, TLS via pyOpenSSL).

    ``respond(conn_index, request_bytes) -> bytes | None``: the raw HTTP response, or
    ``None`` to close without one. ``delay``: seconds before answering (a slow UMS).
    ``requests``: every request's raw bytes (to check what an impostor got).
    """

    def __init__(self, cert_pem: bytes, key_pem: bytes, respond: Callable[[int, bytes], bytes | None],
                 delay: float = 0.0) -> None:
        self.respond = respond
        self.delay = delay
        self.requests: list[bytes] = []
        self.device = ScriptedDevice(cert_pem, key_pem, self._script)
        self.port = self.device.port

    def _script(self, conn: DeviceConn) -> None:
        request = b""
        while b"\r\n\r\n" not in request:
            request += conn.recv(10)
        head, _, body = request.partition(b"\r\n\r\n")
        length = 0
        for line in head.split(b"\r\n"):
            if line.lower().startswith(b"content-length:"):
                length = int(line.split(b":", 1)[1])
        while len(body) < length:
            body += conn.recv(10)
        self.requests.append(request)
        if self.delay:
            time.sleep(self.delay)
        answer = self.respond(conn.index, request)
        if answer is not None:
            conn.send(answer)
        conn.shutdown_write()

    def stop(self) -> None:
        self.device.stop()


def http_response(status: int, body: bytes, content_type: str = "application/json",
                  extra: str = "") -> bytes:
    return (f"HTTP/1.1 {status} X\r\nContent-Type: {content_type}\r\nContent-Length: {len(body)}\r\n"
            f"Connection: close\r\n{extra}\r\n").encode() + body


# --------------------------------------------------------------------------- library API
@dataclass
class SessionRun:
    """Outcome of :func:`run_session`: ``exit_code`` as the CLI would map it (0 for a
    ``closed`` event), the events, what the fake viewer saw, and the duration."""

    exit_code: int | None
    result: Any
    events: list[Any]
    viewer: Any = None
    seconds: float = 0.0

    @property
    def names(self) -> list[str]:
        return [e.name for e in self.events]


def run_session(secret: Any, port: int, viewer: Callable[[int], Any] | None = None, *,
                limit: float = 20.0, **options: Any) -> Any:
    """Run one ShadowSession in the running reactor (call from pytest_twisted tests);
    returns a Deferred firing with a :class:`SessionRun`. ``viewer(port)`` runs in a
    thread once the listener is open (blocking sockets are fine there)."""
    from twisted.internet import reactor, task, threads
    from twisted.internet.defer import ensureDeferred

    from secshadow import events as ev
    from secshadow.proxy import SessionOptions, ShadowSession

    settings = {"connect_timeout": 5.0, "viewer_timeout": 5.0, "hello_timeout": 2.0, **options}

    async def go() -> SessionRun:
        seen: list[Any] = []
        started = time.monotonic()
        session = ShadowSession(reactor, secret, SessionOptions(device_host="127.0.0.1", device_port=port,
                                                                **settings), on_event=seen.append)
        outcome: list[Any] = []
        session.start().addBoth(outcome.append)
        viewer_d = None
        while not outcome and time.monotonic() - started < limit:
            listening = [e for e in seen if isinstance(e, ev.Listening)]
            if listening and viewer is not None and viewer_d is None:
                viewer_d = threads.deferToThread(viewer, listening[0].port)
            await task.deferLater(reactor, 0.01, lambda: None)
        if not outcome:
            session.stop("test limit")
            while not outcome:
                await task.deferLater(reactor, 0.05, lambda: None)
            raise AssertionError(f"session did not end within {limit} s: {seen}")
        viewer_result = (await viewer_d) if viewer_d is not None else None
        result = outcome[0]
        from twisted.python.failure import Failure

        if isinstance(result, Failure):
            code = getattr(result.value, "exit_code", 1)
            result.trap(Exception)
        else:
            code = 0
        return SessionRun(code, result, seen, viewer_result, time.monotonic() - started)

    return ensureDeferred(go())


def simple_viewer(send: bytes = b"", chunk: int = 0, half_close: bool = False, read_for: float = 5.0,
                  close_after: float | None = None, expect: int | None = None) -> Callable[[int], tuple[bytes, bool]]:
    """A blocking fake viewer: connects, sends ``send`` (``chunk`` bytes at a time if set),
    optionally half-closes, then reads until the proxy closes; returns (bytes, closed)."""

    def viewer(port: int) -> tuple[bytes, bool]:
        try:
            s = socket.create_connection(("127.0.0.1", port), timeout=5)
        except ConnectionResetError:
            # The proxy accepted and then aborted the connection (a session that failed
            # at once) before this thread returned from connect(): closed, nothing read.
            return b"", True
        except OSError as e:
            return f"<connect failed: {e}>".encode(), True
        with s:
            try:
                if chunk:
                    for i in range(0, len(send), chunk):
                        s.sendall(send[i:i + chunk])
                elif send:
                    s.sendall(send)
            except OSError:
                pass
            if half_close:
                s.shutdown(socket.SHUT_WR)
            return recv_until_closed(s, close_after if close_after is not None else read_for,
                                     limit=expect if expect is not None else 1 << 30)

    return viewer
