"""``--audit FILE`` against the real lab (issue 10, PROTOCOL.md section 8).

The real ``secshadow-proxy`` (one-shot and ``--control stdio``) writes the file; the
tests read it as an auditor would: one JSON object per line and session, every
section-8 field checked against what the session really was, mode 0600, appended
across runs, and no password or token anywhere in it.
"""

from __future__ import annotations

import hashlib
import json
import os
import pwd
import re
import signal
import stat
import subprocess
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from secshadow.lab.harness import DEVICE_ID, UMS_USER, Lab, ManagedProcess, child_environment, python_module
from secshadow.tests._viewonly import FENCE, RAW, RFBClient, set_encodings

pytestmark = pytest.mark.integration

#: PROTOCOL.md section 8, in its order (written out again: the test checks the product).
FIELDS = ["start", "end", "duration_s", "os_user", "ums_user", "device_id", "device_host", "device_port",
          "certificate_sha256", "transport", "viewer", "view_only", "bytes_to_viewer", "bytes_to_device",
          "result", "reason"]
UUID = re.compile(r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}")
FULL_FRAME = 640 * 480 * 4  # the lab's Xvnc, 32 bits per pixel, raw


def pin_of(lab: Lab) -> str:
    der = x509.load_pem_x509_certificate(lab.device_cert.read_bytes()).public_bytes(serialization.Encoding.DER)
    return ":".join(f"{b:02X}" for b in hashlib.sha256(der).digest())


def read_records(path: Path) -> list[dict[str, Any]]:
    text = path.read_text(encoding="ascii")
    assert text.endswith("\n")
    return [json.loads(line) for line in text.splitlines()]


def check_record(record: dict[str, Any], lab: Lab, *, ums: bool, viewer: str, view_only: bool, result: str,
                 reason: str, window: tuple[float, float]) -> None:
    """Every section-8 field of ``record``; ``window``: wall-clock seconds the session
    lay within (started no earlier, ended no later)."""
    assert list(record) == FIELDS
    start = datetime.fromisoformat(record["start"])
    end = datetime.fromisoformat(record["end"])
    assert record["start"].endswith("Z") and record["end"].endswith("Z")
    assert start.utcoffset().total_seconds() == 0 and end.utcoffset().total_seconds() == 0
    assert window[0] - 1 <= start.timestamp() <= end.timestamp() <= window[1] + 1
    assert record["duration_s"] == pytest.approx((end - start).total_seconds(), abs=0.01)
    assert record["os_user"] == pwd.getpwuid(os.geteuid()).pw_name
    assert record["ums_user"] == (UMS_USER if ums else None)
    assert record["device_id"] == (DEVICE_ID if ums else None)
    assert record["device_host"] == "127.0.0.1"
    assert record["device_port"] == lab.device_port
    assert record["certificate_sha256"] == pin_of(lab)
    assert record["transport"] == "tcp"
    assert record["viewer"] == viewer
    assert record["view_only"] is view_only
    assert isinstance(record["bytes_to_viewer"], int) and isinstance(record["bytes_to_device"], int)
    assert record["result"] == result
    assert reason in record["reason"]


def assert_private_and_secret_free(path: Path, lab: Lab, *passwords: str) -> None:
    info = os.stat(path)
    assert stat.S_IMODE(info.st_mode) == 0o600
    assert info.st_uid == os.geteuid()
    text = path.read_text(encoding="ascii")
    assert UUID.search(text) is None  # no one-time password (a UUID) of any session
    assert lab.password_file.read_text().strip() not in text  # nor the IMI password
    for password in passwords:
        assert password not in text
    assert "PROCYCMD" not in text and "token" not in text.lower()


def watch_one_frame(port: int) -> None:
    with RFBClient("127.0.0.1", port) as client:
        client.handshake()
        client.send(set_encodings([RAW, FENCE]))
        assert client.full_update() >= 1


