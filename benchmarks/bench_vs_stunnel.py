"""secshadow against stunnel and a direct connection, side by side, in one run (issue 13).

    python benchmarks/bench_vs_stunnel.py [--quick] [--repeats N] [--bulk-mib M] [--sessions N]
                                          [--device stunnel|emulator] [--json FILE]

Three paths from a viewer-like client (this process) to a VNC-like backend
(``benchmarks/_peers.py``), through the *same* device (a TLS 1.3 / AES-256-GCM server with
a name-less self-signed certificate, then the backend):

- **secshadow**: the real ``secshadow-proxy`` CLI (``python -m secshadow.cli --secret-file -
  --viewer none --json``, one fresh process per session) and its control mode
  (``--control stdio``, one warm process, many sessions), pinning the device certificate;
- **stunnel**: ``stunnel4`` in client mode pinning the same certificate (``verifyPeer`` +
  ``CAfile``), without and with session resumption; the client sends the same
  ``PROCYCMD PW_<uuid>`` line itself, first;
- **direct**: plain TCP to the backend with the same command (the floor).

The device is by default ``stunnel4`` in server mode in front of the backend (C all the way,
so the device side does not limit the console side on 2 cores); ``--device emulator``
uses the lab's Twisted device emulator instead (``secshadow.lab.device``). Either way
every path meets the identical device.

Figures, per path, over interleaved repeats (the order of the paths rotates every
repeat): bulk MB/s device to viewer; console-side CPU s/GB (utime + stime of the proxy or
stunnel process, ``/proc/PID/stat``) and device-side CPU s/GB; rtt p50 of 64-byte
ping-pong; viewer connect to the 12-byte RFB hello (warm control-mode proxy, fresh CLI
process, stunnel with and without resumption, direct); CLI start to ``listening``; RSS
growth while the viewer stops reading; RSS per session with N sessions open at once
(control mode against stunnel). Each figure is printed as median [min-max] over the
repeats, with the ratio secshadow/stunnel of the medians. MB = 10**6 bytes, GB = 10**9.

Checks (the run exits 1 if one fails): every secshadow session and every stunnel
connection negotiated TLS 1.3 with TLS_AES_256_GCM_SHA384 (from the ``pinned`` events and
stunnel's log); the resumption variant really resumed; and a negative control: a twin
device (same subject, another key) is refused by secshadow (exit 6, ``pin-mismatch``) and
by the pinned stunnel, nothing reaches the backend behind the twin, while an *unpinned*
stunnel does get through the twin (so the refusals come from the pins, and the check can
fail).

Everything listens on 127.0.0.1; every wait has a deadline; every child is killed at exit;
a watchdog ends the run after ``--max-seconds``. Not part of the test suite; see
``docs/performance.md`` for how to read the output.
"""

from __future__ import annotations

import argparse
import atexit
import json
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(HERE))

import _stunnel  # noqa: E402
from _peers import COMMAND_PREFIX, HELLO  # noqa: E402

CLK_TCK = os.sysconf("SC_CLK_TCK")
#: Environment of every Python child: PYTHONPATH = the secshadow under test (see --product).
ENV: dict[str, str] = {}
TLS13 = ("TLSv1.3", "TLS_AES_256_GCM_SHA384")
#: Socket deadline for every read/write of the benchmark's viewer, seconds.
IO_TIMEOUT = 30.0
MiB = 1 << 20


# -- children -------------------------------------------------------------------

_CHILDREN: list[subprocess.Popen[bytes]] = []


def _kill_children() -> None:
    for process in reversed(_CHILDREN):
        if process.poll() is None:
            process.kill()
    for process in _CHILDREN:
        try:
            process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass


atexit.register(_kill_children)


def use_product(directory: Path) -> None:
    """Import secshadow (CLI, control mode, emulator, lab helpers) from ``directory``, in this
    process and in every child, so a snapshot (``git archive``) can be measured while the
    working tree changes."""
    if not (directory / "secshadow" / "cli.py").is_file():
        raise SystemExit(f"bench_vs_stunnel: {directory} has no secshadow/cli.py")
    sys.path.insert(0, str(directory))
    ENV.clear()
    ENV.update(os.environ)
    ENV["PYTHONPATH"] = str(directory) + (os.pathsep + ENV["PYTHONPATH"] if ENV.get("PYTHONPATH") else "")


def compiled_note(directory: Path) -> str:
    """Whether the product's modules are byte-compiled (it changes CLI start by tens of ms)."""
    tag = sys.implementation.cache_tag
    if (directory / "secshadow" / "__pycache__" / f"cli.{tag}.pyc").exists():
        return "byte-compiled"
    return "NOT byte-compiled: CLI start includes compiling it; see --compile"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _on_signal(signum: int, frame: Any) -> None:
    raise SystemExit(128 + signum)


class JsonChild:
    """A child whose standard output is JSON lines, each stamped with its arrival time
    (``time.perf_counter()``); standard error goes to ``log``."""

    def __init__(self, argv: list[str], log: Path, stdin: bytes | None = None) -> None:
        # cwd: the work directory, so that ``python -m`` (which puts the cwd first on
        # sys.path) imports the secshadow under test, not the one in the caller's cwd.
        self.started = time.perf_counter()
        self._log = open(log, "ab")  # noqa: SIM115 - closed by stop()
        self.process = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,  # noqa: S603
                                        stderr=self._log, env=ENV, cwd=log.parent)
        _CHILDREN.append(self.process)
        self.events: list[tuple[float, dict[str, Any]]] = []
        self._cond = threading.Condition()
        self._ended = False
        self.next_index = 0
        threading.Thread(target=self._read, daemon=True).start()
        if stdin is not None:
            assert self.process.stdin is not None
            self.process.stdin.write(stdin)
            self.process.stdin.close()

    @property
    def pid(self) -> int:
        return self.process.pid

    def _read(self) -> None:
        assert self.process.stdout is not None
        for raw in self.process.stdout:
            now = time.perf_counter()
            try:
                event = json.loads(raw)
            except ValueError:
                continue
            with self._cond:
                self.events.append((now, event))
                self._cond.notify_all()
        with self._cond:
            self._ended = True
            self._cond.notify_all()

    def send(self, payload: dict[str, Any]) -> None:
        assert self.process.stdin is not None
        self.process.stdin.write((json.dumps(payload) + "\n").encode())
        self.process.stdin.flush()

    def wait(self, match: Callable[[dict[str, Any]], bool], timeout: float, start: int = 0) -> tuple[float, dict[str, Any]]:
        """The first event from index ``start`` on that ``match`` accepts, as (arrival time,
        event); :attr:`next_index` is then the index after it. Raises RuntimeError after
        ``timeout`` seconds or when the child's output ends."""
        deadline = time.monotonic() + timeout
        with self._cond:
            index = start
            while True:
                while index < len(self.events):
                    stamp, event = self.events[index]
                    index += 1
                    if match(event):
                        self.next_index = index
                        return stamp, event
                remaining = deadline - time.monotonic()
                if self._ended or remaining <= 0:
                    raise RuntimeError(f"no matching event within {timeout:g} s (pid {self.pid}, "
                                       f"status {self.process.poll()}); last: {self.events[-3:]}")
                self._cond.wait(min(remaining, 1.0))

    def named(self, name: str) -> list[dict[str, Any]]:
        with self._cond:
            return [e for _, e in self.events if e.get("event") == name]

    def stop(self, timeout: float = 10.0) -> int | None:
        """Wait up to ``timeout`` s for the exit, then SIGKILL."""
        try:
            self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=5)
        self._log.close()
        return self.process.returncode


