"""Secret hygiene (issue 4, part 2): the one-time password and the UMS password never
appear in any process's argv (``/proc/<pid>/cmdline`` of the proxy and of the viewer it
launched), the viewer's environment, log output at any verbosity, events, exception
messages or tracebacks, or files the proxy writes. The UMS password comes only from a
file or the environment.

The one-time password is issued by the real reference IMI server (``secshadow-ums``); a
scripted device holding the genuine certificate records the ``PROCYCMD`` it receives, so
the test learns the password the proxy used and can search for it everywhere.
"""

from __future__ import annotations

import base64
import os
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet.defer import Deferred
from twisted.logger import formatEvent, globalLogPublisher
from twisted.python.failure import Failure

from secshadow import events
from secshadow.lab import certs
from secshadow.errors import SecShadowError
from secshadow.lab.harness import Lab, ManagedProcess, child_environment, start_lab
from secshadow.proxy import SessionOptions, ShadowSession
from secshadow.secret import OneTimePassword, ShadowSecret
from secshadow.lab.scripted import (
    HELLO,
    DeviceConn,
    HTTPScript,
    PeerClosed,
    ScriptedDevice,
    http_response,
    names,
    run_cli,
    secret_json,
)
from secshadow.tests._tls import der_of
from secshadow.tests._umscerts import make_leaf
from secshadow.tests.conftest import require_program

VIEWER = """\
import os, pathlib, socket, sys, time
host, port, marker, hold = sys.argv[1], int(sys.argv[2]), sys.argv[3], float(sys.argv[4])
s = socket.create_connection((host, port), timeout=10)
data = b""
while len(data) < 12:
    chunk = s.recv(12 - len(data))
    if not chunk:
        break
    data += chunk
pathlib.Path(marker).write_text(str(os.getpid()))
time.sleep(hold)
s.close()
"""


def _cmdline(pid: int) -> bytes:
    return Path(f"/proc/{pid}/cmdline").read_bytes()


def _environ(pid: int) -> bytes:
    return Path(f"/proc/{pid}/environ").read_bytes()


def _files_under(root: Path) -> dict[Path, bytes]:
    return {p: p.read_bytes() for p in root.rglob("*") if p.is_file()}


@pytest.fixture(scope="module")
def ums_lab() -> Any:
    require_program("openssl")
    with start_lab(with_xvnc=False) as lab:
        yield lab


def _genuine_device(lab: Lab) -> ScriptedDevice:
    def script(conn: DeviceConn) -> None:
        conn.recv_command()
        conn.send(HELLO)
        conn.drain(20)

    return ScriptedDevice(lab.device_cert.read_bytes(), lab.device_key.read_bytes(), script)


@pytest.mark.integration
@pytest.mark.parametrize("how", ["password-file", "environment"])
def test_no_secret_in_argv_environ_output_events_or_files(ums_lab: Lab, tmp_path: Path, how: str):
    ums_password = ums_lab.password_file.read_text().strip()
    viewer_py = tmp_path / "viewer.py"
    viewer_py.write_text(VIEWER)
    marker = tmp_path / "viewer.pid"
    work = tmp_path / "cwd"
    work.mkdir()
    device = _genuine_device(ums_lab)
    argv = ums_lab.proxy_argv("--json", "-v", "--viewer-command",
                              f"{sys.executable} {viewer_py} {{host}} {{port}} {marker} 2")
    argv[argv.index("--device-port") + 1] = str(device.port)
    env = child_environment({"HOME": str(work), "TMPDIR": str(work), "SECSHADOW_DEBUG": "1"})
    if how == "environment":
        i = argv.index("--ums-password-file")
        del argv[i:i + 2]
        env["SECSHADOW_UMS_PASSWORD"] = ums_password
    before = _files_under(tmp_path)
    proxy = ManagedProcess("hygiene-proxy", argv, tmp_path, env=env)
    try:
        proxy.wait_for("session-started", timeout=30)
        deadline = time.monotonic() + 10
        # The viewer writes its pid; wait for the whole number, not just the file.
        while not (marker.exists() and marker.read_text().strip().isdigit()) and time.monotonic() < deadline:
            time.sleep(0.05)
        viewer_pid = int(marker.read_text())
        proxy_cmdline, viewer_cmdline = _cmdline(proxy.process.pid), _cmdline(viewer_pid)
        viewer_environ = _environ(viewer_pid)
        assert proxy.process.wait(timeout=30) == 0
    finally:
        proxy.stop()
        device.stop()
    otp = bytes(device.conns[0].received[len(b"PROCYCMD PW_"):48]).decode()
    uuid.UUID(otp)  # the device really received the UMS-issued one-time password
    assert names(proxy.events) == ["secret", "pinned", "listening", "viewer-started", "viewer-connected",
                                   "session-started", "closed"]
    assert proxy.events[3]["pid"] == viewer_pid
    stderr = proxy.log_path.read_text()
    written = {p: data for p, data in _files_under(tmp_path).items() if before.get(p) != data
               and p != proxy.log_path}
    for secret in (otp, ums_password):
        raw = secret.encode()
        assert raw not in proxy_cmdline and raw not in viewer_cmdline
        assert raw not in viewer_environ
        assert secret not in stderr
        assert secret not in "\n".join(proxy.lines)
        for path, data in written.items():
            assert raw not in data, path
    assert b"SECSHADOW_UMS_PASSWORD" not in viewer_environ
    assert "Traceback" not in stderr


