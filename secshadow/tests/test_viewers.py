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


@pytest.mark.integration
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


@pytest.mark.integration
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


@pytest.mark.integration
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


@pytest.mark.integration
@pytest_twisted.inlineCallbacks
def test_wait_gives_the_exit_status():
    viewer = launch(reactor, "three", ["sh", "-c", "exit 3"])
    status = yield _with_timeout(viewer.wait(), 5)
    assert status == 3
    assert signal_name(status) == "exit status 3"
    assert (yield viewer.wait()) == 3  # after the end, wait() answers at once
    ok = launch(reactor, "zero", ["true"])
    assert (yield _with_timeout(ok.wait(), 5)) == 0


@pytest.mark.integration
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


@pytest.mark.integration
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


@pytest.mark.integration
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


# ---------------------------------------------------------------- registry: every viewer, every platform

from fnmatch import fnmatchcase  # noqa: E402

from secshadow.viewers import (  # noqa: E402
    AUTO_ORDER,
    LINUX,
    MACOS,
    WINDOWS,
    System,
    find_executable,
    install_argv,
    locate,
    markdown_tables,
    platform_family,
)


def fake_system(platform: str, files: set[str], path: str = "", environ: dict[str, str] | None = None,
                links: dict[str, str] | None = None) -> System:
    """Another machine: its platform, PATH, environment and executable files."""
    return System(
        platform=platform, path=path, environ=environ or {},
        glob=lambda pattern: [f for f in files if fnmatchcase(f, pattern)],
        is_executable=lambda p: p in files,
        realpath=lambda p: (links or {}).get(p, p),
    )


LINUX_BIN = "/usr/bin"
WIN_PATH = r"C:\Windows\system32;C:\Windows"

# Where each viewer is installed on each platform (one typical path).
INSTALLED = {
    ("tigervnc", "linux"): "/usr/bin/xtigervncviewer",
    ("tigervnc", "win32"): r"C:\Program Files\TigerVNC\vncviewer.exe",
    ("tigervnc", "darwin"): "/Applications/TigerVNC Viewer 1.13.1.app/Contents/MacOS/TigerVNC Viewer",
    ("realvnc", "linux"): "/usr/bin/vncviewer-realvnc",
    ("realvnc", "win32"): r"C:\Program Files\RealVNC\VNC Viewer\vncviewer.exe",
    ("realvnc", "darwin"): "/Applications/VNC Viewer.app/Contents/MacOS/vncviewer",
    ("tightvnc", "linux"): "/usr/bin/xtightvncviewer",
    ("tightvnc", "win32"): r"C:\Program Files\TightVNC\tvnviewer.exe",
    ("ultravnc", "win32"): r"C:\Program Files\uvnc bvba\UltraVNC\vncviewer.exe",
    ("remote-viewer", "linux"): "/usr/bin/remote-viewer",
    ("remote-viewer", "win32"): r"C:\Program Files\VirtViewer v11.0-256\bin\remote-viewer.exe",
    ("remote-viewer", "darwin"): "/usr/bin/remote-viewer",
    ("remmina", "linux"): "/usr/bin/remmina",
    ("gvncviewer", "linux"): "/usr/bin/gvncviewer",
    ("vinagre", "linux"): "/usr/bin/vinagre",
    ("krdc", "linux"): "/usr/bin/krdc",
    ("screensharing", "darwin"): "/usr/bin/open",
}
EXTRA_FILES = {"/System/Library/CoreServices/Applications/Screen Sharing.app"}

