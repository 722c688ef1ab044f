"""The audit record: one JSON line per session (``--audit FILE``, PROTOCOL.md section 8).

An auditor reads who looked at which device's screen, when, for how long, through
which transport and viewer, whether view-only, and how it ended. :class:`AuditRecord`
holds exactly the fields of section 8 and nothing else; :class:`AuditLog` appends one
record with one ``write(2)`` followed by ``fsync(2)``.

The file is opened with ``O_WRONLY | O_APPEND | O_CREAT | O_NOFOLLOW | O_CLOEXEC`` and
mode 0600: created private, never truncated, never through a symbolic link. An existing
file must be a regular file owned by this user without group or other permission bits.
Every refusal is a :class:`~secshadow.errors.UsageError` naming the file and what to do.
Appends from several processes interleave only whole lines: each record is one
``write`` to a file opened with ``O_APPEND`` (POSIX, ``write(2)``: the offset move and
the write are one atomic step).

The record never holds a password, a one-time password or a token: it has no field for
one, and ``reason`` comes from error messages, which never carry them (``errors.py``).
"""

from __future__ import annotations

import errno
import fcntl
import json
import math
import os
import re
import stat
from dataclasses import asdict, dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from secshadow.errors import SecShadowError, UsageError

#: The record's keys, in the order PROTOCOL.md section 8 lists them.
FIELDS = ("start", "end", "duration_s", "os_user", "ums_user", "device_id", "device_host",
          "device_port", "certificate_sha256", "transport", "viewer", "view_only",
          "bytes_to_viewer", "bytes_to_device", "result", "reason")

TRANSPORTS = ("tcp", "gateway")

_FINGERPRINT = re.compile(r"^[0-9A-F]{2}(:[0-9A-F]{2}){31}$")


