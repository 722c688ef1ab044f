"""Every stop ends the session at every stage (issue 9, item 1), against real loopback
peers that hold the session there (``_stages.py``): the device's TCP connect (a full
accept queue), the TLS handshake (a device that never answers TLS), a reconnect after the
device dropped the idle link, the secret fetch (a UMS that never answers), the wait for
the hello, and the relay.

- the CLI (a real ``secshadow-proxy`` process) on SIGTERM and SIGINT: exits promptly with
  a ``closed`` event and 0 (CONTRACT.md also allows 130/143);
- control mode: ``close`` answers with ``closed`` at each stage and the daemon goes on
  serving (a ``list`` right after lists the others); ``shutdown`` and end of input end
  sessions at every stage at once;
- the API: ``Shadowing.stop`` fires ``done`` with a ``Closed``.

Each test prints the time from the stop to the end ("stop-time ...", the figures in
docs/security.md).
"""

from __future__ import annotations

import json
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import reactor, task

from secshadow import events
from secshadow.api import IMISource, StaticSecret, start_shadowing
from secshadow.lab.harness import ManagedProcess, python_module
from secshadow.options import SessionOptions
from secshadow.secret import secret_from_document
from secshadow.tests import _stages
from secshadow.tests._stages import DEVICE_ID, STAGES, UMS_PASSWORD, UMS_USER, Stage, wait_until
from secshadow.umstrust import UMSTrust

pytestmark = pytest.mark.integration

#: Long enough that only the stop can end a stage within a test.
_HOLD = ["--connect-timeout", "120", "--viewer-timeout", "120", "--hello-timeout", "120"]
#: A stop must end the session within this many seconds (measured: well under one).
STOP_LIMIT = 3.0


def _proxy(tmp_path: Path, name: str, argv: list[str], stdin: bytes | None) -> ManagedProcess:
    proxy = ManagedProcess(name, [*python_module("secshadow.cli"), *argv], tmp_path,
                           env=_stages.proxy_env(Stage.cli_env()), stdin=subprocess.PIPE)
    assert proxy.process.stdin is not None
    if stdin is not None:
        proxy.process.stdin.write(stdin)
        proxy.process.stdin.close()
    return proxy


def _wait_exit(proxy: ManagedProcess, started: float) -> tuple[int | None, float]:
    """The exit status and the seconds since ``started``; ``None`` if it did not exit
    within 10 s (it is then killed)."""
    try:
        code = proxy.process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proxy.process.kill()
        proxy.process.wait(10)
        return None, time.monotonic() - started
    return code, time.monotonic() - started


# ------------------------------------------------------------------------------ CLI
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
@pytest.mark.parametrize("name", STAGES)
def test_a_signal_ends_the_cli_at_every_stage(name: str, signum: signal.Signals, tmp_path: Path):
    with Stage(name) as stage:
        proxy = _proxy(tmp_path, f"cli-{name}", ["--json", "--viewer", "none", *_HOLD, *stage.cli_source_args()],
                       stage.cli_stdin())
        try:
            if stage.needs_viewer:
                port = proxy.wait_for("listening")["port"]
                wait_until(stage.viewer_may_come, 10, "the device dropped the idle link")
                stage.connect_viewer(port)
            wait_until(stage.reached, 15, f"stage {name}")
            assert proxy.process.poll() is None, proxy.log_tail()
            started = time.monotonic()
            proxy.process.send_signal(signum)
            code, took = _wait_exit(proxy, started)
        finally:
            proxy.stop()
        print(f"\nstop-time cli {signum.name} {name}: {took:.3f} s")
        assert code is not None, f"still running 10 s after {signum.name} at stage {name}:\n{proxy.log_tail()}"
        assert code in (0, 128 + signum), proxy.log_tail()
        assert took < STOP_LIMIT
        last = proxy.events[-1]
        assert last["event"] == "closed" and signum.name in last["reason"], proxy.events
        assert "pinned" not in [e["event"] for e in proxy.events] or name not in ("connect", "tls", "fetch")
        wait_until(stage.peers_released, 5, "the proxy closed its connection to the peer")


# ------------------------------------------------------------------------------ control mode
def _open_request(stage: Stage) -> dict[str, Any]:
    request: dict[str, Any] = {"op": "open", "session": stage.name, "viewer": "none", "connect_timeout": 120,
                               "viewer_timeout": 120, "hello_timeout": 120}
    if stage.secret is None:
        request["device"] = DEVICE_ID
    else:
        request["secret"] = stage.secret
    return request


def _send(proxy: ManagedProcess, request: dict[str, Any]) -> None:
    assert proxy.process.stdin is not None
    proxy.process.stdin.write(json.dumps(request).encode() + b"\n")
    proxy.process.stdin.flush()


def _events(proxy: ManagedProcess, kind: str, session: str | None = None) -> list[dict[str, Any]]:
    return [e for e in proxy.events if e.get("event") == kind and (session is None or e.get("session") == session)]