H, P = "127.0.0.1", 45678
A = f"{H}::{P}"
U = f"vnc://{H}:{P}"
# (viewer, sys.platform, view_only, full_screen, exact argv after the executable)
EXACT_ARGV = [
    ("tigervnc", "linux", False, False, ["-ReconnectOnError=0", "-AlertOnFatalError=0", A]),
    ("tigervnc", "linux", True, True, ["-ReconnectOnError=0", "-AlertOnFatalError=0", "-ViewOnly", "-FullScreen", A]),
    ("tigervnc", "win32", True, False, ["-ReconnectOnError=0", "-AlertOnFatalError=0", "-ViewOnly", A]),
    ("tigervnc", "darwin", False, True, ["-ReconnectOnError=0", "-AlertOnFatalError=0", "-FullScreen", A]),
    ("realvnc", "linux", False, False, ["-WarnUnencrypted=0", A]),
    ("realvnc", "win32", True, True,
     ["-WarnUnencrypted=0", "-SendKeyEvents=0", "-SendPointerEvents=0", "-FullScreen=1", A]),
    ("realvnc", "darwin", True, False, ["-WarnUnencrypted=0", "-SendKeyEvents=0", "-SendPointerEvents=0", A]),
    ("tightvnc", "linux", True, True, ["-viewonly", "-fullscreen", A]),
    ("tightvnc", "linux", False, False, [A]),
    ("tightvnc", "win32", False, False, [f"-host={H}", f"-port={P}"]),
    ("tightvnc", "win32", True, True, [f"-host={H}", f"-port={P}", "-viewonly=yes", "-fullscreen=yes"]),
    ("ultravnc", "win32", False, False, [A]),
    ("ultravnc", "win32", True, True, ["-viewonly", "-fullscreen", A]),
    ("remote-viewer", "linux", False, False, ["--title", "T", U]),
    ("remote-viewer", "linux", False, True, ["--title", "T", "--full-screen", U]),
    ("remote-viewer", "win32", False, True, ["--title", "T", "--full-screen", U]),
    ("remote-viewer", "darwin", False, False, ["--title", "T", U]),
    ("remmina", "linux", False, False, ["-c", U]),
    ("remmina", "linux", False, True, ["--enable-fullscreen", "-c", U]),
    ("gvncviewer", "linux", False, False, [f"{H}:{P - 5900}"]),
    ("gvncviewer", "linux", False, True, [f"{H}:{P - 5900}"]),  # no full-screen flag: ignored
    ("vinagre", "linux", False, False, [A]),
    ("vinagre", "linux", False, True, ["--fullscreen", A]),
    ("krdc", "linux", False, False, [U]),
    ("krdc", "linux", False, True, ["--fullscreen", U]),
    ("screensharing", "darwin", False, False, ["-W", "-n", "-a", "Screen Sharing", U]),
]


def _machine(platform: str) -> System:
    family = platform_family(platform)
    files = {p for (_, plat), p in INSTALLED.items() if platform_family(plat) == family} | EXTRA_FILES
    path = {LINUX: LINUX_BIN, MACOS: "/usr/bin:/bin", WINDOWS: WIN_PATH}[family]
    return fake_system(platform, files, path=path)


@pytest.mark.parametrize("name, platform, view_only, full_screen, tail", EXACT_ARGV)
def test_exact_argv_for_every_viewer_and_platform(name, platform, view_only, full_screen, tail) -> None:
    argv = viewer_argv(VIEWERS[name], H, P, view_only=view_only, title="T", full_screen=full_screen,
                       system=_machine(platform))
    assert argv == [INSTALLED[(name, platform)], *tail]
    assert not any("::1" in a for a in argv)


def test_every_viewer_and_platform_has_an_exact_argv_test() -> None:
    covered = {(name, platform_family(plat)) for name, plat, *_ in EXACT_ARGV}
    registry = {(spec.name, install.platform) for spec in VIEWERS.values() for install in spec.installs}
    assert covered == registry
    assert set(AUTO_ORDER) == set(VIEWERS)


@pytest.mark.parametrize("name, platform", sorted(INSTALLED))
def test_each_viewer_is_detected_where_it_is_usually_installed(name: str, platform: str) -> None:
    system = _machine(platform)
    assert find_executable(VIEWERS[name], system=system) == INSTALLED[(name, platform)]
    assert resolve_viewer(name, system=system).name == name
    # ... and only there: on an empty machine of the same platform it is not installed.
    with pytest.raises(ViewerError, match="not installed"):
        resolve_viewer(name, system=fake_system(platform, set()))


@pytest.mark.parametrize("name, platform", [("ultravnc", "linux"), ("ultravnc", "darwin"), ("remmina", "win32"),
                                            ("screensharing", "linux"), ("screensharing", "win32"),
                                            ("tightvnc", "darwin"), ("gvncviewer", "win32")])
def test_a_viewer_on_a_platform_it_does_not_exist_on(name: str, platform: str) -> None:
    with pytest.raises(ViewerError, match="does not exist on"):
        resolve_viewer(name, system=_machine(platform))
    assert find_executable(VIEWERS[name], system=_machine(platform)) is None


def test_platform_family() -> None:
    assert [platform_family(p) for p in ("linux", "freebsd14", "win32", "cygwin", "darwin")] == [
        LINUX, LINUX, WINDOWS, WINDOWS, MACOS]


def test_macos_tigervnc_bundle_with_a_changing_name_newest_version_wins() -> None:
    old = "/Applications/TigerVNC Viewer 1.9.0.app/Contents/MacOS/TigerVNC Viewer"
    new = "/Applications/TigerVNC Viewer 1.13.1.app/Contents/MacOS/TigerVNC Viewer"
    system = fake_system("darwin", {old, new}, path="/usr/bin:/bin")
    assert find_executable(VIEWERS["tigervnc"], system=system) == new  # 13 > 9, not string order
    unversioned = "/Applications/TigerVNC Viewer.app/Contents/MacOS/TigerVNC Viewer"
    assert find_executable(VIEWERS["tigervnc"], system=fake_system("darwin", {unversioned})) == unversioned
    home = "/Users/ann/Applications/TigerVNC Viewer 1.15.0.app/Contents/MacOS/TigerVNC Viewer"
    system = fake_system("darwin", {home}, environ={"HOME": "/Users/ann"})
    assert find_executable(VIEWERS["tigervnc"], system=system) == home