def cpu_seconds(pid: int) -> float:
    """utime + stime of ``pid`` in seconds (``/proc/PID/stat`` fields 14 and 15)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for {pid}")


# -- the viewer (this process) ---------------------------------------------------------


def command_line() -> bytes:
    """What a console sends first: ``PROCYCMD PW_`` and a fresh UUID (48 bytes)."""
    return COMMAND_PREFIX + str(uuid.uuid4()).encode()


def recv_exact(sock: socket.socket, count: int) -> bytes:
    data = bytearray()
    while len(data) < count:
        try:
            part = sock.recv(count - len(data))
        except ConnectionResetError:
            break
        if not part:
            break
        data += part
    return bytes(data)


def open_viewer(port: int, send_command: bool) -> tuple[socket.socket, float]:
    """Connect like a VNC viewer (``TCP_NODELAY``, as TigerVNC does), optionally send the
    command line, read the hello. Returns the socket and seconds from ``connect`` to the
    last hello byte; raises RuntimeError when no hello came."""
    started = time.perf_counter()
    sock = socket.create_connection(("127.0.0.1", port), timeout=IO_TIMEOUT)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    if send_command:
        sock.sendall(command_line())
    hello = recv_exact(sock, len(HELLO))
    elapsed = time.perf_counter() - started
    if hello != HELLO:
        sock.close()
        raise RuntimeError(f"no RFB hello from 127.0.0.1:{port} (got {hello!r})")
    return sock, elapsed


def request(sock: socket.socket, kind: bytes, count: int = 0) -> None:
    sock.sendall(kind + count.to_bytes(8, "big"))


def read_bulk(sock: socket.socket, count: int, buffer: bytearray) -> float:
    """Read ``count`` bytes; returns the seconds it took (after the request was sent)."""
    view = memoryview(buffer)
    got = 0
    started = time.perf_counter()
    while got < count:
        n = sock.recv_into(view, min(len(buffer), count - got))
        if not n:
            raise RuntimeError(f"stream ended after {got} of {count} bytes")
        got += n
    return time.perf_counter() - started


def ping_pong(sock: socket.socket, rounds: int) -> list[float]:
    """``rounds`` round trips of 64 bytes (echo), each timed, seconds."""
    request(sock, b"E")
    message = bytes(range(64))
    times = []
    for _ in range(rounds):
        started = time.perf_counter()
        sock.sendall(message)
        if recv_exact(sock, 64) != message:
            raise RuntimeError("echo mismatch")
        times.append(time.perf_counter() - started)
    return times


def stall(sock: socket.socket, pid: int, warm_bytes: int, seconds: float, buffer: bytearray) -> dict[str, float]:
    """Stream, read ``warm_bytes``, then stop reading for ``seconds``: RSS growth of ``pid``
    (KiB) during the stop (``growth_kib``), and since the hello (``since_hello_kib``)."""
    at_hello = rss_kib(pid)
    request(sock, b"S", 1 << 50)
    read_bulk(sock, warm_bytes, buffer)
    before = rss_kib(pid)
    peak = before
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        time.sleep(0.05)
        peak = max(peak, rss_kib(pid))
    after = rss_kib(pid)
    return {"at_hello_kib": at_hello, "before_kib": before, "after_kib": after, "peak_kib": peak,
            "growth_kib": after - before, "since_hello_kib": after - at_hello}


# -- the setup -------------------------------------------------------------------


@dataclass
class Setup:
    work: Path
    device_kind: str
    cert: Path
    backend: JsonChild
    backend_ports: dict[str, int]
    device_pid: int
    device_port: int
    twin_port: int
    device_log: Path | None
    stunnel: subprocess.Popen[bytes]
    stunnel_log: Path
    stunnel_ports: dict[str, int]
    control: JsonChild | None = None
    checks: dict[str, Any] = field(default_factory=dict)
    secshadow_pinned: list[dict[str, Any]] = field(default_factory=list)

    def secret(self, port: int | None = None) -> dict[str, Any]:
        return {"certificate": self.cert.read_text(), "password": str(uuid.uuid4()),
                "host": "127.0.0.1", "port": port or self.device_port}

    def backend_stats(self) -> dict[str, Any]:
        count = len(self.backend.events)
        assert self.backend.process.stdin is not None
        self.backend.process.stdin.write(b"stats\n")
        self.backend.process.stdin.flush()
        return self.backend.wait(lambda e: e.get("event") == "stats", 10, start=count)[1]


def start_setup(work: Path, device_kind: str) -> Setup:
    from secshadow.lab import certs

    cert_pem, key_pem = certs.generate_self_signed()
    twin_pem, twin_key = certs.twin_of(cert_pem)
    paths = {}
    for name, data in (("device.crt", cert_pem), ("device.key", key_pem), ("twin.crt", twin_pem), ("twin.key", twin_key)):
        paths[name] = work / name
        paths[name].write_bytes(data)
        paths[name].chmod(0o600)
    backend = JsonChild([sys.executable, str(HERE / "_peers.py"), "backend"], work / "backend.log")
    ports = backend.wait(lambda e: e.get("event") == "ports", 10)[1]
    device_log: Path | None = None
    if device_kind == "stunnel":
        device_port, twin_port = free_port(), free_port()
        device_log = work / "stunnel-device.log"
        config = _stunnel.write_config(work / "stunnel-device.conf", device_log, client=False, services=[
            _stunnel.Service("device", device_port, ports["procy"], cert=paths["device.crt"], key=paths["device.key"]),
            _stunnel.Service("twin", twin_port, ports["twin"], cert=paths["twin.crt"], key=paths["twin.key"]),
        ])
        device = _stunnel.start(config, device_log)
        _CHILDREN.append(device)
        device_pid = device.pid
    else:
        emulator = JsonChild([sys.executable, str(HERE / "_peers.py"), "emulator", str(paths["device.crt"]),
                              str(paths["device.key"]), str(ports["vnc"]), str(paths["twin.crt"]),
                              str(paths["twin.key"]), str(ports["twinvnc"])], work / "emulator.log")
        listening = emulator.wait(lambda e: e.get("event") == "ports", 20)[1]
        device_port, twin_port = listening["device"], listening["twin"]
        device_pid = emulator.pid
        emulator_child = emulator
    stunnel_ports = {name: free_port() for name in ("noresume", "resume", "twin", "unpinned")}
    stunnel_log = work / "stunnel-client.log"
    config = _stunnel.write_config(work / "stunnel-client.conf", stunnel_log, client=True, services=[
        _stunnel.Service("noresume", stunnel_ports["noresume"], device_port, ca_file=paths["device.crt"]),
        _stunnel.Service("resume", stunnel_ports["resume"], device_port, ca_file=paths["device.crt"], resume=True),
        _stunnel.Service("twin", stunnel_ports["twin"], twin_port, ca_file=paths["device.crt"]),
        _stunnel.Service("unpinned", stunnel_ports["unpinned"], twin_port),
    ])
    client = _stunnel.start(config, stunnel_log)
    _CHILDREN.append(client)
    setup = Setup(work, device_kind, paths["device.crt"], backend, ports, device_pid, device_port, twin_port,
                  device_log, client, stunnel_log, stunnel_ports)
    if device_kind == "emulator":
        setup.checks["_emulator"] = emulator_child
    return setup


# -- the secshadow paths ------------------------------------------------------------


def cli_argv(*extra: str) -> list[str]:
    return [sys.executable, "-m", "secshadow.cli", "--secret-file", "-", "--viewer", "none", "--json", *extra]


@dataclass
class CliSession:
    child: JsonChild
    port: int
    start_to_listening: float


def start_cli(setup: Setup, name: str) -> CliSession:
    child = JsonChild(cli_argv(), setup.work / f"cli-{name}.log", stdin=json.dumps(setup.secret()).encode())
    stamp, event = child.wait(lambda e: e.get("event") in ("listening", "error"), 30)
    if event["event"] != "listening":
        raise RuntimeError(f"secshadow-proxy failed: {event}")
    setup.secshadow_pinned += child.named("pinned")
    return CliSession(child, int(event["port"]), stamp - child.started)


def end_cli(session: CliSession, sock: socket.socket) -> None:
    sock.close()
    status = session.child.stop(10)
    if status != 0:
        raise RuntimeError(f"secshadow-proxy exited {status}")


def start_control(setup: Setup, name: str) -> JsonChild:
    return JsonChild([sys.executable, "-m", "secshadow.cli", "--control", "stdio"], setup.work / f"{name}.log")


class Sessions:
    """Opens sessions in a control-mode process and finds their events."""

    def __init__(self, setup: Setup, control: JsonChild) -> None:
        self.setup = setup
        self.control = control
        self.counter = 0

    def open(self, count: int, timeout: float = 120.0) -> list[tuple[str, int]]:
        """Open ``count`` sessions at once; returns [(session id, port)] once all listen."""
        start = len(self.control.events)
        names = []
        for _ in range(count):
            self.counter += 1
            names.append(f"s{self.counter}")
            self.control.send({"op": "open", "session": names[-1], "secret": self.setup.secret()})
        wanted = set(names)
        found: dict[str, int] = {}
        deadline = time.monotonic() + timeout
        index = start
        while len(found) < len(wanted):
            _, event = self.control.wait(lambda e: e.get("session") in wanted and
                                         e.get("event") in ("listening", "error", "pinned"),
                                         max(0.1, deadline - time.monotonic()), start=index)
            index = self.control.next_index
            if event["event"] == "error":
                raise RuntimeError(f"control mode: {event}")
            if event["event"] == "pinned":
                self.setup.secshadow_pinned.append(event)
            else:
                found[event["session"]] = int(event["port"])
        return [(name, found[name]) for name in names]

    def wait_closed(self, name: str, timeout: float = 10.0) -> None:
        self.control.wait(lambda e: e.get("session") == name and e.get("event") in ("closed", "error"), timeout)


# -- measurements -------------------------------------------------------------------------


@dataclass
class Results:
    #: (figure, path) -> per-repeat values
    values: dict[tuple[str, str], list[float]] = field(default_factory=dict)
    raw: dict[str, Any] = field(default_factory=dict)

    def add(self, figure: str, path: str, value: float) -> None:
        self.values.setdefault((figure, path), []).append(value)

    def get(self, figure: str, path: str) -> list[float]:
        return self.values.get((figure, path), [])


def rotated(items: list[str], by: int) -> list[str]:
    by %= len(items)
    return items[by:] + items[:by]


@dataclass
class PathViewer:
    """A viewer connected through one path; ``pid``: the proxy or stunnel process (0 for
    direct); ``session``: the fresh CLI behind it (secshadow only)."""

    sock: socket.socket
    pid: int
    session: CliSession | None


def open_path(setup: Setup, path: str, name: str, results: Results) -> PathViewer:
    """Connect a viewer through ``path``: a fresh CLI for secshadow (its start and first
    connect are recorded), stunnel without resumption, or direct to the backend."""
    if path == "secshadow":
        session = start_cli(setup, name)
        sock, hello = open_viewer(session.port, send_command=False)
        results.add("cli_start", path, session.start_to_listening)
        results.add("fresh_connect", path, hello)
        return PathViewer(sock, session.child.pid, session)
    port = setup.stunnel_ports["noresume"] if path == "stunnel" else setup.backend_ports["procy"]
    sock, _ = open_viewer(port, send_command=True)
    return PathViewer(sock, setup.stunnel.pid if path == "stunnel" else 0, None)


def close_path(viewer: PathViewer) -> None:
    if viewer.session is not None:
        end_cli(viewer.session, viewer.sock)
    else:
        viewer.sock.close()


def measure_bulk(setup: Setup, path: str, size: int, results: Results, buffer: bytearray) -> None:
    viewer = open_path(setup, path, "bulk", results)
    sock, pid = viewer.sock, viewer.pid
    cpu_before = cpu_seconds(pid) if pid else 0.0
    device_before = cpu_seconds(setup.device_pid)
    request(sock, b"S", size)
    seconds = read_bulk(sock, size, buffer)
    cpu = cpu_seconds(pid) - cpu_before if pid else 0.0
    device_cpu = cpu_seconds(setup.device_pid) - device_before
    results.add("bulk_mbps", path, size / seconds / 1e6)
    if pid:
        results.add("cpu_s_per_gb", path, cpu / (size / 1e9))
    if path != "direct":
        results.add("device_cpu_s_per_gb", path, device_cpu / (size / 1e9))
    close_path(viewer)


def measure_rtt(setup: Setup, path: str, rounds: int, results: Results) -> None:
    viewer = open_path(setup, path, "rtt", results)
    times = ping_pong(viewer.sock, rounds)
    results.add("rtt_p50_us", path, statistics.median(times) * 1e6)
    results.raw.setdefault("rtt_p99_us", {}).setdefault(path, []).append(
        sorted(times)[int(len(times) * 0.99) - 1] * 1e6)
    close_path(viewer)


def measure_stall(setup: Setup, path: str, seconds: float, results: Results, buffer: bytearray) -> None:
    viewer = open_path(setup, path, "stall", results)
    figures = stall(viewer.sock, viewer.pid, 64 * MiB, seconds, buffer)
    results.add("stall_growth_mib", path, figures["growth_kib"] / 1024)
    results.add("stall_since_hello_mib", path, figures["since_hello_kib"] / 1024)
    results.raw.setdefault("stall", {}).setdefault(path, []).append(figures)
    close_path(viewer)


def measure_connect(setup: Setup, sessions: Sessions, path: str, samples: int, results: Results) -> None:
    times = []
    if path == "secshadow":
        for _ in range(samples):
            [(name, port)] = sessions.open(1, timeout=30)
            sock, hello = open_viewer(port, send_command=False)
            times.append(hello)
            sock.close()
            sessions.wait_closed(name)
    else:
        port = {"stunnel": setup.stunnel_ports["noresume"], "stunnel-resume": setup.stunnel_ports["resume"],
                "direct": setup.backend_ports["procy"]}[path]
        if path == "stunnel-resume":
            sock, _ = open_viewer(port, send_command=True)  # primes the session cache, not timed
            sock.close()
        for _ in range(samples):
            sock, hello = open_viewer(port, send_command=True)
            times.append(hello)
            sock.close()
    results.add("warm_connect", path, statistics.median(times))


def measure_fresh_cli(setup: Setup, results: Results) -> None:
    """One fresh CLI: start to ``listening``, then the first viewer's connect to hello."""
    session = start_cli(setup, "start")
    sock, hello = open_viewer(session.port, send_command=False)
    results.add("cli_start", "secshadow", session.start_to_listening)
    results.add("fresh_connect", "secshadow", hello)
    end_cli(session, sock)


