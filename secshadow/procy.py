"""The PROCYCMD exchange, sans-IO: bytes in, results out, no sockets, no timers.

Console side (``docs/protocol.md`` section 2, IMI manual "Secure VNC with IMIv2"):
after the pinned TLS handshake the console writes ``PROCYCMD PW_<password>``
plus an optional terminator; a device that accepts the password answers with the
RFB ProtocolVersion message ``RFB xxx.yyy\\n`` (12 bytes, RFC 6143 section 7.1.1),
one that refuses closes without a word.

Device side (used by the emulator): :class:`CommandParser` reads that command.

Policy (when to write the command, what a close means, timeouts) lives above, in
``proxy.py`` and ``device/``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Union

from secshadow.errors import UsageError
from secshadow.secret import MAX_PASSWORD_LENGTH, OneTimePassword

PROCY_PREFIX = b"PROCYCMD PW_"

#: ``--procy-terminator`` names and their bytes.
TERMINATORS: dict[str, bytes] = {"none": b"", "lf": b"\n", "crlf": b"\r\n"}

#: Length of an RFB ProtocolVersion message, RFC 6143 section 7.1.1.
HELLO_LENGTH = 12
_HELLO_SHAPE = b"RFB ddd.ddd\n"


def terminator_bytes(name: str) -> bytes:
    """Bytes for a terminator name (``none``, ``lf``, ``crlf``); raises :class:`UsageError`."""
    try:
        return TERMINATORS[name]
    except KeyError:
        raise UsageError(
            f"unknown PROCYCMD terminator {name!r}; choose one of: {', '.join(TERMINATORS)}"
        ) from None


def procy_command(password: OneTimePassword, terminator: bytes = b"") -> bytes:
    """The command bytes, e.g. 48 bytes for a UUID password and no terminator.

    The result contains the password: write it only to a pinned connection, never log it.
    """
    if terminator not in TERMINATORS.values():
        raise UsageError("the PROCYCMD terminator must be empty, LF or CRLF")
    return PROCY_PREFIX + password.reveal().encode("ascii") + terminator


@dataclass(frozen=True)
class Hello:
    """A well-formed RFB ProtocolVersion. ``version`` is e.g. ``"RFB 003.008"``;
    ``raw`` the 12 bytes; ``rest`` whatever the device sent after them."""

    version: str
    major: int
    minor: int
    raw: bytes
    rest: bytes


@dataclass(frozen=True)
class NotRFB:
    """The device's first bytes are not an RFB ProtocolVersion; ``reason`` says why."""

    reason: str


HelloResult = Union[Hello, NotRFB]


class HelloParser:
    """Reads the device's first bytes after PROCYCMD.

    :meth:`feed` returns ``None`` while more bytes are needed, then exactly one
    :class:`Hello` or :class:`NotRFB`. A wrong byte is reported as soon as it
    arrives, so garbage is refused without waiting for twelve bytes.
    """

    def __init__(self) -> None:
        self._buffer = b""
        self._result: HelloResult | None = None

    @property
    def buffered(self) -> int:
        """Bytes held so far (at most 12 before a result)."""
        return len(self._buffer)

    def feed(self, data: bytes) -> HelloResult | None:
        if self._result is not None:
            raise RuntimeError("HelloParser already produced its result")
        self._buffer += data
        head = self._buffer[:HELLO_LENGTH]
        for i, byte in enumerate(head):
            expected = _HELLO_SHAPE[i]
            ok = (0x30 <= byte <= 0x39) if expected == ord("d") else byte == expected
            if not ok:
                self._result = NotRFB(
                    f"the device sent {len(self._buffer)} byte(s) that are not an RFB "
                    f"ProtocolVersion (mismatch at byte {i})"
                )
                return self._result
        if len(self._buffer) < HELLO_LENGTH:
            return None
        version = head[:11].decode("ascii")
        self._result = Hello(
            version=version,
            major=int(head[4:7]),
            minor=int(head[8:11]),
            raw=head,
            rest=self._buffer[HELLO_LENGTH:],
        )
        self._buffer = b""
        return self._result


@dataclass(frozen=True)
class Command:
    """A complete PROCYCMD command. ``password`` is the text after ``PW_``;
    ``rest`` the bytes after the command and its terminator (the viewer's RFB)."""

    password: str
    rest: bytes

    def __repr__(self) -> str:
        return f"Command(password=<redacted>, rest={len(self.rest)} bytes)"


@dataclass(frozen=True)
class BadCommand:
    """The peer's bytes are not a PROCYCMD command; ``reason`` never quotes them."""

    reason: str


CommandResult = Union[Command, BadCommand]


class CommandParser:
    """Device side: reads ``PROCYCMD PW_<password>[terminator]``.

    ``password_length``: with no terminator on the wire the command has no end marker,
    so the device reads this many password characters (36, a UUID, as IMI issues).
    ``require_terminator``: a firmware that insists on ``\\n`` (``\\r\\n`` also
    accepted) reads the password up to it instead.
    Without ``require_terminator``, a LF or CRLF that follows is still consumed, so a
    console configured with a terminator works against either kind of device.
    """

    def __init__(self, password_length: int = 36, require_terminator: bool = False) -> None:
        self._password_length = password_length
        self._require_terminator = require_terminator
        self._buffer = b""
        self._result: CommandResult | None = None

    def feed(self, data: bytes) -> CommandResult | None:
        if self._result is not None:
            raise RuntimeError("CommandParser already produced its result")
        self._buffer += data
        buf = self._buffer
        prefix = buf[: len(PROCY_PREFIX)]
        if not PROCY_PREFIX.startswith(prefix):
            return self._finish(BadCommand("the first bytes are not 'PROCYCMD PW_'"))
        if len(buf) < len(PROCY_PREFIX):
            return None
        body = buf[len(PROCY_PREFIX):]
        if self._require_terminator:
            end = body.find(b"\n")
            if end < 0:
                if len(body) > MAX_PASSWORD_LENGTH + 1:
                    return self._finish(BadCommand("no line terminator after the password"))
                return None
            password = body[:end].rstrip(b"\r")
            rest = body[end + 1:]
        else:
            if len(body) < self._password_length:
                return None
            password = body[: self._password_length]
            rest = body[self._password_length:]
            # Consume an optional terminator; wait if a CR or LF may still be coming.
            if rest in (b"", b"\r"):
                if rest == b"\r":
                    return None
            elif rest.startswith(b"\r\n"):
                rest = rest[2:]
            elif rest.startswith(b"\n"):
                rest = rest[1:]
        if not password or not all(0x21 <= b <= 0x7E for b in password):
            return self._finish(BadCommand("the password has invalid characters"))
        return self._finish(Command(password.decode("ascii"), rest))

    def _finish(self, result: CommandResult) -> CommandResult:
        self._result = result
        self._buffer = b""
        return result
