"""secshadow.audit: the audit record and file of PROTOCOL.md section 8."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import tempfile
import textwrap
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from secshadow.audit import FIELDS, AuditLog, AuditRecord, error_codes, now_iso
from secshadow.errors import UsageError
from secshadow.lab.harness import child_environment

FINGERPRINT = ":".join(["AB"] * 32)
#: PROTOCOL.md section 8, written out again: the record has these keys and no other.
SECTION_8 = ["start", "end", "duration_s", "os_user", "ums_user", "device_id", "device_host", "device_port",
             "certificate_sha256", "transport", "viewer", "view_only", "bytes_to_viewer", "bytes_to_device",
             "result", "reason"]


def record(**changes: object) -> AuditRecord:
    base = AuditRecord(
        start=now_iso(1_737_388_125.0), end=now_iso(1_737_388_185.5), duration_s=60.5, os_user="helpdesk",
        ums_user="umsadmin", device_id="4711", device_host="10.0.0.7", device_port=5900,
        certificate_sha256=FINGERPRINT, transport="tcp", viewer="tigervnc", view_only=True,
        bytes_to_viewer=123456, bytes_to_device=789, result="ok", reason="viewer disconnected")
    return replace(base, **changes)  # type: ignore[arg-type]


@pytest.fixture
def umask0() -> Iterator[None]:
    old = os.umask(0)
    try:
        yield
    finally:
        os.umask(old)


# ====================================================================== the record


def test_now_iso_is_utc_with_milliseconds() -> None:
    assert now_iso(0) == "1970-01-01T00:00:00.000Z"
    assert now_iso(1_737_388_125.1239) == "2025-01-20T15:48:45.123Z"


def test_the_record_has_exactly_the_section_8_fields() -> None:
    assert list(FIELDS) == SECTION_8
    line = record().as_json_line()
    assert line.endswith(b"\n") and line.count(b"\n") == 1
    parsed = json.loads(line)
    assert list(parsed) == SECTION_8
    assert parsed == {
        "start": "2025-01-20T15:48:45.000Z", "end": "2025-01-20T15:49:45.500Z", "duration_s": 60.5,
        "os_user": "helpdesk", "ums_user": "umsadmin", "device_id": "4711", "device_host": "10.0.0.7",
        "device_port": 5900, "certificate_sha256": FINGERPRINT, "transport": "tcp", "viewer": "tigervnc",
        "view_only": True, "bytes_to_viewer": 123456, "bytes_to_device": 789, "result": "ok",
        "reason": "viewer disconnected"}


def test_nulls_for_a_secret_from_a_file_and_an_error_result() -> None:
    parsed = json.loads(record(ums_user=None, device_id=None, transport="gateway", viewer="browser",
                               result="device-rejected", reason="the device closed the connection").as_json_line())
    assert parsed["ums_user"] is None and parsed["device_id"] is None
    assert parsed["transport"] == "gateway" and parsed["result"] == "device-rejected"
    assert list(parsed) == SECTION_8


def test_a_reason_with_newlines_and_non_ascii_stays_one_ascii_line() -> None:
    line = record(reason="closed\nby Jürgen\r\n\u2028", os_user="j\udcfcrgen").as_json_line()
    assert line.count(b"\n") == 1 and line.isascii()
    assert json.loads(line)["reason"] == "closed\nby Jürgen\r\n\u2028"


def test_results_are_ok_or_a_known_error_code() -> None:
    assert {"ok"} | error_codes() >= {"usage", "ums", "device-unreachable", "tls-handshake", "pin-mismatch",
                                      "device-rejected", "viewer", "gateway", "internal"}
    for code in error_codes():
        record(result=code)


@pytest.mark.parametrize(("field", "value"), [
    ("start", "2025-01-20 15:48:45"),
    ("start", "2025-01-20T15:48:45+01:00"),
    ("end", 1737388125.0),
    ("duration_s", -1.0),
    ("duration_s", float("nan")),
    ("duration_s", True),
    ("os_user", ""),
    ("ums_user", ""),
    ("device_id", 4711),
    ("device_port", 0),
    ("device_port", "5900"),
    ("certificate_sha256", "ab" * 32),
    ("transport", "websocket"),
    ("viewer", ""),
    ("view_only", 1),
    ("bytes_to_viewer", -1),
    ("bytes_to_device", 1.5),
    ("result", "error"),
    ("reason", None),
])
def test_a_malformed_record_is_refused(field: str, value: object) -> None:
    with pytest.raises(ValueError, match=f"bad audit record: {field} "):
        record(**{field: value})


def test_the_record_is_frozen() -> None:
    with pytest.raises(AttributeError):
        record().reason = "changed"  # type: ignore[misc]


# ====================================================================== the file


def test_created_0600_even_under_umask_0(tmp_path: Path, umask0: None) -> None:
    path = tmp_path / "audit.jsonl"
    with AuditLog(path) as log:
        log.write(record())
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert json.loads(path.read_bytes()) == record().as_dict()


def test_appends_and_never_truncates(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    path.write_bytes(b'{"earlier": "line"}\n')
    path.chmod(0o600)
    for i in range(3):
        with AuditLog(path) as log:
            log.write(record(bytes_to_device=i))
            log.write(record(bytes_to_viewer=i))
    lines = path.read_bytes().splitlines()
    assert lines[0] == b'{"earlier": "line"}'
    assert len(lines) == 7
    assert [json.loads(x)["bytes_to_device"] for x in lines[1::2]] == [0, 1, 2]


def test_one_write_and_one_fsync_per_record(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[str, int]] = []
    real_write, real_fsync = os.write, os.fsync

    def counting_write(fd: int, data: bytes) -> int:
        calls.append(("write", len(data)))
        return real_write(fd, data)

    def counting_fsync(fd: int) -> None:
        calls.append(("fsync", fd))
        real_fsync(fd)

    log = AuditLog(tmp_path / "audit.jsonl")
    monkeypatch.setattr(os, "write", counting_write)
    monkeypatch.setattr(os, "fsync", counting_fsync)
    long = record(reason="x" * 100_000)
    log.write(long)
    log.write(record())
    log.close()
    assert [kind for kind, _ in calls] == ["write", "fsync", "write", "fsync"]
    assert calls[0][1] == len(long.as_json_line())  # the whole line at once


def test_a_short_write_or_a_full_disk_is_a_usage_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    log = AuditLog(tmp_path / "audit.jsonl")
    monkeypatch.setattr(os, "write", lambda fd, data: len(data) - 1)
    with pytest.raises(UsageError, match=r"only \d+ of \d+ bytes"):
        log.write(record())

    def full(fd: int, data: bytes) -> int:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "write", full)
    with pytest.raises(UsageError, match="No space left on device"):
        log.write(record())
    log.close()


def test_close_twice_and_write_after_close(tmp_path: Path) -> None:
    log = AuditLog(tmp_path / "audit.jsonl")
    assert "open" in repr(log)
    log.close()
    log.close()
    assert log.closed and "closed" in repr(log)
    with pytest.raises(ValueError, match="is closed"):
        log.write(record())


# ---------------------------------------------------------------------- refusals


def test_a_missing_directory_is_refused(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match=f"the directory {tmp_path / 'nope'} does not exist"):
        AuditLog(tmp_path / "nope" / "audit.jsonl")


def test_a_symlink_is_refused_even_to_a_good_file(tmp_path: Path) -> None:
    target = tmp_path / "real.jsonl"
    AuditLog(target).close()
    (tmp_path / "link.jsonl").symlink_to(target)
    (tmp_path / "dangling.jsonl").symlink_to(tmp_path / "absent.jsonl")
    for name in ("link.jsonl", "dangling.jsonl"):
        with pytest.raises(UsageError, match="symbolic link"):
            AuditLog(tmp_path / name)
    assert not (tmp_path / "absent.jsonl").exists()
    assert target.read_bytes() == b""


def test_a_directory_and_a_device_are_refused(tmp_path: Path) -> None:
    for path in (tmp_path, Path("/dev/null")):
        with pytest.raises(UsageError, match="not a regular file"):
            AuditLog(path)


@pytest.mark.integration
def test_a_fifo_without_a_reader_is_refused_without_blocking(tmp_path: Path) -> None:
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo, 0o600)
    # In a child with a deadline: a plain O_WRONLY open of a FIFO would wait for a reader.
    status, message = _try_open_as(fifo, None)
    assert status == 3, message
    assert "not a regular file" in message


def test_a_fifo_with_a_reader_is_refused_without_blocking(tmp_path: Path) -> None:
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo, 0o600)
    reader = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
    try:
        with pytest.raises(UsageError, match="not a regular file"):
            AuditLog(fifo)
    finally:
        os.close(reader)


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o660, 0o666, 0o700])
def test_an_existing_file_open_to_others_is_refused(tmp_path: Path, mode: int) -> None:
    path = tmp_path / "audit.jsonl"
    path.write_bytes(b"")
    path.chmod(mode)
    if mode & 0o077:
        with pytest.raises(UsageError, match=f"mode {mode:04o}.*chmod 600"):
            AuditLog(path)
    else:
        AuditLog(path).close()  # owner-only execute bit: harmless


def test_a_file_of_another_user_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "audit.jsonl"
    AuditLog(path).close()
    monkeypatch.setattr(os, "geteuid", lambda: path.stat().st_uid + 1)
    with pytest.raises(UsageError, match=r"belongs to another user \(uid \d+\)"):
        AuditLog(path)


@pytest.mark.skipif(os.geteuid() != 0, reason="chown needs root")
def test_a_file_chowned_to_nobody_is_refused_by_root(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    AuditLog(path).close()
    os.chown(path, 65534, 65534)
    with pytest.raises(UsageError, match=r"belongs to another user \(uid 65534\)"):
        AuditLog(path)


def _try_open_as(path: Path, uid: int | None) -> tuple[int, str]:
    """Open ``path`` as an AuditLog in a child process (as ``uid`` when root); returns
    the exit status and the UsageError message."""
    code = textwrap.dedent(f"""
        import os, sys
        from secshadow.audit import AuditLog
        from secshadow.errors import UsageError
        if {uid!r} is not None:
            os.setgid({uid!r}); os.setuid({uid!r})
        try:
            AuditLog({str(path)!r}).close()
        except UsageError as e:
            print(e.message); sys.exit(3)
    """)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                          env=child_environment(), check=False)
    return done.returncode, done.stdout.strip() + done.stderr.strip()


@pytest.mark.integration
def test_a_directory_that_is_not_writable_is_refused(tmp_path: Path) -> None:
    if os.geteuid() == 0:
        # Root writes anywhere: the refusal is shown as the user nobody, in a directory
        # nobody can enter but not write (secshadow is imported before setuid: nobody
        # cannot read this interpreter's directory).
        directory = Path(tempfile.mkdtemp(prefix="secshadow-audit-"))
        try:
            directory.chmod(0o755)
            status, message = _try_open_as(directory / "audit.jsonl", 65534)
        finally:
            directory.rmdir()
    else:
        directory = tmp_path / "readonly"
        directory.mkdir(mode=0o500)
        status, message = _try_open_as(directory / "audit.jsonl", None)
        assert not (directory / "audit.jsonl").exists()
    assert status == 3, message
    assert f"the directory {directory} is not writable by this user" in message


# ---------------------------------------------------------------------- concurrency


@pytest.mark.integration
def test_two_processes_appending_to_one_file_leave_only_whole_lines(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    AuditLog(path).close()
    writer = textwrap.dedent(f"""
        import sys
        from secshadow.audit import AuditLog, AuditRecord, now_iso
        who = sys.argv[1]
        with AuditLog({str(path)!r}) as log:
            for i in range(300):
                log.write(AuditRecord(start=now_iso(0), end=now_iso(1), duration_s=1.0, os_user=who,
                    ums_user=None, device_id=str(i), device_host="127.0.0.1", device_port=5900,
                    certificate_sha256={FINGERPRINT!r}, transport="tcp", viewer="none", view_only=False,
                    bytes_to_viewer=i, bytes_to_device=i, result="ok", reason=who * 20000))
    """)
    children = [subprocess.Popen([sys.executable, "-c", writer, who], env=child_environment())
                for who in ("a", "b")]
    assert [child.wait(timeout=120) for child in children] == [0, 0]
    lines = path.read_bytes().split(b"\n")
    assert lines[-1] == b""
    parsed = [json.loads(line) for line in lines[:-1]]  # a torn line would not parse
    assert len(parsed) == 600
    for who in ("a", "b"):
        mine = [p for p in parsed if p["os_user"] == who]
        assert [p["device_id"] for p in mine] == [str(i) for i in range(300)]
        assert all(p["reason"] == who * 20000 for p in mine)
    assert all(list(p) == SECTION_8 for p in parsed)