def test_macos_tigervnc_on_the_path_comes_before_the_bundle() -> None:
    bundle = "/Applications/TigerVNC Viewer 1.13.1.app/Contents/MacOS/TigerVNC Viewer"
    system = fake_system("darwin", {bundle, "/opt/homebrew/bin/vncviewer"}, path="/opt/homebrew/bin:/usr/bin")
    assert find_executable(VIEWERS["tigervnc"], system=system) == "/opt/homebrew/bin/vncviewer"


def test_windows_program_files_comes_from_the_environment() -> None:
    exe = r"D:\Apps\TightVNC\tvnviewer.exe"
    system = fake_system("win32", {exe}, environ={"ProgramFiles": r"D:\Apps"})
    assert viewer_argv(VIEWERS["tightvnc"], H, P, system=system) == [exe, f"-host={H}", f"-port={P}"]
    x86 = r"C:\Program Files (x86)\uvnc bvba\UltraVNC\vncviewer.exe"
    assert find_executable(VIEWERS["ultravnc"], system=fake_system("win32", {x86})) == x86


def test_windows_path_search_uses_semicolons_and_backslashes() -> None:
    exe = r"C:\Tools\tvnviewer.exe"
    system = fake_system("win32", {exe}, path=r"C:\Windows;C:\Tools")
    assert find_executable(VIEWERS["tightvnc"], system=system) == exe


def test_windows_vncviewer_exe_on_the_path_is_ambiguous_and_not_guessed() -> None:
    # TigerVNC, UltraVNC and RealVNC all ship a vncviewer.exe: only install folders count.
    system = fake_system("win32", {r"C:\Tools\vncviewer.exe"}, path=r"C:\Tools")
    for name in ("tigervnc", "ultravnc", "realvnc"):
        assert find_executable(VIEWERS[name], system=system) is None


def test_screensharing_needs_the_app_as_well_as_open() -> None:
    assert find_executable(VIEWERS["screensharing"], system=fake_system("darwin", {"/usr/bin/open"})) is None
    sonoma = fake_system("darwin", {"/usr/bin/open", "/System/Applications/Utilities/Screen Sharing.app"})
    assert find_executable(VIEWERS["screensharing"], system=sonoma) == "/usr/bin/open"


def test_debian_vncviewer_alternative_pointing_at_tightvnc_is_not_tigervnc(tmp_path: Path) -> None:
    real = _fake_executable(tmp_path, "xtightvncviewer")
    (tmp_path / "vncviewer").symlink_to(real)
    assert find_executable(VIEWERS["tigervnc"], path=str(tmp_path)) is None
    assert find_executable(VIEWERS["tightvnc"], path=str(tmp_path)) == str(real)
    with pytest.raises(ViewerError):
        resolve_viewer("tigervnc", path=str(tmp_path))
    assert resolve_viewer("auto", path=str(tmp_path)).name == "tightvnc"


def test_debian_vncviewer_alternative_pointing_at_tigervnc_is_tigervnc(tmp_path: Path) -> None:
    real = _fake_executable(tmp_path, "xtigervncviewer")
    (tmp_path / "vncviewer").symlink_to(real)
    assert find_executable(VIEWERS["tigervnc"], path=str(tmp_path)) == str(real)  # the real name first


@pytest.mark.parametrize("platform, expected", [
    ("linux", "tigervnc"), ("win32", "tigervnc"), ("darwin", "tigervnc"),
])
def test_auto_takes_the_first_found_in_order(platform: str, expected: str) -> None:
    assert resolve_viewer("auto", system=_machine(platform)).name == expected


def test_auto_order_on_each_platform() -> None:
    only = {
        "win32": ({r"C:\Program Files\uvnc bvba\UltraVNC\vncviewer.exe",
                   r"C:\Program Files\TightVNC\tvnviewer.exe"}, "tightvnc"),
        "darwin": ({"/usr/bin/open", "/System/Applications/Utilities/Screen Sharing.app"}, "screensharing"),
        "linux": ({"/usr/bin/remmina", "/usr/bin/gvncviewer"}, "gvncviewer"),
    }
    for platform, (files, expected) in only.items():
        assert resolve_viewer("auto", system=fake_system(platform, files, path="/usr/bin")).name == expected


