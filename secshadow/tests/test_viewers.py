"""secshadow.viewers: viewer argv, templates, environment, and real process lifecycle."""

from __future__ import annotations

import os
import stat
import time
from pathlib import Path

import pytest
import pytest_twisted
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet import defer, reactor, task
from twisted.logger import LogEvent, formatEvent, globalLogPublisher

from secshadow.errors import UsageError, ViewerError
from secshadow.viewers import (
    VIEWERS,
    ViewerProcess,
    launch,
    resolve_viewer,
    signal_name,
    template_argv,
    validate_template,
    viewer_argv,
    viewer_environment,
)

PORT = 40123


def _fake_executable(directory: Path, name: str) -> Path:
    path = directory / name
    path.write_text("#!/bin/sh\nexit 0\n")
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return path


@pytest.fixture
def viewer_dir(tmp_path: Path) -> Path:
    directory = tmp_path / "bin"
    directory.mkdir()
    _fake_executable(directory, "vncviewer")
    return directory


@pytest.fixture
def empty_dir(tmp_path: Path) -> Path:
    directory = tmp_path / "empty"
    directory.mkdir()
    return directory


# ---------------------------------------------------------------- argv


def test_tigervnc_argv(viewer_dir: Path) -> None:
    argv = viewer_argv(VIEWERS["tigervnc"], "127.0.0.1", PORT, path=str(viewer_dir))
    assert argv == [
        str(viewer_dir / "vncviewer"),
        "-ReconnectOnError=0",
        "-AlertOnFatalError=0",
        f"127.0.0.1::{PORT}",
    ]


def test_tigervnc_argv_view_only(viewer_dir: Path) -> None:
    argv = viewer_argv(VIEWERS["tigervnc"], "127.0.0.1", PORT, view_only=True, path=str(viewer_dir))
    assert argv[0] == str(viewer_dir / "vncviewer")
    assert argv[-1] == f"127.0.0.1::{PORT}"  # double colon: a TCP port, not a display number
    assert sorted(argv[1:-1]) == ["-AlertOnFatalError=0", "-ReconnectOnError=0", "-ViewOnly"]


def test_tigervnc_alternative_executable_name(empty_dir: Path) -> None:
    _fake_executable(empty_dir, "xtigervncviewer")
    argv = viewer_argv(VIEWERS["tigervnc"], "127.0.0.1", PORT, path=str(empty_dir))
    assert argv[0] == str(empty_dir / "xtigervncviewer")


def test_non_executable_file_is_not_a_viewer(empty_dir: Path) -> None:
    (empty_dir / "vncviewer").write_text("not executable")
    with pytest.raises(ViewerError):
        resolve_viewer("tigervnc", path=str(empty_dir))


def test_resolve_viewer(viewer_dir: Path, empty_dir: Path) -> None:
    assert resolve_viewer("tigervnc", path=str(viewer_dir)).name == "tigervnc"
    assert resolve_viewer("auto", path=str(viewer_dir)).name == "tigervnc"
    with pytest.raises(ViewerError) as info:
        resolve_viewer("tigervnc", path=str(empty_dir))
    assert "vncviewer" in str(info.value)


def test_auto_without_any_viewer_says_what_to_install(empty_dir: Path) -> None:
    with pytest.raises(ViewerError) as info:
        resolve_viewer("auto", path=str(empty_dir))
    assert "tigervnc-viewer" in str(info.value)
    assert info.value.exit_code == 8


def test_viewer_argv_without_the_executable(empty_dir: Path) -> None:
    with pytest.raises(ViewerError):
        viewer_argv(VIEWERS["tigervnc"], "127.0.0.1", PORT, path=str(empty_dir))


@pytest.mark.parametrize("name", ["no-such-viewer", "TigerVNC", "", "vncviewer"])
def test_unknown_viewer_name_is_a_usage_error(name: str, viewer_dir: Path) -> None:
    with pytest.raises(UsageError) as info:
        resolve_viewer(name, path=str(viewer_dir))
    assert not isinstance(info.value, ViewerError)
    assert "tigervnc" in str(info.value)


