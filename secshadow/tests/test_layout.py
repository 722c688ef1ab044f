"""The product never imports the lab or the tests (DESIGN.md: the lab apart), and the
wheel ships neither the tests nor a missing ``py.typed``."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PRODUCT_ENTRY_POINTS = ["secshadow.cli", "secshadow.api", "secshadow.control"]


@pytest.mark.integration
@pytest.mark.parametrize("module", PRODUCT_ENTRY_POINTS)
def test_product_entry_point_loads_no_lab_or_test_module(module: str) -> None:
    code = (
        "import importlib, json, sys\n"
        f"importlib.import_module({module!r})\n"
        "print(json.dumps(sorted(m for m in sys.modules if m.startswith('secshadow'))))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                         timeout=60, check=True).stdout
    loaded = json.loads(out)
    assert module in loaded
    assert [m for m in loaded if m.startswith(("secshadow.lab", "secshadow.tests"))] == []


@pytest.mark.integration
def test_children_of_the_tests_import_this_checkout(tmp_path: Path) -> None:
    """The lab's programs and the CLIs the tests start run the code under test, also
    when another secshadow is installed (a tox environment, a second worktree)."""
    from secshadow.lab.harness import child_environment

    out = subprocess.run([sys.executable, "-c", "import secshadow; print(secshadow.__file__)"],
                         cwd=tmp_path, env=child_environment(), capture_output=True, text=True,
                         timeout=60, check=True).stdout
    assert Path(out.strip()).resolve() == ROOT / "secshadow" / "__init__.py"


@pytest.mark.integration
def test_wheel_ships_no_tests_and_ships_py_typed(tmp_path: Path) -> None:
    import zipfile

    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q",
                    "-w", str(tmp_path), str(ROOT)], check=True, timeout=300, capture_output=True)
    (wheel,) = tmp_path.glob("secshadow-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "secshadow/py.typed" in names
    assert "secshadow/cli.py" in names and "secshadow/lab/device/emulator.py" in names
    assert [n for n in names if n.startswith("secshadow/tests/")] == []


def test_the_unhandled_deferred_error_guard_sees_a_dropped_failure() -> None:
    from twisted.internet.defer import fail, succeed

    from secshadow.tests.conftest import unhandled_deferred_errors

    with unhandled_deferred_errors() as seen:
        succeed("fine")
    assert seen == []
    with unhandled_deferred_errors() as seen:
        fail(ValueError("dropped on the floor"))
    assert any("dropped on the floor" in text for text in seen)