def test_auto_says_which_viewer_it_took() -> None:
    events: list[LogEvent] = []
    globalLogPublisher.addObserver(events.append)
    try:
        resolve_viewer("auto", system=_machine("darwin"))
    finally:
        globalLogPublisher.removeObserver(events.append)
    texts = [formatEvent(e) for e in events]
    assert any("--viewer auto: using tigervnc" in t and "TigerVNC Viewer 1.13.1.app" in t for t in texts), texts


@pytest.mark.parametrize("platform, hint", [("linux", "tigervnc-viewer"), ("win32", "UltraVNC"),
                                            ("darwin", "Screen Sharing")])
def test_auto_without_any_viewer_gives_a_platform_hint(platform: str, hint: str) -> None:
    with pytest.raises(ViewerError, match=hint):
        resolve_viewer("auto", system=fake_system(platform, set()))


def test_auto_with_view_only_prefers_a_viewer_with_a_view_only_mode() -> None:
    only_remote = fake_system("linux", {"/usr/bin/remote-viewer"}, path="/usr/bin")
    assert resolve_viewer("auto", system=only_remote).name == "remote-viewer"
    # The proxy enforces view-only, so a viewer without the mode is still usable.
    assert resolve_viewer("auto", system=only_remote, view_only=True).name == "remote-viewer"
    both = fake_system("linux", {"/usr/bin/remote-viewer", "/usr/bin/xtightvncviewer"}, path="/usr/bin")
    assert resolve_viewer("auto", system=both, view_only=True).name == "tightvnc"
    # Every viewer with a view-only mode comes before every viewer without one.
    able = [any(i.view_only for i in VIEWERS[n].installs) for n in AUTO_ORDER]
    assert able == sorted(able, reverse=True)


@pytest.mark.parametrize("name", ["remote-viewer", "remmina", "gvncviewer", "vinagre", "krdc"])
def test_view_only_on_a_viewer_without_it_starts_it_as_is_since_the_proxy_enforces_it(name: str) -> None:
    system = _machine("linux")
    assert viewer_argv(VIEWERS[name], H, P, view_only=True, system=system) == \
        viewer_argv(VIEWERS[name], H, P, view_only=False, system=system)
    assert resolve_viewer(name, system=system, view_only=True).name == name


def test_view_only_still_adds_the_viewers_own_flag_where_it_has_one() -> None:
    system = _machine("linux")
    assert "-ViewOnly" in viewer_argv(VIEWERS["tigervnc"], H, P, view_only=True, system=system)


def test_full_screen_without_a_flag_is_logged_and_ignored() -> None:
    events: list[LogEvent] = []
    globalLogPublisher.addObserver(events.append)
    try:
        argv = viewer_argv(VIEWERS["gvncviewer"], H, 5901, full_screen=True, system=_machine("linux"))
    finally:
        globalLogPublisher.removeObserver(events.append)
    assert argv == ["/usr/bin/gvncviewer", f"{H}:1"]
    assert any("no full-screen flag" in formatEvent(e) for e in events)


@pytest.mark.parametrize("host", ["::1", "fe80::1", ""])
def test_never_an_ipv6_address_in_a_viewer_argv(host: str) -> None:
    for name in ("tigervnc", "remote-viewer", "gvncviewer"):
        with pytest.raises(ViewerError):
            viewer_argv(VIEWERS[name], host, 6000, system=_machine("linux"))
    with pytest.raises(ViewerError):
        template_argv("v {host}::{port}", host, 6000)


def test_install_argv_and_the_legacy_build_signature() -> None:
    install = VIEWERS["tightvnc"].install_for("win32")
    assert install is not None
    assert install_argv(install, VIEWERS["tightvnc"], H, P, view_only=True) == [
        f"-host={H}", f"-port={P}", "-viewonly=yes"]
    assert VIEWERS["tigervnc"].build(H, P, True, "t")[-2:] == ["-ViewOnly", A]
    assert VIEWERS["tigervnc"].platforms == (LINUX, WINDOWS, MACOS)
    assert "xtigervncviewer" in VIEWERS["tigervnc"].executables


def test_locate_reports_the_install() -> None:
    found = locate(VIEWERS["tightvnc"], system=_machine("win32"))
    assert found is not None and found.install.platform == WINDOWS
    assert found.executable.endswith("tvnviewer.exe")


def test_markdown_tables_cover_every_viewer_and_platform() -> None:
    text = markdown_tables()
    for spec in VIEWERS.values():
        rows = [line for line in text.splitlines() if line.startswith(f"| `{spec.name}` |")]
        assert len(rows) == 2 * len(spec.installs)
    assert "::1" not in text