def test_success_rejection_and_sigterm_append_one_line_each_to_a_0600_file(lab: Lab, tmp_path: Path) -> None:
    audit = tmp_path / "audit.jsonl"

    # 1. success: a view-only viewer watches one frame and disconnects.
    t0 = time.time()
    proxy = ManagedProcess("audit-ok", lab.proxy_argv("--json", "--viewer", "none", "--view-only",
                                                      "--audit", str(audit)), tmp_path, env=child_environment())
    try:
        watch_one_frame(proxy.wait_for("listening")["port"])
        assert proxy.process.wait(timeout=20) == 0
    finally:
        proxy.stop()
    t1 = time.time()
    (ok,) = read_records(audit)
    first_line = audit.read_bytes()
    closed = proxy.events[-1]
    check_record(ok, lab, ums=True, viewer="none", view_only=True, result="ok", reason="viewer disconnected",
                 window=(t0, t1))
    assert ok["reason"] == closed["reason"] == "viewer disconnected"
    assert ok["bytes_to_viewer"] == closed["bytes_to_viewer"] > FULL_FRAME
    assert ok["bytes_to_device"] == closed["bytes_to_device"] > 0
    assert_private_and_secret_free(audit, lab)

    # 2. rejection: the device refuses a wrong password (exit 7); a --secret-file secret.
    wrong = "00000000-0000-4000-8000-000000000000"
    proxy = ManagedProcess("audit-rejected", [
        *python_module("secshadow.cli"), "--secret-file", "-", "--json", "--viewer", "none",
        "--audit", str(audit)], tmp_path, env=child_environment(), stdin=subprocess.PIPE)
    try:
        proxy.process.stdin.write(lab.secret_json(wrong))
        proxy.process.stdin.close()
        with RFBClient("127.0.0.1", proxy.wait_for("listening")["port"]) as client:
            assert client.wait_closed(timeout=20)
        assert proxy.process.wait(timeout=20) == 7
    finally:
        proxy.stop()
    t2 = time.time()
    records = read_records(audit)
    assert len(records) == 2 and audit.read_bytes().startswith(first_line)  # appended, not truncated
    rejected = records[1]
    check_record(rejected, lab, ums=False, viewer="none", view_only=False, result="device-rejected",
                 reason="wrong or expired password", window=(t1, t2))
    assert rejected["reason"] == proxy.events[-1]["message"]
    assert rejected["bytes_to_viewer"] == rejected["bytes_to_device"] == 0
    assert_private_and_secret_free(audit, lab, wrong)

    # 3. interruption: SIGTERM while relaying.
    proxy = ManagedProcess("audit-sigterm", lab.proxy_argv("--json", "--viewer", "none", "--audit", str(audit)),
                           tmp_path, env=child_environment())
    try:
        with RFBClient("127.0.0.1", proxy.wait_for("listening")["port"]) as client:
            client.handshake()
            client.send(set_encodings([RAW, FENCE]))
            assert client.full_update() >= 1
            time.sleep(1.0)
            proxy.process.send_signal(signal.SIGTERM)
            assert proxy.process.wait(timeout=20) == 0
    finally:
        proxy.stop()
    t3 = time.time()
    records = read_records(audit)
    assert len(records) == 3 and audit.read_bytes().startswith(first_line)
    interrupted = records[2]
    check_record(interrupted, lab, ums=True, viewer="none", view_only=False, result="ok",
                 reason="interrupted by SIGTERM", window=(t2, t3))
    assert interrupted["duration_s"] >= 1.0
    assert interrupted["bytes_to_viewer"] == proxy.events[-1]["bytes_to_viewer"] > FULL_FRAME
    assert_private_and_secret_free(audit, lab)
    print(f"\naudit lines: {[(r['result'], r['reason'], r['duration_s']) for r in records]}")


def test_control_mode_writes_one_line_per_session_however_it_ends(lab: Lab, tmp_path: Path) -> None:
    """Four requests in one control process: a view-only session closed by the console
    (``close``), a session whose viewer disconnects, a secret the device rejects, and an
    unknown device (no secret fetched: no line)."""
    audit = tmp_path / "control-audit.jsonl"
    wrong = "11111111-2222-4333-8444-555555555555"
    proxy = ManagedProcess("audit-control", [
        *python_module("secshadow.cli"), "--control", "stdio", "--ums", lab.ums_url, "--ums-user", UMS_USER,
        "--ums-password-file", str(lab.password_file), "--ums-fingerprint", lab.ums_fingerprint,
        "--device-port", str(lab.device_port), "--audit", str(audit)],
        tmp_path, env=child_environment(), stdin=subprocess.PIPE)

    def send(request: dict[str, Any]) -> None:
        proxy.process.stdin.write(json.dumps(request).encode() + b"\n")
        proxy.process.stdin.flush()

    def wait(session: str, name: str) -> dict[str, Any]:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            for event in list(proxy.events):
                if event.get("session") == session and event.get("event") == name:
                    return event
            time.sleep(0.05)
        raise AssertionError(f"no {name} for {session}: {proxy.events}\n{proxy.log_tail()}")

    t0 = time.time()
    try:
        send({"op": "open", "session": "watch", "device": DEVICE_ID, "view_only": True})
        send({"op": "open", "session": "drive", "device": DEVICE_ID})
        send({"op": "open", "session": "rejected", "secret": json.loads(lab.secret_json(wrong))})
        send({"op": "open", "session": "unknown", "device": "999"})
        watcher = RFBClient("127.0.0.1", wait("watch", "listening")["port"])
        watcher.handshake()
        watcher.send(set_encodings([RAW, FENCE]))
        assert watcher.full_update() >= 1
        watch_one_frame(wait("drive", "listening")["port"])
        wait("drive", "closed")
        # Written at the end of that session, while the control process runs on.
        deadline = time.monotonic() + 5
        while not audit.exists() or not audit.read_bytes().endswith(b"\n"):
            assert time.monotonic() < deadline, "no audit line after the session closed"
            time.sleep(0.05)
        assert [r["reason"] for r in read_records(audit)] == ["viewer disconnected"]
        assert proxy.process.poll() is None
        with RFBClient("127.0.0.1", wait("rejected", "listening")["port"]) as client:
            assert client.wait_closed(timeout=20)
        wait("rejected", "error")
        assert wait("unknown", "error")["code"] == "ums"
        send({"op": "close", "session": "watch"})
        assert watcher.wait_closed(timeout=20)
        watcher.close()
        wait("watch", "closed")
        proxy.process.stdin.close()
        assert proxy.process.wait(timeout=20) == 0
    finally:
        proxy.stop()
    t1 = time.time()
    records = {r["reason"]: r for r in read_records(audit)}
    assert len(read_records(audit)) == 3, records
    check_record(records["closed by the console"], lab, ums=True, viewer="none", view_only=True, result="ok",
                 reason="closed by the console", window=(t0, t1))
    check_record(records["viewer disconnected"], lab, ums=True, viewer="none", view_only=False, result="ok",
                 reason="viewer disconnected", window=(t0, t1))
    (rejected,) = [r for r in records.values() if r["result"] != "ok"]
    check_record(rejected, lab, ums=False, viewer="none", view_only=False, result="device-rejected",
                 reason="wrong or expired password", window=(t0, t1))
    assert records["closed by the console"]["bytes_to_viewer"] > FULL_FRAME
    assert records["viewer disconnected"]["bytes_to_viewer"] > FULL_FRAME
    assert_private_and_secret_free(audit, lab, wrong)