@pytest.mark.integration
@pytest.mark.parametrize("verbosity", ["-v", "-q", None])
def test_no_secret_in_output_when_the_device_rejects(tmp_path: Path, verbosity: str | None):
    """Error paths (exit 7) at every verbosity, with SECSHADOW_DEBUG tracebacks on."""
    cert, key = certs.generate_self_signed()
    password = str(uuid.uuid4())

    def reject(conn: DeviceConn) -> None:
        conn.recv_command()

    device = ScriptedDevice(cert, key, reject)
    try:
        run = run_cli(["--secret-file", "-", "--viewer", "none", *([verbosity] if verbosity else [])],
                      stdin=secret_json(cert, password, device.port),
                      env=child_environment({"SECSHADOW_DEBUG": "1"}), timeout=30)
    finally:
        device.stop()
    assert run.code == 7, run.stderr
    assert bytes(device.conns[0].received) == f"PROCYCMD PW_{password}".encode()
    assert password not in run.stdout + run.stderr
    assert password.encode() not in _cmdline(os.getpid())


@pytest.mark.integration
def test_ums_password_cannot_be_given_on_argv_and_is_not_echoed():
    secret = "hunter2-" + uuid.uuid4().hex
    run = run_cli(["--ums", "https://127.0.0.1:1", "--device", "27", "--ums-user", "admin",
                   "--ums-password", secret, "--ums-insecure"], viewer=False, timeout=30)
    assert run.code == 2
    assert run.events[-1]["code"] == "usage"
    # The mistake already put the password in argv; the proxy must not copy it into its
    # output (console logs), as the contract promises for every message.
    assert secret not in run.stdout + run.stderr


@pytest.mark.integration
@pytest.mark.parametrize("how", ["file", "environment"])
def test_ums_password_comes_from_a_file_or_the_environment(tmp_path: Path, how: str):
    leaf = make_leaf()
    secret = "pw-" + uuid.uuid4().hex
    ums = HTTPScript(leaf.cert_pem, leaf.key_pem,
                     lambda i, r: http_response(401, b'{"message": "no", "errorCode": "ITG-0B001"}'))
    args = ["--ums", f"https://127.0.0.1:{ums.port}", "--device", "27", "--ums-user", "admin",
            "--ums-fingerprint", leaf.sha256, "--viewer", "none"]
    env = child_environment()
    env.pop("SECSHADOW_UMS_PASSWORD", None)
    if how == "file":
        (tmp_path / "pw").write_text(secret + "\n")
        args += ["--ums-password-file", str(tmp_path / "pw")]
    else:
        env["SECSHADOW_UMS_PASSWORD"] = secret
    try:
        run = run_cli(args, env=env, timeout=30)
    finally:
        ums.stop()
    assert run.code == 3
    auth = [line for line in ums.requests[0].split(b"\r\n") if line.lower().startswith(b"authorization:")][0]
    assert base64.b64decode(auth.split()[-1]) == f"admin:{secret}".encode()
    assert secret not in run.stdout + run.stderr


@pytest.mark.integration
def test_without_file_or_environment_there_is_no_ums_password():
    env = child_environment()
    env.pop("SECSHADOW_UMS_PASSWORD", None)
    run = run_cli(["--ums", "https://127.0.0.1:1", "--device", "27", "--ums-user", "admin", "--ums-insecure"],
                  env=env, viewer=False, timeout=30)
    assert run.code == 2 and "--ums-password-file" in run.events[-1]["message"]


# ------------------------------------------------------------- library API, in-process
class _LogCapture:
    def __init__(self) -> None:
        self.texts: list[str] = []

    def __call__(self, event: dict[str, Any]) -> None:
        text = formatEvent(event) + " " + repr(sorted(event.items(), key=lambda kv: kv[0]))
        failure = event.get("log_failure")
        if isinstance(failure, Failure):
            text += failure.getTraceback()
        self.texts.append(text)


def _session_outcome(secret: ShadowSecret, port: int, **options: Any) -> tuple[Deferred[Any], list[Any]]:
    from twisted.internet import reactor

    seen: list[events.Event] = []
    session = ShadowSession(reactor, secret, SessionOptions(
        device_host="127.0.0.1", device_port=port, connect_timeout=5, viewer_timeout=5, hello_timeout=2,
        **options), on_event=seen.append)
    return session.start(), seen