def measure_python_start(results: Results, cwd: Path) -> None:
    """The bare interpreter's start (``python -c pass``), the floor under the CLI's."""
    started = time.perf_counter()
    subprocess.run([sys.executable, "-c", "pass"], env=ENV, check=True, timeout=30,
                   cwd=cwd)  # noqa: S603
    results.add("python_start", "secshadow", time.perf_counter() - started)


def measure_concurrent(setup: Setup, count: int, results: Results) -> None:
    """N sessions at once in one fresh control-mode process, each relaying (hello + one
    echo); and N connections at once through a fresh pinned stunnel client."""
    viewers: list[socket.socket] = []
    control = start_control(setup, "control-concurrent")
    sessions = Sessions(setup, control)
    try:
        # Warm-up: one full session, so lazily imported modules are in the baseline.
        [(name, port)] = sessions.open(1)
        sock, _ = open_viewer(port, send_command=False)
        ping_pong(sock, 1)
        sock.close()
        sessions.wait_closed(name)
        time.sleep(0.3)
        base = rss_kib(control.pid)
        started = time.perf_counter()
        opened: list[tuple[str, int]] = []
        batch = 100
        while len(opened) < count:
            opened += sessions.open(min(batch, count - len(opened)), timeout=120)
        seconds_to_open = time.perf_counter() - started
        for _, port in opened:
            sock, _ = open_viewer(port, send_command=False)
            viewers.append(sock)
            ping_pong(sock, 1)
        time.sleep(0.3)
        during = rss_kib(control.pid)
        results.raw["concurrent_secshadow"] = {
            "sessions": len(viewers), "seconds_to_open": round(seconds_to_open, 2),
            "rss_base_kib": base, "rss_during_kib": during, "fds": len(os.listdir(f"/proc/{control.pid}/fd"))}
        results.add("kib_per_session", "secshadow", (during - base) / len(viewers))
    finally:
        for sock in viewers:
            sock.close()
        viewers.clear()
        if control.process.poll() is None:
            control.send({"op": "shutdown"})
        control.stop(30)
    # stunnel: a fresh client process (same configuration, its own ports)
    port = free_port()
    log = setup.work / "stunnel-concurrent.log"
    config = _stunnel.write_config(setup.work / "stunnel-concurrent.conf", log, client=True, services=[
        _stunnel.Service("noresume", port, setup.device_port, ca_file=setup.cert)])
    process = _stunnel.start(config, log)
    _CHILDREN.append(process)
    try:
        sock, _ = open_viewer(port, send_command=True)
        ping_pong(sock, 1)
        sock.close()
        time.sleep(0.3)
        base = rss_kib(process.pid)
        for _ in range(count):
            sock, _ = open_viewer(port, send_command=True)
            viewers.append(sock)
            ping_pong(sock, 1)
        time.sleep(0.3)
        during = rss_kib(process.pid)
        results.raw["concurrent_stunnel"] = {"connections": len(viewers), "rss_base_kib": base, "rss_during_kib": during}
        results.add("kib_per_session", "stunnel", (during - base) / len(viewers))
    finally:
        for sock in viewers:
            sock.close()
        process.terminate()
        process.wait(timeout=10)