# The argv of every known viewer, exactly (docs/protocol.md section 4: host::PORT for
# the vncviewer family, vnc://host:PORT for URI viewers, a display offset for gvncviewer).
ARGV_TABLE = [
    ("tigervnc", "vncviewer", False, ["-ReconnectOnError=0", "-AlertOnFatalError=0", "127.0.0.1::6000"]),
    ("realvnc", "vncviewer-realvnc", True,
     ["-WarnUnencrypted=0", "-SendKeyEvents=0", "-SendPointerEvents=0", "127.0.0.1::6000"]),
    ("tightvnc", "xtightvncviewer", True, ["-viewonly", "127.0.0.1::6000"]),
    ("vinagre", "vinagre", False, ["127.0.0.1::6000"]),
    ("remote-viewer", "remote-viewer", False, ["--title", "secshadow", "vnc://127.0.0.1:6000"]),
    ("remmina", "remmina", False, ["-c", "vnc://127.0.0.1:6000"]),
    ("krdc", "krdc", False, ["vnc://127.0.0.1:6000"]),
    ("gvncviewer", "gvncviewer", False, ["127.0.0.1:100"]),
]


@pytest.mark.parametrize("name, executable, view_only, tail", ARGV_TABLE)
def test_every_known_viewer_gets_its_exact_argv(name, executable, view_only, tail, empty_dir: Path) -> None:
    _fake_executable(empty_dir, executable)
    argv = viewer_argv(VIEWERS[name], "127.0.0.1", 6000, view_only=view_only, path=str(empty_dir))
    assert argv == [str(empty_dir / executable), *tail]
    assert not any("::1" in a for a in argv)


def test_gvncviewer_cannot_express_a_port_below_5900(empty_dir: Path) -> None:
    _fake_executable(empty_dir, "gvncviewer")
    with pytest.raises(ViewerError, match="below 5900"):
        viewer_argv(VIEWERS["gvncviewer"], "127.0.0.1", 5000, path=str(empty_dir))


def test_platform_bound_viewers_are_not_found_elsewhere(empty_dir: Path) -> None:
    _fake_executable(empty_dir, "open")  # on Linux, 'open' is not macOS Screen Sharing
    with pytest.raises(ViewerError):
        resolve_viewer("screensharing", path=str(empty_dir))


# ---------------------------------------------------------------- templates


@pytest.mark.parametrize(
    "template",
    [
        "viewer '{host}::{port}",  # unbalanced single quote
        'viewer "{host}::{port}',  # unbalanced double quote
        "viewer {host}::{port} {user}",  # unknown placeholder
        "viewer {host}::{port!r}",  # conversion
        "viewer {host}::{port:>6}",  # format spec
        "viewer {host}::{port.real}",
        "viewer {host}::{port[0]}",
        "viewer {}",
        "viewer {0}",
        "viewer {host}::{port",  # unclosed brace
        "viewer {host}::{port} }",  # lone closing brace
        "viewer {host}",  # neither {port} nor {display}
        "viewer {{port}}",  # escaped braces are no placeholder
        "",
        "   ",
    ],
)
def test_invalid_templates_are_usage_errors(template: str) -> None:
    with pytest.raises(UsageError):
        validate_template(template)
    with pytest.raises(UsageError):
        template_argv(template, "127.0.0.1", PORT)


def test_template_tokens_are_formatted_separately_and_never_shell_parsed() -> None:
    template = "remote-viewer --title {title} --title-again '{title}' vnc://{host}:{port}"
    title = "Curry (id 27); rm -rf ~ && $(reboot) `x` | tee > /tmp/out * {port}"
    argv = template_argv(template, "127.0.0.1", PORT, title=title)
    assert argv == [
        "remote-viewer",
        "--title",
        title,
        "--title-again",
        title,
        f"vnc://127.0.0.1:{PORT}",
    ]


def test_template_display_and_literal_quoting() -> None:
    argv = template_argv('gvncviewer "{host}:{display}" --name "a b"', "127.0.0.1", 5901)
    assert argv == ["gvncviewer", "127.0.0.1:1", "--name", "a b"]


def test_validate_template_returns_the_tokens() -> None:
    assert validate_template("vncviewer -Shared {host}::{port}") == ["vncviewer", "-Shared", "{host}::{port}"]


