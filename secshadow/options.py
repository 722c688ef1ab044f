"""A session's settings, validated once for the CLI, control mode and the API.

:class:`SessionOptions` checks itself on construction, and
:meth:`SessionOptions.from_mapping` turns loosely typed input (a control-mode JSON
request, the API's keyword arguments) into options with the same checks and the same
messages as the CLI's flags. Bad values raise :class:`~secshadow.errors.UsageError`
(exit 2, code ``usage``); nothing is silently coerced (a non-positive timeout never
means "no timeout").
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Any, Mapping

from secshadow.errors import UsageError
from secshadow.pinning import TLSProfile
from secshadow.procy import TERMINATORS, terminator_bytes

#: The device's TLS port when neither the caller nor the secret names one (IMI manual,
#: "Secure VNC with IMIv2": the same port as plain VNC).
DEFAULT_DEVICE_PORT = 5900
#: The viewer's listener: loopback only, any free port.
DEFAULT_LISTEN = "tcp:0:interface=127.0.0.1"
#: At most this many viewers, one after another, per session (``--max-viewers``).
MAX_VIEWERS_LIMIT = 1000


def seconds(name: str, value: object, allow_zero: bool = False) -> float:
    """``value`` as a positive, finite number of seconds (zero too when ``allow_zero``).

    Accepts numbers and numeric strings; raises :class:`UsageError` naming ``name``.
    """
    if isinstance(value, bool):
        raise UsageError(f"{name} must be a number of seconds")
    try:
        number = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError, OverflowError):
        raise UsageError(f"{name} must be a number of seconds") from None
    if not math.isfinite(number) or number < 0 or (number == 0 and not allow_zero):
        raise UsageError(f"{name} must be {'zero or ' if allow_zero else ''}a positive number of seconds")
    return number


def count(name: str, value: object, low: int = 1, high: int = MAX_VIEWERS_LIMIT) -> int:
    """``value`` as a whole number from ``low`` to ``high``; raises :class:`UsageError`."""
    message = f"{name} must be a whole number from {low} to {high}"
    if isinstance(value, bool):
        raise UsageError(message)
    if isinstance(value, str):
        if not value.strip().isdigit():
            raise UsageError(message)
        value = int(value.strip())
    if isinstance(value, float):
        if not value.is_integer():
            raise UsageError(message)
        value = int(value)
    if not isinstance(value, int) or not low <= value <= high:
        raise UsageError(message)
    return value


def port_number(name: str, value: object) -> int:
    """A TCP port from 1 to 65535; raises :class:`UsageError`."""
    return count(name, value, 1, 65535)


@dataclass(frozen=True)
class SessionOptions:
    """Settings of one session; every duration is in seconds.

    ``device_host`` / ``device_port``: override the secret's ``lastIP``/port (default
    port 5900). ``terminator``: bytes after the command (``b""``, ``b"\\n"``,
    ``b"\\r\\n"``). ``listen``: Twisted server endpoint string for the viewer's side,
    loopback by default. ``idle_timeout``: 0 disables it. ``max_viewers``: how many
    viewers, one after another, the session serves; each one after the first needs a
    fresh secret, since the password works once. ``view_only``: the proxy enforces
    view-only (PROTOCOL.md section 7). Raises :class:`UsageError` on any bad value.
    """

    device_host: str | None = None
    device_port: int | None = None
    tls_profile: TLSProfile = TLSProfile.MODERN
    terminator: bytes = b""
    listen: str = DEFAULT_LISTEN
    connect_timeout: float = 15.0
    viewer_timeout: float = 60.0
    hello_timeout: float = 60.0
    idle_timeout: float = 0.0
    max_viewers: int = 1
    view_only: bool = False

    def __post_init__(self) -> None:
        if self.device_host is not None:
            from secshadow.secret import parse_host

            parse_host(self.device_host, "--device-host")
        if self.device_port is not None:
            port_number("the device port", self.device_port)
        if not isinstance(self.tls_profile, TLSProfile):
            raise UsageError(f"tls_profile must be a TLSProfile, not {self.tls_profile!r}")
        if self.terminator not in TERMINATORS.values():
            raise UsageError("the PROCYCMD terminator must be one of none, lf, crlf")
        if not isinstance(self.listen, str) or not self.listen:
            raise UsageError("the listen endpoint must be a Twisted server endpoint string")
        object.__setattr__(self, "listen", checked_listen(self.listen))
        for name in ("connect_timeout", "viewer_timeout", "hello_timeout"):
            seconds(_flag(name), getattr(self, name))
        seconds(_flag("idle_timeout"), self.idle_timeout, allow_zero=True)
        count(_flag("max_viewers"), self.max_viewers)
        if not isinstance(self.view_only, bool):
            raise UsageError("view_only must be true or false")

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any], base: SessionOptions | None = None) -> SessionOptions:
        """Options from loosely typed values (JSON, keyword arguments) over ``base``.

        Keys are the field names, plus ``procy_terminator`` (a name: none, lf, crlf) and
        ``tls_profile`` as a name. Unknown keys, wrong types and out-of-range values raise
        :class:`UsageError` with the CLI's messages.
        """
        known = {f.name for f in fields(cls)} | {"procy_terminator"}
        unknown = sorted(set(values) - known)
        if unknown:
            raise UsageError(f"unknown session option(s): {', '.join(unknown)}")
        merged: dict[str, Any] = {} if base is None else {f.name: getattr(base, f.name) for f in fields(cls)}
        for key, value in values.items():
            if key == "procy_terminator":
                merged["terminator"] = terminator_bytes(str(value))
            elif key == "tls_profile":
                merged[key] = value if isinstance(value, TLSProfile) else TLSProfile.parse(str(value))
            elif key in ("connect_timeout", "viewer_timeout", "hello_timeout", "idle_timeout"):
                merged[key] = seconds(_flag(key), value, allow_zero=key == "idle_timeout")
            elif key == "max_viewers":
                merged[key] = count(_flag(key), value)
            elif key == "device_port":
                merged[key] = None if value is None else port_number(_flag(key), value)
            elif key == "view_only":
                if not isinstance(value, bool):
                    raise UsageError("'view_only' must be true or false")
                merged[key] = value
            elif key in ("device_host", "listen"):
                if value is not None and not isinstance(value, str):
                    raise UsageError(f"{_flag(key)} must be a string")
                merged[key] = value
            else:
                merged[key] = value
        return cls(**merged)


def checked_listen(listen: str) -> str:
    """The viewer's listener endpoint string, checked: IPv6 listeners are refused
    (viewers misread ``::1`` in ``host::port``, PROTOCOL.md section 4), and a unix
    socket without ``mode=`` gets ``mode=600`` (owner only). Raises :class:`UsageError`."""
    kind, _, rest = listen.partition(":")
    # Twisted's endpoint strings escape a colon inside a value as "\:".
    values = [part.replace("\0", ":") for part in rest.replace("\\:", "\0").split(":")]
    interface = next((v.split("=", 1)[1] for v in values if v.startswith("interface=")), "")
    if kind == "tcp6" or (kind == "tcp" and ":" in interface):
        raise UsageError(f"--listen {listen!r}: IPv6 listeners are not supported (viewers misread '::1' in "
                         "host::port); use tcp:0:interface=127.0.0.1")
    if kind == "unix" and not any(v.startswith("mode=") for v in values):
        return f"{listen}:mode=600"
    return listen


def _flag(field_name: str) -> str:
    """The CLI flag of a field, for messages that read the same everywhere."""
    return "--" + field_name.replace("_", "-")