# -- checks ----------------------------------------------------------------------------


def gets_hello(port: int) -> bool:
    """Whether a viewer sending the command through ``port`` receives the RFB hello."""
    try:
        sock, _ = open_viewer(port, send_command=True)
    except (RuntimeError, OSError):
        return False
    sock.close()
    return True


def negative_control(setup: Setup) -> dict[str, Any]:
    """The twin device must be refused by both pins, and must work without a pin."""
    found: dict[str, Any] = {}
    twin_secret = setup.secret(port=setup.twin_port)
    child = JsonChild(cli_argv(), setup.work / "cli-twin.log", stdin=json.dumps(twin_secret).encode())
    status = child.stop(30)
    errors = child.named("error")
    found["secshadow_exit"] = status
    found["secshadow_code"] = errors[0].get("code") if errors else None
    found["secshadow_listened"] = bool(child.named("listening"))
    found["stunnel_refused"] = not gets_hello(setup.stunnel_ports["twin"])
    time.sleep(0.2)
    stats = setup.backend_stats()
    # A TLS front may open its backend connection before the handshake ends, so what counts
    # is a command that got through (stunnel device), or any connection the emulator made
    # (it connects to its VNC server only after an accepted PROCYCMD).
    found["commands_past_twin_with_pins"] = stats["commands"]["twin"] + stats["connections"]["twinvnc"]
    found["unpinned_through_twin"] = gets_hello(setup.stunnel_ports["unpinned"])
    found["ok"] = (status == 6 and found["secshadow_code"] == "pin-mismatch" and not found["secshadow_listened"]
                   and found["stunnel_refused"] and found["commands_past_twin_with_pins"] == 0
                   and found["unpinned_through_twin"])
    return found