@settings(max_examples=200, deadline=None)
@given(st.text(min_size=0, max_size=40))
def test_any_title_is_exactly_one_argv_element(title: str) -> None:
    argv = template_argv("v --title {title} {host}::{port}", "127.0.0.1", PORT, title=title)
    assert argv == ["v", "--title", title, f"127.0.0.1::{PORT}"]


@settings(max_examples=300, deadline=None)
@given(st.lists(st.sampled_from([*"ab {}:'\"\\!rs0.[]-", "port", "host", "display", "title"]), max_size=20)
       .map("".join) | st.text(max_size=30))
def test_validate_template_only_raises_usage_error(template: str) -> None:
    try:
        tokens = validate_template(template)
    except UsageError:
        return
    assert tokens
    argv = template_argv(template, "127.0.0.1", PORT)
    assert len(argv) == len(tokens)


# ---------------------------------------------------------------- environment


def test_viewer_environment_drops_the_ums_password() -> None:
    env = viewer_environment({"SECSHADOW_UMS_PASSWORD": "hunter2", "DISPLAY": ":1", "HOME": "/home/u"})
    assert env == {"DISPLAY": ":1", "HOME": "/home/u"}


def test_viewer_environment_defaults_to_ours_minus_secrets(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SECSHADOW_UMS_PASSWORD", "hunter2")
    monkeypatch.setenv("SECSHADOW_TEST_MARKER", "kept")
    env = viewer_environment()
    assert "SECSHADOW_UMS_PASSWORD" not in env
    assert env["SECSHADOW_TEST_MARKER"] == "kept"
    assert os.environ["SECSHADOW_UMS_PASSWORD"] == "hunter2"  # ours is untouched


def test_signal_name() -> None:
    assert signal_name(None) == "killed by a signal"
    assert signal_name(0) == "exit status 0"
    assert signal_name(3) == "exit status 3"
    assert signal_name(-9) == "killed by SIGKILL"


# ---------------------------------------------------------------- real processes


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def _children(pid: int) -> list[int]:
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except OSError:
        return []
    return [int(p) for p in text.split()]


def _sleep(seconds: float) -> defer.Deferred[None]:
    return task.deferLater(reactor, seconds, lambda: None)


def _with_timeout(d: defer.Deferred, seconds: float) -> defer.Deferred:
    return d.addTimeout(seconds, reactor)


@pytest_twisted.inlineCallbacks
def test_terminate_stops_and_reaps_a_real_process():
    viewer = launch(reactor, "sleeper", ["sleep", "30"])
    assert isinstance(viewer, ViewerProcess)
    assert viewer.pid is not None and not _gone(viewer.pid)
    started = time.monotonic()
    yield _with_timeout(viewer.terminate(grace=5), 4)
    assert time.monotonic() - started < 2  # SIGTERM sufficed; no waiting for the grace
    assert viewer.ended
    assert _gone(viewer.pid)  # reaped, not a zombie
    assert viewer.exit_status is None  # killed by a signal
    status = yield viewer.wait()
    assert status is None
    # Terminating again is harmless and immediate.
    yield _with_timeout(viewer.terminate(), 1)
    assert not [c for c in reactor.getDelayedCalls() if c.active() and c.func == viewer._signal]


@pytest_twisted.inlineCallbacks
def test_a_viewer_ignoring_sigterm_is_killed_after_the_grace():
    # exec: the shell becomes the TERM-ignoring sleep (ignored signals survive exec).
    viewer = launch(reactor, "stubborn", ["sh", "-c", 'trap "" TERM; exec sleep 30'])
    yield _sleep(0.2)  # let the trap be installed
    started = time.monotonic()
    yield _with_timeout(viewer.terminate(grace=0.5), 4)
    elapsed = time.monotonic() - started
    assert 0.4 <= elapsed < 2.5
    assert _gone(viewer.pid)
    assert viewer.exit_status is None


@pytest_twisted.inlineCallbacks
def test_terminate_of_a_sigterm_ignoring_shell_with_a_child_finishes_after_the_grace():
    """The brief's case verbatim: ``sh -c 'trap "" TERM; sleep 30'``.

    dash forks ``sleep`` (which inherits the ignored TERM and the stdout/stderr pipes).
    SIGKILL after the grace kills the shell, but the terminate() Deferred must fire
    then: a session shutdown waits on it (proxy.py), so the CLI would hang for as long
    as the viewer's children hold its output pipes.
    """
    viewer = launch(reactor, "stubborn-shell", ["sh", "-c", 'trap "" TERM; sleep 30'])
    grandchildren: list[int] = []
    for _ in range(40):
        yield _sleep(0.05)
        grandchildren = _children(viewer.pid)
        if grandchildren:
            break
    try:
        started = time.monotonic()
        try:
            yield _with_timeout(viewer.terminate(grace=0.5), 3)
        except defer.TimeoutError:
            pytest.fail(
                "terminate() did not fire within 3 s although the viewer process was SIGKILLed "
                f"after 0.5 s (shell gone: {_gone(viewer.pid)}; its child sleep {grandchildren} "
                "still holds the stdout/stderr pipes)"
            )
        assert time.monotonic() - started < 2.5
        assert _gone(viewer.pid)
    finally:
        for pid in grandchildren:
            try:
                os.kill(pid, 9)
            except ProcessLookupError:
                pass
        if not viewer.ended:
            yield _with_timeout(viewer.wait(), 5)


@pytest_twisted.inlineCallbacks
def test_wait_gives_the_exit_status():
    viewer = launch(reactor, "three", ["sh", "-c", "exit 3"])
    status = yield _with_timeout(viewer.wait(), 5)
    assert status == 3
    assert signal_name(status) == "exit status 3"
    assert (yield viewer.wait()) == 3  # after the end, wait() answers at once
    ok = launch(reactor, "zero", ["true"])
    assert (yield _with_timeout(ok.wait(), 5)) == 0


@pytest_twisted.inlineCallbacks
def test_several_waiters_all_fire():
    viewer = launch(reactor, "short", ["sh", "-c", "sleep 0.1; exit 5"])
    results = yield _with_timeout(defer.gatherResults([viewer.wait(), viewer.wait()]), 5)
    assert results == [5, 5]


def test_launch_of_a_missing_executable_is_a_viewer_error(tmp_path: Path) -> None:
    with pytest.raises(ViewerError, match="not found"):
        launch(reactor, "missing", ["secshadow-no-such-viewer-xyz", "127.0.0.1::5900"])
    with pytest.raises(ViewerError):
        launch(reactor, "missing", [str(tmp_path / "no-such-viewer"), "127.0.0.1::5900"])


@pytest_twisted.inlineCallbacks
def test_viewer_environment_reaches_the_process_without_the_ums_password(tmp_path: Path):
    out = tmp_path / "env.txt"
    viewer = launch(
        reactor,
        "env",
        ["sh", "-c", f"env > {out}"],
        env={"SECSHADOW_UMS_PASSWORD": "hunter2", "PATH": os.environ.get("PATH", "/usr/bin:/bin"), "MARK": "1"},
    )
    assert (yield _with_timeout(viewer.wait(), 5)) == 0
    text = out.read_text()
    assert "MARK=1" in text
    assert "hunter2" not in text and "SECSHADOW_UMS_PASSWORD" not in text


@pytest_twisted.inlineCallbacks
def test_viewer_output_goes_to_the_log_not_to_stdout(capfd: pytest.CaptureFixture[str]):
    events: list[LogEvent] = []
    globalLogPublisher.addObserver(events.append)
    try:
        viewer = launch(reactor, "chatty", ["sh", "-c", "echo out-line-1; echo err-line-2 >&2; echo; exit 0"])
        assert (yield _with_timeout(viewer.wait(), 5)) == 0
    finally:
        globalLogPublisher.removeObserver(events.append)
    texts = [formatEvent(e) for e in events]
    assert any("out-line-1" in t and "chatty" in t for t in texts), texts
    assert any("err-line-2" in t and "chatty" in t for t in texts), texts
    assert any(f"pid {viewer.pid}" in t for t in texts)
    captured = capfd.readouterr()
    assert "out-line-1" not in captured.out and "err-line-2" not in captured.out
    assert "out-line-1" not in captured.err and "err-line-2" not in captured.err
