"""``--viewer browser``: the URL never reaches a command line; a 0600 redirect file does.
Unit tests with a recording spawnProcess and task.Clock, and one run of a real opener
($BROWSER = a script) that reads the file it was given."""

from __future__ import annotations

import os
import stat
import sys
from pathlib import Path
from typing import Any

import pytest
from twisted.internet.error import ProcessDone, ProcessTerminated
from twisted.internet.task import Clock
from twisted.python.failure import Failure

from secshadow.errors import ViewerError
from secshadow.web.browser import FILE_LIFETIME, open_browser, opener_argv, redirect_page

URL = "http://127.0.0.1:41234/view#token=AAAAAAAAAAAAAAAAAAAAAA"


class _ProcessTransport:
    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.signals: list[str] = []

    def closeStdin(self) -> None:
        pass

    def loseConnection(self) -> None:
        pass

    def signalProcess(self, name: str) -> None:
        self.signals.append(name)


class _Reactor(Clock):
    def __init__(self) -> None:
        super().__init__()
        self.spawned: list[tuple[Any, list[str], dict[str, str] | None]] = []

    def spawnProcess(self, protocol: Any, executable: str, args: list[str], env: Any = None, **kw: Any) -> Any:
        transport = _ProcessTransport(4242)
        self.spawned.append((protocol, list(args), env))
        protocol.makeConnection(transport)
        return transport


@pytest.fixture
def opener(tmp_path: Path) -> dict[str, str]:
    script = tmp_path / "opener"
    script.write_text("#!/bin/sh\nexit 0\n")
    script.chmod(0o755)
    return {"BROWSER": str(script), "PATH": os.environ.get("PATH", "")}


def test_the_url_goes_into_a_private_file_and_only_its_path_onto_argv(opener):
    reactor = _Reactor()
    handle = open_browser(reactor, URL, environ=opener)
    try:
        (protocol, argv, env), = reactor.spawned
        assert not any("token" in a or "41234" in a for a in argv)
        path = Path(argv[-1])
        assert path == handle.path
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
        assert URL in path.read_text()
        assert handle.name == "browser" and handle.pid == 4242
    finally:
        handle.terminate()
    assert not handle.path.exists()
    # The opener was still running: it got SIGTERM; once reaped, no timer is left.
    assert reactor.spawned[0][0].transport.signals == ["TERM"]
    reactor.spawned[0][0].processEnded(Failure(ProcessTerminated(signal=15)))
    assert reactor.getDelayedCalls() == []


def test_a_successful_opener_does_not_end_the_viewer_but_terminate_does(opener):
    reactor = _Reactor()
    handle = open_browser(reactor, URL, environ=opener)
    seen: list[Any] = []
    handle.wait().addCallback(seen.append)
    protocol = reactor.spawned[0][0]
    protocol.processEnded(Failure(ProcessDone(0)))
    assert seen == [] and handle.path.exists()  # xdg-open returned; the tab lives on
    done: list[Any] = []
    handle.terminate().addCallback(done.append)
    assert seen == [None] and done == [None]
    assert not handle.path.exists()
    assert reactor.getDelayedCalls() == []


def test_a_failing_opener_ends_the_viewer_with_its_status(opener):
    reactor = _Reactor()
    handle = open_browser(reactor, URL, environ=opener)
    seen: list[Any] = []
    handle.wait().addCallback(seen.append)
    reactor.spawned[0][0].processEnded(Failure(ProcessTerminated(exitCode=3)))
    assert seen == [3]
    assert not handle.path.exists()
    assert reactor.getDelayedCalls() == []


def test_the_file_is_removed_after_its_lifetime(opener):
    reactor = _Reactor()
    handle = open_browser(reactor, URL, environ=opener)
    reactor.spawned[0][0].processEnded(Failure(ProcessDone(0)))
    reactor.advance(FILE_LIFETIME)
    assert not handle.path.exists()
    handle.terminate()
    assert reactor.getDelayedCalls() == []


def test_openers_per_platform_and_a_missing_xdg_open(tmp_path):
    path = tmp_path / "open.html"
    assert opener_argv(path, {}, "darwin") == ["open", str(path)]
    assert opener_argv(path, {}, "win32")[-1] == str(path)
    assert opener_argv(path, {"BROWSER": "firefox --new-tab"}, "linux") == ["firefox", "--new-tab", str(path)]
    with pytest.raises(ViewerError, match="xdg-open"):
        opener_argv(path, {"PATH": str(tmp_path)}, "linux")


def test_the_redirect_page_escapes_the_url():
    page = redirect_page('http://x/"><script>alert(1)</script>')
    assert "<script>alert(1)" not in page
    assert 'content="0;url=http://x/&quot;&gt;' in page


@pytest.mark.integration
def test_a_real_opener_gets_a_file_that_leads_to_the_url(tmp_path):
    record = tmp_path / "seen"
    script = tmp_path / "opener"
    script.write_text(f"#!/bin/sh\ncat \"$1\" > {record}\nstat -c %a \"$1\" >> {record}\n")
    script.chmod(0o755)
    from twisted.internet import reactor as real_reactor

    environ = {"BROWSER": str(script), "PATH": os.environ.get("PATH", "")}
    handle = open_browser(real_reactor, URL, environ=environ)
    import subprocess

    # Run the reactor just long enough for the opener to finish.
    subprocess.run([sys.executable, "-c", "import time; time.sleep(0.5)"], check=True)
    for _ in range(50):
        real_reactor.iterate(0.05)  # type: ignore[attr-defined]
        if record.exists() and record.read_text().strip().endswith("600"):
            break
    text = record.read_text()
    assert URL in text and text.strip().endswith("600")
    handle.terminate()
    for _ in range(20):
        real_reactor.iterate(0.05)  # type: ignore[attr-defined]
    assert not handle.path.exists()
