"""secshadow.lab.vnc: a real Xvnc for tests and the demo."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from secshadow.lab import vnc
from secshadow.tests.conftest import require_program


def test_parse_rgb() -> None:
    assert vnc.parse_rgb("#1f6feb") == (0x1F, 0x6F, 0xEB)
    with pytest.raises(ValueError):
        vnc.parse_rgb("blue")


def test_free_display_skips_displays_in_use(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(vnc, "_display_in_use", lambda number: number < 50)
    assert vnc.free_display(start=45) == 50


def greeting(port: int) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as conn:
        conn.settimeout(5)
        return conn.recv(12)


@pytest.mark.integration
def test_two_servers_at_once_and_a_clean_stop() -> None:
    require_program("Xvnc")
    require_program("xsetroot")
    with vnc.run_xvnc(label=None) as first, vnc.run_xvnc(background="#00ff00") as second:
        assert first.display != second.display
        assert first.rfb_port != second.rfb_port
        assert greeting(first.rfb_port) == b"RFB 003.008\n"
        assert greeting(second.rfb_port) == b"RFB 003.008\n"
        assert second.background_rgb == (0, 255, 0)
        assert Path(f"/tmp/.X11-unix/X{first.display}").exists()
        processes = [first.process, second.process, *second.helpers]
    assert all(proc.returncode is not None for proc in processes)
    for server in (first, second):
        # Xvnc removed its own lock and socket; the port is closed.
        assert not Path(f"/tmp/.X{server.display}-lock").exists()
        assert not Path(f"/tmp/.X11-unix/X{server.display}").exists()
        assert not server.log_path.parent.exists()
        with pytest.raises(OSError):
            greeting(server.rfb_port)