def tls_checks(setup: Setup) -> dict[str, Any]:
    pinned = setup.secshadow_pinned
    good = sum(1 for e in pinned if (e.get("tls_version"), e.get("cipher")) == TLS13)
    summary = _stunnel.log_summary(setup.stunnel_log)
    summary["concurrent"] = _stunnel.log_summary(setup.work / "stunnel-concurrent.log").get("noresume", Counter())
    stunnel: dict[str, dict[str, int]] = {}
    for service in ("noresume", "resume", "concurrent"):
        counts: Counter[str] = summary.get(service, Counter())
        stunnel[service] = {"connections": counts.get("new", 0) + counts.get("reused", 0),
                            "reused": counts.get("reused", 0),
                            "tls13_aes256gcm": counts.get("TLSv1.3 TLS_AES_256_GCM_SHA384", 0),
                            "other": sum(v for k, v in counts.items() if k.startswith("older") or
                                         (k.startswith("TLSv1.3") and "AES_256_GCM" not in k))}
    device: dict[str, int] = {}
    if setup.device_log is not None:
        device = dict(_stunnel.log_summary(setup.device_log).get("device", {}))
    else:
        emulator: JsonChild = setup.checks["_emulator"]
        count = len(emulator.events)
        assert emulator.process.stdin is not None
        emulator.process.stdin.write(b"stats\n")
        emulator.process.stdin.flush()
        device = emulator.wait(lambda e: e.get("event") == "stats", 10, start=count)[1]["negotiated"]
    # A service --only left unused has no connections: nothing to check there.
    ok = (bool(pinned) and good == len(pinned)
          and all(s["tls13_aes256gcm"] == s["connections"] and not s["other"] for s in stunnel.values())
          and stunnel["noresume"]["reused"] == 0 and stunnel["concurrent"]["reused"] == 0
          and all(key in ("new", "reused", "TLSv1.3 TLS_AES_256_GCM_SHA384") for key in device)
          # the first connection of the run fills the cache; later ones must resume (a few may
          # renegotiate when a ticket expires)
          and stunnel["resume"]["reused"] >= (stunnel["resume"]["connections"] - 1) * 0.8)
    return {"secshadow_sessions": len(pinned), "secshadow_tls13_aes256gcm": good, "stunnel": stunnel,
            "device_side": device, "ok": ok}


# -- profile ---------------------------------------------------------------------------


def _leaf_category(frames: list[str]) -> str:
    """Where one py-spy sample spent its time: the innermost frame decides (self time)."""
    leaf = frames[-1]
    name, _, where = leaf.partition(" (")
    where = where.rstrip(")")
    if "libc.so" in where:
        if name in ("send", "recv", "__send", "__recv", "sendmsg", "recvmsg", "write", "read", "__libc_send",
                    "__libc_recv"):
            return "socket send/recv syscalls (kernel time included)"
        if name.startswith("epoll"):
            return "epoll syscalls"
        return "libc internals (memcpy, malloc; unnamed in Debian's libc)"
    if "_rust.abi3.so" in where or "libssl" in where or "libcrypto" in where:
        if name.startswith("_cffi_f_"):
            return "cffi glue"
        if any(word in name.lower() for word in ("aes", "gcm", "ghash")):
            return "OpenSSL: AES-GCM"
        return "OpenSSL: other (records, BIOs, state)"
    if "_cffi_backend" in where:
        return "cffi glue"
    file = where.rsplit(":", 1)[0]
    if file.endswith(".py"):
        if file.startswith("OpenSSL/"):
            return "pyOpenSSL (Python)"
        if file in ("twisted/protocols/tls.py", "twisted/internet/_newtls.py", "twisted/protocols/policies.py"):
            return "Twisted TLS protocol (Python)"
        if file.startswith("twisted/"):
            return "Twisted reactor and TCP transport (Python)"
        if file.startswith("secshadow/"):
            return "secshadow (Python)"
        return "other Python"
    return "CPython runtime and C modules"


def pyspy_summary(raw: Path) -> dict[str, float]:
    """Self-time shares (percent) per :func:`_leaf_category` from py-spy's raw output."""
    counts: dict[str, int] = {}
    for line in raw.read_text().splitlines():
        stack, _, number = line.rpartition(" ")
        if not stack or not number.isdigit():
            continue
        category = _leaf_category(stack.split(";"))
        counts[category] = counts.get(category, 0) + int(number)
    total = sum(counts.values()) or 1
    return {k: round(100 * v / total, 1) for k, v in sorted(counts.items(), key=lambda kv: -kv[1])}


#: Functions whose inclusive share (the sample is inside them) the profile reports.
INCLUSIVE = ("Connection.doRead (twisted/internet/tcp.py", "TLSMemoryBIOProtocol.dataReceived",
             "Connection.bio_write (OpenSSL/SSL.py", "Connection.recv (OpenSSL/SSL.py",
             "Connection._raise_ssl_error (OpenSSL/SSL.py", "Splice.deliver (secshadow/relay.py",
             "FileDescriptor.write (twisted/internet/abstract.py", "FileDescriptor.doWrite (twisted/internet/abstract.py",
             "callWithLogger (twisted/python/log.py")


def pyspy_inclusive(raw: Path) -> dict[str, float]:
    """Inclusive shares (percent of samples) of :data:`INCLUSIVE` functions."""
    counts = dict.fromkeys(INCLUSIVE, 0)
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, number = line.rpartition(" ")
        if not stack or not number.isdigit():
            continue
        total += int(number)
        for name in INCLUSIVE:
            if name in stack:
                counts[name] += int(number)
    return {k.split(" (")[0]: round(100 * v / max(1, total), 1) for k, v in counts.items()}


