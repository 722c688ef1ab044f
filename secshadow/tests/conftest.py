"""Shared test helpers.

Integration tests need real programs (Xvnc, vncviewer, openssl, ...). Locally a
missing program skips the test; in CI (``CI=true``) it fails it, so CI can never
pass by skipping the tests that matter.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator

import pytest


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