@pytest.mark.integration
@pytest_twisted.inlineCallbacks
def test_library_events_logs_exceptions_and_tracebacks_never_hold_the_password():
    import socket

    from twisted.internet import reactor, threads

    cert, key = certs.generate_self_signed()
    twin_cert, twin_key = certs.twin_of(cert)
    password = str(uuid.uuid4())
    secret = ShadowSecret(der_of(cert), OneTimePassword(password), "127.0.0.1", None)
    capture = _LogCapture()
    globalLogPublisher.addObserver(capture)
    texts: list[str] = []

    def reject(conn: DeviceConn) -> None:
        conn.recv_command()

    def garbage(conn: DeviceConn) -> None:
        conn.recv_command()
        conn.send(b"RFB 003.00x\n" + password.encode())
        conn.drain(3)

    def ok(conn: DeviceConn) -> None:
        conn.recv_command()
        conn.send(HELLO)
        try:
            conn.send(conn.recv(5))
        except PeerClosed:
            pass
        conn.shutdown_write()

    scenarios = [(cert, key, reject), (cert, key, garbage), (twin_cert, twin_key, reject), (cert, key, ok)]
    try:
        for c, k, script in scenarios:
            device = ScriptedDevice(c, k, script)
            done, seen = _session_outcome(secret, device.port)
            listening = [e for e in seen if isinstance(e, events.Listening)]
            for _ in range(100):
                if listening or done.called:
                    break
                yield threads.deferToThread(time.sleep, 0.05)
                listening = [e for e in seen if isinstance(e, events.Listening)]
            viewer = None
            if listening:
                viewer = socket.create_connection(("127.0.0.1", listening[0].port), timeout=5)
                viewer.sendall(b"RFB 003.008\n")
            outcome: list[Any] = []
            done.addBoth(outcome.append)
            for _ in range(200):
                if outcome:
                    break
                yield threads.deferToThread(time.sleep, 0.05)
            if viewer is not None:
                viewer.close()
            device.stop()
            assert outcome, "session did not end"
            result = outcome[0]
            if isinstance(result, Failure):
                assert isinstance(result.value, SecShadowError)
                texts += [str(result.value), repr(result.value), result.getTraceback(),
                          result.getTraceback(detail="verbose")]
            texts += [repr(e) for e in seen] + [str(e.as_dict()) for e in seen]
            texts += [repr(secret), str(secret), f"{secret.password}", repr(secret.password)]
        del reactor
    finally:
        globalLogPublisher.removeObserver(capture)
    everything = "\n".join(texts + capture.texts)
    assert "pin-mismatch" in everything or "pinned" in everything  # the capture saw something
    assert password not in everything


CORE_CHECK = """
import ctypes, json, resource, sys
libc = ctypes.CDLL(None, use_errno=True)
PR_GET_DUMPABLE = 3
before = (libc.prctl(PR_GET_DUMPABLE, 0, 0, 0, 0), resource.getrlimit(resource.RLIMIT_CORE))
from secshadow.hygiene import make_undumpable
ok = make_undumpable()
after = (libc.prctl(PR_GET_DUMPABLE, 0, 0, 0, 0), resource.getrlimit(resource.RLIMIT_CORE))
print(json.dumps({"ok": ok, "before": before, "after": after}))
"""


@pytest.mark.integration
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="prctl(PR_SET_DUMPABLE) is Linux only")
def test_make_undumpable_leaves_no_core_and_no_ptrace_by_the_same_user():
    """In a fresh process (dumpable, core limit unlimited): after ``make_undumpable()``
    ``prctl(PR_GET_DUMPABLE)`` is 0 and ``RLIMIT_CORE`` is (0, 0), so a crash while the
    proxy holds the passwords writes no core file, and the same user's debuggers cannot
    attach or read its memory."""
    import json
    import resource
    import subprocess

    def unlimited_core() -> None:
        resource.setrlimit(resource.RLIMIT_CORE, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))

    root = str(Path(__file__).resolve().parents[2])
    run = subprocess.run([sys.executable, "-c", CORE_CHECK], capture_output=True, text=True, timeout=60,
                         env=dict(os.environ, PYTHONPATH=root), preexec_fn=unlimited_core, check=False)
    assert run.returncode == 0, run.stderr
    report = json.loads(run.stdout)
    assert report["before"][0] == 1 and report["before"][1] != [0, 0]  # the check can see a change
    assert report == {"ok": True, "before": report["before"], "after": [0, [0, 0]]}


@pytest.mark.integration
def test_control_mode_raises_the_descriptor_limit_to_the_hard_one() -> None:
    import resource
    import subprocess
    import sys

    from secshadow.lab.harness import child_environment

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    low = min(256, hard)
    code = (
        "import resource, sys\n"
        f"resource.setrlimit(resource.RLIMIT_NOFILE, ({low}, {hard if hard != resource.RLIM_INFINITY else -1}))\n"
        "from secshadow.hygiene import raise_descriptor_limit\n"
        "print(*raise_descriptor_limit())\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60,
                         env=child_environment()).stdout.split()
    assert int(out[0]) == (hard if hard != resource.RLIM_INFINITY else 1 << 20) > low