def _perf_rows(data: Path, sort: str) -> list[tuple[float, list[str]]]:
    """(percent, the other columns) per row of ``perf report --sort SORT``, in its order."""
    report = subprocess.run(["perf", "report", "-i", str(data), "--no-children", "--sort", sort, "--stdio",  # noqa: S603,S607
                             "-g", "none"], capture_output=True, text=True, timeout=120).stdout
    return [(float(parts[0].rstrip("%")), parts[1:]) for line in report.splitlines()
            if not line.startswith("#") and len(parts := line.split()) >= 2 and parts[0].endswith("%")]


def perf_symbols(data: Path, top: int = 12) -> dict[str, float]:
    """The ``top`` symbols by self time (percent) from ``perf report --sort dso,sym``."""
    rows = [(share, cols) for share, cols in _perf_rows(data, "dso,sym") if len(cols) >= 3]
    return {f"{cols[2]} ({cols[0]})": share for share, cols in rows[:top]}


def perf_summary(data: Path) -> dict[str, float]:
    """Self-time shares (percent) per shared object from ``perf report --sort dso``."""
    return {" ".join(cols): share for share, cols in _perf_rows(data, "dso")}


def _profiled_stream(sock: socket.socket, pid: int, tools: list[list[str]], seconds: float,
                     buffer: bytearray) -> dict[str, float]:
    """Stream device to viewer while each tool in ``tools`` (argv, run one after another)
    records ``pid``; returns MB/s and CPU s/GB over the whole stream."""
    request(sock, b"S", 1 << 50)
    read_bulk(sock, 32 * MiB, buffer)
    got, started, cpu_before = 0, time.perf_counter(), cpu_seconds(pid)
    for argv in tools:
        tool = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)  # noqa: S603
        _CHILDREN.append(tool)
        deadline = time.monotonic() + seconds + 30
        while tool.poll() is None and time.monotonic() < deadline:
            n = sock.recv_into(buffer)
            if not n:
                raise RuntimeError("stream ended while profiling")
            got += n
        if tool.poll() is None:
            tool.kill()
        _, err = tool.communicate(timeout=10)
        if tool.returncode not in (0, -signal.SIGINT):
            progress(f"{argv[0]} exited {tool.returncode}: {err.decode(errors='replace')[-500:]}")
    elapsed = time.perf_counter() - started
    cpu = cpu_seconds(pid) - cpu_before
    return {"mb_per_s": round(got / elapsed / 1e6), "cpu_s_per_gb": round(cpu / (got / 1e9), 2)}


def profile(setup: Setup, seconds: float) -> dict[str, Any]:
    """py-spy (if installed) and perf (if present) on the proxy during bulk; perf on stunnel."""
    found: dict[str, Any] = {}
    buffer = bytearray(256 * 1024)
    have_pyspy, have_perf = shutil.which("py-spy"), shutil.which("perf")
    if not have_pyspy and not have_perf:
        raise SystemExit("bench_vs_stunnel: --profile needs py-spy (pip install py-spy) or perf (linux-perf)")
    session = start_cli(setup, "profile")
    sock, _ = open_viewer(session.port, send_command=False)
    pid = session.child.pid
    tools = []
    if have_perf:
        tools.append(["perf", "record", "-F", "499", "-g", "-p", str(pid), "-o", str(setup.work / "proxy.perf"),
                      "--", "sleep", f"{seconds:g}"])
    if have_pyspy:
        tools.append(["py-spy", "record", "--pid", str(pid), "--native", "--rate", "100",
                      "--duration", str(max(1, round(seconds))), "--format", "raw",
                      "--output", str(setup.work / "proxy.pyspy")])
    found["secshadow_stream_while_profiled"] = _profiled_stream(sock, pid, tools, seconds, buffer)
    end_cli(session, sock)
    if have_perf:
        found["secshadow_perf_dso"] = perf_summary(setup.work / "proxy.perf")
        found["secshadow_perf_symbols"] = perf_symbols(setup.work / "proxy.perf")
    if have_pyspy:
        found["secshadow_pyspy"] = pyspy_summary(setup.work / "proxy.pyspy")
        found["secshadow_pyspy_inclusive"] = pyspy_inclusive(setup.work / "proxy.pyspy")
    if have_perf:
        sock, _ = open_viewer(setup.stunnel_ports["noresume"], send_command=True)
        found["stunnel_stream_while_profiled"] = _profiled_stream(sock, setup.stunnel.pid, [[
            "perf", "record", "-F", "499", "-g", "-p", str(setup.stunnel.pid), "-o", str(setup.work / "stunnel.perf"),
            "--", "sleep", f"{seconds:g}"]], seconds, buffer)
        sock.close()
        found["stunnel_perf_dso"] = perf_summary(setup.work / "stunnel.perf")
        found["stunnel_perf_symbols"] = perf_symbols(setup.work / "stunnel.perf")
    return found


def profile_lines(found: dict[str, Any]) -> list[str]:
    lines = []
    for key, title in (("secshadow_pyspy", "secshadow-proxy during bulk, py-spy self time by category"),
                       ("secshadow_pyspy_inclusive", "secshadow-proxy during bulk, py-spy inclusive time in"),
                       ("secshadow_perf_dso", "secshadow-proxy during bulk, perf self time by shared object"),
                       ("secshadow_perf_symbols", "secshadow-proxy during bulk, perf top symbols"),
                       ("stunnel_perf_dso", "stunnel client during bulk, perf self time by shared object"),
                       ("stunnel_perf_symbols", "stunnel client during bulk, perf top symbols")):
        if key in found:
            lines.append(f"{title}:")
            lines += [f"  {share:5.1f} %  {name}" for name, share in found[key].items() if share >= 0.5]
    for key in ("secshadow_stream_while_profiled", "stunnel_stream_while_profiled"):
        if key in found:
            lines.append(f"{key}: {found[key]}")
    return lines


# -- report ------------------------------------------------------------------------------


def summary(values: list[float]) -> tuple[float, float, float] | None:
    if not values:
        return None
    return statistics.median(values), min(values), max(values)


def fmt(values: list[float], digits: int) -> str:
    s = summary(values)
    if s is None:
        return "-"
    med, low, high = s
    return f"{med:.{digits}f} [{low:.{digits}f}-{high:.{digits}f}]"


