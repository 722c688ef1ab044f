"""Shared test helpers.

Integration tests need real programs (Xvnc, vncviewer, openssl, ...). Locally a
missing program skips the test; in CI (``CI=true``) it fails it, so CI can never
pass by skipping the tests that matter.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import settings

# No per-example deadline: a loaded CI machine (2 cores) must not turn a slow example
# into a failure; the examples' count bounds the time instead.
settings.register_profile("secshadow", deadline=None)
settings.load_profile("secshadow")


def in_ci() -> bool:
    return os.environ.get("CI", "").lower() in ("1", "true", "yes")


def require_program(name: str) -> str:
    """Return the program's path; skip locally or fail in CI when it is not installed."""
    path = shutil.which(name)
    if path is None:
        message = f"{name} is not installed (bin/setup-debian installs it)"
        if in_ci():
            pytest.fail(message)
        pytest.skip(message)
    return path


@pytest.fixture(scope="session")
def lab() -> Iterator[object]:
    """One lab for the whole run: a real Xvnc behind the device emulator, and the IMI
    server (``secshadow.lab``). Tests take fresh one-time passwords from it; those that
    need another device start their own with ``lab.start_device(...)``."""
    for program in ("Xvnc", "xsetroot", "openssl"):
        require_program(program)
    from secshadow.lab.harness import start_lab

    with start_lab() as running:
        yield running


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[object]:
    """A real ``secshadow-gateway`` process (TLS, default flags) for one test module
    (``secshadow.lab.harness.GatewayProcess``); a module that needs other flags defines
    its own ``gateway``."""
    from secshadow.lab.harness import start_gateway

    running = start_gateway(tmp_path_factory.mktemp("gateway"))
    try:
        yield running
    finally:
        running.stop()


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[Any]:
    """A real headless Chromium through selenium and Debian's chromedriver (PROTOCOL.md
    section 5, ``_web_helpers.chromium``), quit at the end of the test."""
    require_program("chromium")
    require_program("chromedriver")
    from secshadow.tests._web_helpers import chromium

    driver = chromium(tmp_path / "chromium-profile")
    try:
        yield driver
    finally:
        driver.quit()


@pytest.fixture(autouse=True)
def unit_tests_use_no_real_socket_or_process(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    """A test not marked ``integration`` must not bind or connect a real socket, nor
    start a process: the fast half stays fast and deterministic (DESIGN.md: fakes
    below, real programs above). ``socketpair`` (Twisted's waker, in-memory pairs)
    stays allowed."""
    if request.node.get_closest_marker("integration") is not None:
        return
    import socket
    import subprocess

    from twisted.internet import process

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("a unit test used a real socket or started a process: "
                             "mark it @pytest.mark.integration")

    for name in ("bind", "connect", "connect_ex"):
        monkeypatch.setattr(socket.socket, name, refuse)
    monkeypatch.setattr(subprocess.Popen, "__init__", refuse)
    monkeypatch.setattr(process.Process, "__init__", refuse)


_collectors: list[list[str]] = []


def _collect_unhandled(event: dict[str, object]) -> None:
    # Twisted logs the message, then (in a second event) the failure itself; the
    # innermost collector gets them.
    if _collectors and event.get("log_namespace") == "twisted.internet.defer" and (
            "Unhandled error" in str(event.get("log_format", "")) or event.get("log_failure") is not None):
        _collectors[-1].append(str(event.get("log_failure") or event.get("log_format")))


@contextlib.contextmanager
def unhandled_deferred_errors() -> Iterator[list[str]]:
    """Collects the unhandled errors in Deferreds that Twisted logs while the block runs
    (it logs them when a failed Deferred is garbage-collected; a collection runs at the end)."""
    import gc

    from twisted.logger import globalLogPublisher

    seen: list[str] = []
    if not _collectors:
        globalLogPublisher.addObserver(_collect_unhandled)
    _collectors.append(seen)
    try:
        yield seen
        # The young generations hold what the test made; a full collection per test
        # would cost 40 s over the unit half.
        gc.collect(1)
    finally:
        _collectors.remove(seen)
        if not _collectors:
            globalLogPublisher.removeObserver(_collect_unhandled)


@pytest.fixture(autouse=True)
def no_unhandled_deferred_errors() -> Iterator[None]:
    """Fail any test that leaves an unhandled error in a Deferred, as magic-wormhole's
    ``observe_errors`` does."""
    with unhandled_deferred_errors() as seen:
        yield
    assert seen == [], f"unhandled error(s) in a Deferred: {seen}"