def now_iso(seconds: float) -> str:
    """``seconds`` since the epoch as ISO 8601 UTC with milliseconds, e.g.
    ``"2025-01-20T15:48:45.123Z"`` (pass ``reactor.seconds()`` or ``time.time()``)."""
    moment = datetime.fromtimestamp(seconds, tz=UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"


def error_codes() -> frozenset[str]:
    """Every ``code`` of :class:`SecShadowError` and its subclasses (``"usage"``,
    ``"ums"``, ``"device-unreachable"``, ... ``"internal"``)."""
    codes = set()
    pending: list[type[SecShadowError]] = [SecShadowError]
    while pending:
        cls = pending.pop()
        codes.add(cls.code)
        pending.extend(cls.__subclasses__())
    return frozenset(codes)


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _utc_iso(value: object) -> bool:
    if not isinstance(value, str):
        return False
    try:
        moment = datetime.fromisoformat(value)
    except ValueError:
        return False
    return moment.utcoffset() == timedelta(0)


@dataclass(frozen=True)
class AuditRecord:
    """One session, exactly the fields of PROTOCOL.md section 8.

    ``start``/``end``: ISO 8601 UTC strings (:func:`now_iso`); ``duration_s``: seconds,
    float; ``os_user``: the local account that ran secshadow; ``ums_user``: the UMS
    (IMI) user, ``None`` when the secret came from a file; ``device_id``: the UMS device
    id, ``None`` without one; ``device_host``/``device_port``: where the device was
    reached; ``certificate_sha256``: the pinned certificate's fingerprint as
    :func:`secshadow.secret.certificate_fingerprint` writes it (colon-separated
    upper-case hex); ``transport``: ``"tcp"`` or ``"gateway"``; ``viewer``: the
    viewer's name, ``"browser"`` or ``"none"``; ``view_only``: whether the proxy
    enforced view-only; byte counts: RFB bytes relayed each way; ``result``: ``"ok"``
    or the error code (``docs/cli.md``); ``reason``: how the session ended, in words.

    Raises :class:`ValueError` when a field has the wrong type or shape (a bug in the
    caller, not bad user input).
    """

    start: str
    end: str
    duration_s: float
    os_user: str
    ums_user: str | None
    device_id: str | None
    device_host: str
    device_port: int
    certificate_sha256: str
    transport: str
    viewer: str
    view_only: bool
    bytes_to_viewer: int
    bytes_to_device: int
    result: str
    reason: str

    def __post_init__(self) -> None:
        problems = []
        for name in ("start", "end"):
            if not _utc_iso(getattr(self, name)):
                problems.append(f"{name} must be an ISO 8601 UTC time (now_iso), not {getattr(self, name)!r}")
        duration = self.duration_s
        if not (isinstance(duration, (int, float)) and not isinstance(duration, bool)
                and math.isfinite(duration) and duration >= 0):
            problems.append(f"duration_s must be a finite number of seconds >= 0, not {duration!r}")
        for name in ("os_user", "device_host", "viewer"):
            value = getattr(self, name)
            if not isinstance(value, str) or not value:
                problems.append(f"{name} must be a non-empty string, not {value!r}")
        for name in ("ums_user", "device_id"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not value):
                problems.append(f"{name} must be a non-empty string or None, not {value!r}")
        if not _is_int(self.device_port) or not 0 < self.device_port < 65536:
            problems.append(f"device_port must be a port number, not {self.device_port!r}")
        if not isinstance(self.certificate_sha256, str) or not _FINGERPRINT.match(self.certificate_sha256):
            problems.append("certificate_sha256 must be a SHA-256 fingerprint (AB:CD:...), "
                            f"not {self.certificate_sha256!r}")
        if self.transport not in TRANSPORTS:
            problems.append(f"transport must be one of {', '.join(TRANSPORTS)}, not {self.transport!r}")
        if not isinstance(self.view_only, bool):
            problems.append(f"view_only must be true or false, not {self.view_only!r}")
        for name in ("bytes_to_viewer", "bytes_to_device"):
            value = getattr(self, name)
            if not _is_int(value) or value < 0:
                problems.append(f"{name} must be an integer >= 0, not {value!r}")
        if self.result != "ok" and self.result not in error_codes():
            problems.append(f"result must be 'ok' or an error code, not {self.result!r}")
        if not isinstance(self.reason, str):
            problems.append(f"reason must be a string, not {self.reason!r}")
        if problems:
            raise ValueError("bad audit record: " + "; ".join(problems))

    def as_dict(self) -> dict[str, Any]:
        """The JSON object, keys in section 8's order."""
        return asdict(self)

    def as_json_line(self) -> bytes:
        """One line of JSON (ASCII, ``\\n`` at the end, no other newline)."""
        return json.dumps(self.as_dict(), ensure_ascii=True, allow_nan=False).encode("ascii") + b"\n"


_OPEN_FLAGS = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK


class AuditLog:
    """An audit file opened for appending (see the module docstring).

    ``path``: the file (``--audit FILE``). Construction opens it and checks it, raising
    :class:`UsageError` when the directory is missing or not writable, the path is a
    symbolic link or not a regular file, the file belongs to another user, or it has
    group or other permission bits. :meth:`write` appends one record; :meth:`close`
    closes the file (also on leaving a ``with`` block).
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = os.fspath(path)
        self._fd: int | None = None
        self._fd = self._open()

    def _refuse(self, what: str) -> UsageError:
        return UsageError(f"cannot use the audit file {self.path}: {what}")

    def _open(self) -> int:
        path = self.path
        parent = os.path.dirname(os.path.abspath(path))
        try:
            fd = os.open(path, _OPEN_FLAGS, 0o600)
        except OSError as e:
            if e.errno == errno.ELOOP:
                raise self._refuse("it is a symbolic link; give the real file's path") from None
            if e.errno == errno.ENOENT:
                raise self._refuse(f"the directory {parent} does not exist") from None
            if e.errno == errno.ENOTDIR:
                raise self._refuse(f"{parent} is not a directory") from None
            if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
                where = "the file" if os.path.lexists(path) else f"the directory {parent}"
                raise self._refuse(f"{where} is not writable by this user ({e.strerror})") from None
            if e.errno in (errno.EISDIR, errno.ENXIO, errno.EOPNOTSUPP):
                raise self._refuse("it is not a regular file") from None
            raise self._refuse(e.strerror or str(e)) from None
        try:
            info = os.fstat(fd)
            if not stat.S_ISREG(info.st_mode):
                raise self._refuse("it is not a regular file")
            if info.st_uid != os.geteuid():
                raise self._refuse(f"it belongs to another user (uid {info.st_uid}); an audit file must "
                                   "be this user's own")
            loose = stat.S_IMODE(info.st_mode) & 0o077
            if loose:
                raise self._refuse(f"other users may read or write it (mode {stat.S_IMODE(info.st_mode):04o}); "
                                   f"run: chmod 600 {self.path}")
            # O_NONBLOCK only kept a FIFO from blocking the open; appends should block.
            fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~os.O_NONBLOCK)
        except BaseException:
            os.close(fd)
            raise
        return fd

    @property
    def closed(self) -> bool:
        return self._fd is None

    def write(self, record: AuditRecord) -> None:
        """Append ``record`` as one line: exactly one ``os.write`` of the whole line,
        then ``os.fsync``. Raises :class:`UsageError` when the disk refuses (full,
        quota, I/O error) or takes only part of the line, and :class:`ValueError` after
        :meth:`close`."""
        if self._fd is None:
            raise ValueError(f"the audit file {self.path} is closed")
        line = record.as_json_line()
        try:
            written = os.write(self._fd, line)
            os.fsync(self._fd)
        except OSError as e:
            raise UsageError(f"could not write the audit record to {self.path}: {e.strerror or e}") from None
        if written != len(line):
            raise UsageError(f"could not write the audit record to {self.path}: only {written} of "
                             f"{len(line)} bytes were written (disk full?)")

    def close(self) -> None:
        """Close the file; closing twice is harmless."""
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)

    def __enter__(self) -> AuditLog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"AuditLog({self.path!r}, {'closed' if self.closed else 'open'})"