def ratio(a: list[float], b: list[float]) -> str:
    if not a or not b or statistics.median(b) == 0:
        return "-"
    return f"{statistics.median(a) / statistics.median(b):.2f}x"


def table(results: Results, args: argparse.Namespace) -> list[str]:
    g = results.get
    ms = [v * 1e3 for v in g("warm_connect", "secshadow")]

    def scaled(figure: str, path: str, factor: float) -> list[float]:
        return [v * factor for v in g(figure, path)]

    rows = [
        (f"bulk MB/s, device to viewer ({args.bulk_mib} MiB)", fmt(g("bulk_mbps", "secshadow"), 0),
         fmt(g("bulk_mbps", "stunnel"), 0), ratio(g("bulk_mbps", "secshadow"), g("bulk_mbps", "stunnel")),
         fmt(g("bulk_mbps", "direct"), 0)),
        ("console-side CPU s/GB (proxy or stunnel)", fmt(g("cpu_s_per_gb", "secshadow"), 2),
         fmt(g("cpu_s_per_gb", "stunnel"), 2), ratio(g("cpu_s_per_gb", "secshadow"), g("cpu_s_per_gb", "stunnel")), "-"),
        (f"device-side CPU s/GB ({args.device}, same device)", fmt(g("device_cpu_s_per_gb", "secshadow"), 2),
         fmt(g("device_cpu_s_per_gb", "stunnel"), 2),
         ratio(g("device_cpu_s_per_gb", "secshadow"), g("device_cpu_s_per_gb", "stunnel")), "-"),
        (f"rtt p50 us, 64-byte ping-pong ({args.rounds} rounds)", fmt(g("rtt_p50_us", "secshadow"), 0),
         fmt(g("rtt_p50_us", "stunnel"), 0), ratio(g("rtt_p50_us", "secshadow"), g("rtt_p50_us", "stunnel")),
         fmt(g("rtt_p50_us", "direct"), 0)),
        ("connect->hello ms: warm control-mode vs stunnel", fmt(ms, 2),
         fmt(scaled("warm_connect", "stunnel", 1e3), 2), ratio(ms, scaled("warm_connect", "stunnel", 1e3)),
         fmt(scaled("warm_connect", "direct", 1e3), 2)),
        ("  ... vs stunnel with session resumption", fmt(ms, 2),
         fmt(scaled("warm_connect", "stunnel-resume", 1e3), 2),
         ratio(ms, scaled("warm_connect", "stunnel-resume", 1e3)), ""),
        ("connect->hello ms: fresh CLI vs stunnel", fmt(scaled("fresh_connect", "secshadow", 1e3), 2),
         fmt(scaled("warm_connect", "stunnel", 1e3), 2),
         ratio(scaled("fresh_connect", "secshadow", 1e3), scaled("warm_connect", "stunnel", 1e3)), ""),
        ("CLI start -> listening ms", fmt(scaled("cli_start", "secshadow", 1e3), 0), "-", "-",
         "python -c pass: " + fmt(scaled("python_start", "secshadow", 1e3), 0)),
        (f"RSS growth MiB while the viewer stops reading {args.stall:g} s", fmt(g("stall_growth_mib", "secshadow"), 2),
         fmt(g("stall_growth_mib", "stunnel"), 2), "-", "-"),
        ("  ... from the hello to the end of the stop", fmt(g("stall_since_hello_mib", "secshadow"), 2),
         fmt(g("stall_since_hello_mib", "stunnel"), 2), "-", "-"),
        (f"KiB per session, {args.sessions} at once", fmt(g("kib_per_session", "secshadow"), 1),
         fmt(g("kib_per_session", "stunnel"), 1),
         ratio(g("kib_per_session", "secshadow"), g("kib_per_session", "stunnel")), "-"),
    ]
    header = ("figure (median [min-max] over repeats)", "secshadow", "stunnel", "ratio", "direct")
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(5)]
    lines = [" | ".join(str(c).ljust(w) for c, w in zip(header, widths, strict=True))]
    lines.append("-+-".join("-" * w for w in widths))
    lines += [" | ".join(str(c).ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
    return lines


FIGURES = ("start", "connect", "bulk", "rtt", "stall", "sessions")


# -- main --------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="3 repeats, 128 MiB, 200 sessions, shorter samples")
    parser.add_argument("--repeats", type=int, help="interleaved repeats (default 5, --quick 3)")
    parser.add_argument("--bulk-mib", type=int, help="bulk transfer size in MiB (default 512, --quick 128)")
    parser.add_argument("--sessions", type=int, help="concurrent sessions (default 1000, --quick 200)")
    parser.add_argument("--rounds", type=int, help="ping-pong rounds per rtt sample (default 2000, --quick 500)")
    parser.add_argument("--connects", type=int, help="connect samples per path per repeat (default 10, --quick 5)")
    parser.add_argument("--stall", type=float, help="seconds the viewer stops reading (default 2, --quick 1)")
    parser.add_argument("--device", choices=("stunnel", "emulator"), default="stunnel",
                        help="the device's TLS server (default: %(default)s)")
    parser.add_argument("--product", metavar="DIR", type=Path, default=ROOT,
                        help="directory holding the secshadow package under test (default: this checkout; "
                             "e.g. a `git archive HEAD secshadow | tar -x -C DIR` snapshot)")
    parser.add_argument("--compile", action="store_true",
                        help="byte-compile the secshadow under test first (python -m compileall), as an install "
                             "would; without it, and with PYTHONDONTWRITEBYTECODE set, every CLI start compiles it")
    parser.add_argument("--keep", action="store_true", help="keep the work directory (logs) after a passing run")
    parser.add_argument("--only", metavar="LIST", default=",".join(FIGURES),
                        help=f"comma-separated subset of {','.join(FIGURES)} (default: all)")
    parser.add_argument("--profile", type=float, metavar="SECONDS",
                        help="instead of the figures: profile the proxy (py-spy, perf) and stunnel (perf) "
                             "during SECONDS of bulk, and print where the time goes")
    parser.add_argument("--json", metavar="FILE", help="also write every sample and check to FILE")
    parser.add_argument("--max-seconds", type=float, default=900.0, help="watchdog: abort after this (default 900)")
    args = parser.parse_args(argv)
    quick = args.quick
    defaults = {"repeats": (5, 3), "bulk_mib": (512, 128), "sessions": (1000, 200), "rounds": (2000, 500),
                "connects": (10, 5), "stall": (2.0, 1.0)}
    for name, (full, short) in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, short if quick else full)
    args.only = set(filter(None, args.only.split(",")))
    if args.only - set(FIGURES) or not args.only:
        parser.error(f"--only takes a comma-separated subset of {','.join(FIGURES)}")
    for name in ("repeats", "bulk_mib", "sessions", "rounds", "connects"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    return args


def watchdog(seconds: float) -> None:
    def fire() -> None:
        sys.stderr.write(f"bench_vs_stunnel: watchdog: still running after {seconds:g} s; killing children\n")
        _kill_children()
        os._exit(3)

    timer = threading.Timer(seconds, fire)
    timer.daemon = True
    timer.start()


def progress(text: str) -> None:
    sys.stderr.write(f"[{time.strftime('%H:%M:%S')}] {text}\n")
    sys.stderr.flush()


def raise_fd_limit(sessions: int) -> None:
    """Raise the soft RLIMIT_NOFILE to the hard one (children inherit it); N sessions need
    about 2N descriptors in the proxy and N here. Exits with a message when too low."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    limit = hard if hard != resource.RLIM_INFINITY else 1 << 20
    if limit < 2 * sessions + 200:
        raise SystemExit(f"bench_vs_stunnel: --sessions {sessions} needs about {2 * sessions + 200} file "
                         f"descriptors per process; the hard limit is {limit} (ulimit -Hn)")


def run(args: argparse.Namespace) -> int:
    began = time.perf_counter()
    raise_fd_limit(args.sessions if "sessions" in args.only else 0)
    load_before = os.getloadavg()
    work = Path(tempfile.mkdtemp(prefix="bench-vs-stunnel-"))
    results = Results()
    buffer = bytearray(256 * 1024)
    progress(f"work directory {work}; device: {args.device}")
    setup = start_setup(work, args.device)
    control: JsonChild | None = None
    try:
        progress("negative control: twin certificate")
        negative = negative_control(setup)
        if args.profile:
            found = profile(setup, args.profile)
            print("\n".join(profile_lines(found)), flush=True)
            if args.json:
                Path(args.json).write_text(json.dumps(found, indent=1))
            return 0 if negative["ok"] else 1
        control = start_control(setup, "control-warm")
        sessions = Sessions(setup, control)
        # Warm the control process once (imports, first handshake) before any timing.
        [(name, port)] = sessions.open(1, timeout=30)
        sock, _ = open_viewer(port, send_command=False)
        sock.close()
        sessions.wait_closed(name)
        size = args.bulk_mib * MiB
        connect_paths = ["secshadow", "stunnel", "stunnel-resume", "direct"]
        only = args.only
        for repeat in range(args.repeats if only - {"sessions"} else 0):
            progress(f"repeat {repeat + 1}/{args.repeats}")
            if "start" in only:
                measure_python_start(results, setup.work)
                measure_fresh_cli(setup, results)
            if "connect" in only:
                for path in rotated(connect_paths, repeat):
                    measure_connect(setup, sessions, path, args.connects, results)
            if "bulk" in only:
                for path in rotated(["secshadow", "stunnel", "direct"], repeat):
                    measure_bulk(setup, path, size, results, buffer)
            if "rtt" in only:
                for path in rotated(["secshadow", "stunnel", "direct"], repeat):
                    measure_rtt(setup, path, args.rounds, results)
            if "stall" in only:
                for path in rotated(["secshadow", "stunnel"], repeat):
                    measure_stall(setup, path, args.stall, results, buffer)
        control.send({"op": "shutdown"})
        control.stop(30)
        control = None
        if "sessions" in only:
            progress(f"{args.sessions} concurrent sessions")
            measure_concurrent(setup, args.sessions, results)
        checks = tls_checks(setup)
    finally:
        if control is not None and control.process.poll() is None:
            control.process.kill()
        _kill_children()
    total = time.perf_counter() - began
    lines = [
        f"bench_vs_stunnel: {platform.node()} {platform.machine()}, {os.cpu_count()} CPUs, Linux {platform.release()}, "
        f"Python {platform.python_version()}",
        f"secshadow under test: {args.product} ({compiled_note(args.product)})",
        f"device: {args.device}; repeats {args.repeats} (interleaved, order rotated); load average before "
        f"{load_before[0]:.2f}, after {os.getloadavg()[0]:.2f}",
        "",
        *table(results, args),
        "",
        f"TLS 1.3 + AES-256-GCM: secshadow {checks['secshadow_tls13_aes256gcm']}/{checks['secshadow_sessions']} sessions; "
        f"stunnel without resumption {checks['stunnel']['noresume']['tls13_aes256gcm']}/"
        f"{checks['stunnel']['noresume']['connections']} (reused {checks['stunnel']['noresume']['reused']}), with "
        f"{checks['stunnel']['resume']['tls13_aes256gcm']}/{checks['stunnel']['resume']['connections']} "
        f"(reused {checks['stunnel']['resume']['reused']}); device side {checks['device_side']} -> "
        f"{'OK' if checks['ok'] else 'FAILED'}",
        f"pin negative control (twin certificate): secshadow exit {negative['secshadow_exit']} "
        f"({negative['secshadow_code']}), pinned stunnel refused: {negative['stunnel_refused']}, commands past the "
        f"twin with a pin: {negative['commands_past_twin_with_pins']}; unpinned stunnel got through the twin: "
        f"{negative['unpinned_through_twin']} -> {'OK' if negative['ok'] else 'FAILED'}",
        f"concurrent: {json.dumps(results.raw.get('concurrent_secshadow'))} stunnel "
        f"{json.dumps(results.raw.get('concurrent_stunnel'))}",
        f"total {total:.0f} s",
    ]
    print("\n".join(lines), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({
            "args": {k: str(v) if isinstance(v, Path) else sorted(v) if isinstance(v, set) else v
                     for k, v in vars(args).items()}, "values": {f"{f}/{p}": v for (f, p), v in results.values.items()},
            "raw": results.raw, "checks": checks, "negative_control": negative, "total_s": total}, indent=1))
    passed = checks["ok"] and negative["ok"]
    if passed and not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    else:
        progress(f"logs kept in {work}")
    return 0 if passed else 1


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    use_product(args.product.resolve())
    if args.compile:
        subprocess.run([sys.executable, "-m", "compileall", "-q", str(args.product.resolve() / "secshadow")],  # noqa: S603
                       check=True, timeout=300, env={**os.environ, "PYTHONDONTWRITEBYTECODE": ""})
    signal.signal(signal.SIGTERM, _on_signal)
    watchdog(args.max_seconds)
    try:
        status = run(args)
    except KeyboardInterrupt:
        status = 130
    sys.exit(status)


if __name__ == "__main__":
    main()