def _control_with_every_stage(tmp_path: Path, name: str, stages: dict[str, Stage]) -> ManagedProcess:
    """A control-mode proxy (UMS flags for the ``fetch`` stage) with one session held at
    each stage."""
    ums = stages["fetch"]
    proxy = _proxy(tmp_path, name, ["--control", "stdio", "--ums", ums.ums_url, "--ums-user", UMS_USER,
                                    "--ums-fingerprint", ums.ums_fingerprint()], None)
    for stage in stages.values():
        _send(proxy, _open_request(stage))
    for stage in stages.values():
        if stage.needs_viewer:
            wait_until(lambda s=stage.name: bool(_events(proxy, "listening", s)), 15, f"{stage.name} listening")
            wait_until(stage.viewer_may_come, 10, "the device dropped the idle link")
            stage.connect_viewer(_events(proxy, "listening", stage.name)[0]["port"])
    for stage in stages.values():
        wait_until(stage.reached, 15, f"stage {stage.name}")
    assert not _events(proxy, "error"), proxy.events
    return proxy


def test_control_close_ends_a_session_at_every_stage_and_the_daemon_goes_on(tmp_path: Path):
    stages = {name: Stage(name) for name in STAGES}
    try:
        proxy = _control_with_every_stage(tmp_path, "control-close", stages)
        try:
            remaining = set(STAGES)
            for name in STAGES:
                started = time.monotonic()
                _send(proxy, {"op": "close", "session": name})
                wait_until(lambda n=name: bool(_events(proxy, "closed", n)), 10, f"a closed event for {name}")
                took = time.monotonic() - started
                remaining.discard(name)
                listed = len(_events(proxy, "sessions"))
                _send(proxy, {"op": "list"})
                wait_until(lambda n=listed: len(_events(proxy, "sessions")) > n, 5, f"a list answer after closing {name}")
                listing = _events(proxy, "sessions")[-1]["sessions"]
                print(f"\nstop-time control close {name}: {took:.3f} s")
                assert _events(proxy, "closed", name)[0]["reason"] == "closed by the console"
                assert took < STOP_LIMIT
                assert {s["session"] for s in listing} == remaining
                wait_until(stages[name].peers_released, 5, f"{name}: the proxy closed its connection to the peer")
            assert not _events(proxy, "error"), proxy.events
            _send(proxy, {"op": "shutdown"})
            assert proxy.process.wait(timeout=10) == 0
        finally:
            proxy.stop()
    finally:
        for stage in stages.values():
            stage.stop()


@pytest.mark.parametrize("how", ["shutdown", "end of input"])
def test_control_shutdown_ends_sessions_at_every_stage(how: str, tmp_path: Path):
    stages = {name: Stage(name) for name in STAGES}
    try:
        proxy = _control_with_every_stage(tmp_path, "control-" + how.replace(" ", "-"), stages)
        try:
            assert proxy.process.stdin is not None
            started = time.monotonic()
            if how == "shutdown":
                _send(proxy, {"op": "shutdown"})
            else:
                proxy.process.stdin.close()
            code, took = _wait_exit(proxy, started)
        finally:
            proxy.stop()
        print(f"\nstop-time control {how} (six sessions, one per stage): {took:.3f} s")
        assert code == 0, proxy.log_tail()
        assert took < STOP_LIMIT
        assert {e["session"] for e in _events(proxy, "closed")} == set(STAGES)
        assert not _events(proxy, "error"), proxy.events
        for stage in stages.values():
            wait_until(stage.peers_released, 5, f"{stage.name}: the proxy closed its connection to the peer")
    finally:
        for stage in stages.values():
            stage.stop()


# ------------------------------------------------------------------------------ API
def _until(predicate: Any, timeout: float, what: str) -> Any:
    """Poll ``predicate`` in the running reactor (the peers run in threads)."""
    deadline = time.monotonic() + timeout

    async def poll() -> None:
        while not predicate():
            if time.monotonic() > deadline:
                raise AssertionError(f"not reached within {timeout:g} s: {what}")
            await task.deferLater(reactor, 0.02, lambda: None)

    from twisted.internet.defer import ensureDeferred
    return ensureDeferred(poll())


@pytest.mark.parametrize("name", STAGES)
@pytest_twisted.inlineCallbacks
def test_api_stop_fires_done_at_every_stage(name: str):
    stage = Stage(name)
    try:
        seen: list[events.Event] = []
        if stage.secret is None:
            source: Any = IMISource(reactor, stage.ums_url, DEVICE_ID, UMS_USER, UMS_PASSWORD,
                                    UMSTrust.from_fingerprint(stage.ums_fingerprint()))
        else:
            source = StaticSecret(secret_from_document(stage.secret))
        shadowing = start_shadowing(reactor, source, SessionOptions(
            connect_timeout=120, viewer_timeout=120, hello_timeout=120), on_event=seen.append)
        outcome: list[Any] = []
        shadowing.done.addBoth(outcome.append)
        if stage.needs_viewer:
            yield _until(lambda: any(isinstance(e, events.Listening) for e in seen) and stage.viewer_may_come(),
                         15, "listening")
            stage.connect_viewer(next(e.port for e in seen if isinstance(e, events.Listening)))
        yield _until(stage.reached, 15, f"stage {name}")
        assert outcome == []
        started = time.monotonic()
        shadowing.stop("stopped by the embedding program")
        yield _until(lambda: bool(outcome), 10, f"done after stop at stage {name}")
        took = time.monotonic() - started
        print(f"\nstop-time api {name}: {took:.3f} s")
        closed = outcome[0]
        assert isinstance(closed, events.Closed), closed
        assert closed.reason == "stopped by the embedding program"
        assert seen[-1] == closed
        assert took < STOP_LIMIT
        yield _until(stage.peers_released, 5, "the proxy closed its connection to the peer")
    finally:
        stage.stop()
