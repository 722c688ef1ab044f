"""Typed session events; ``as_dict()`` gives the JSON objects of ``docs/cli.md``.

The CLI prints them one per line with ``--json``; embedders receive the objects
themselves. No event carries the one-time password: none has a field for it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Callable, ClassVar


@dataclass(frozen=True)
class Event:
    """Base class; ``name`` is the JSON ``"event"`` value."""

    name: ClassVar[str] = ""

    def as_dict(self) -> dict[str, Any]:
        """The JSON object for this event, ``{"event": name, ...fields}``."""
        return {"event": self.name, **asdict(self)}


@dataclass(frozen=True)
class SecretLoaded(Event):
    """The shadow secret is in hand (``source`` is ``"ums"`` or ``"file"``)."""

    name: ClassVar[str] = "secret"
    source: str
    device_host: str
    device_port: int
    certificate_sha256: str


@dataclass(frozen=True)
class Pinned(Event):
    """TLS to the device is up and the device presented the pinned certificate."""

    name: ClassVar[str] = "pinned"
    device_host: str
    device_port: int
    tls_version: str
    cipher: str
    certificate_sha256: str


@dataclass(frozen=True)
class Listening(Event):
    """The local listener for the viewer is open (``host`` is never ``::1``)."""

    name: ClassVar[str] = "listening"
    host: str
    port: int
    #: With a browser viewer (``--web``): the page a person opens and the WebSocket URL,
    #: both holding the single-use token. Absent from the JSON otherwise.
    url: str | None = None
    websocket: str | None = None
    #: True when the proxy enforces view-only (PROTOCOL.md section 7); absent otherwise.
    view_only: bool | None = None

    def as_dict(self) -> dict[str, Any]:
        return {k: v for k, v in super().as_dict().items() if v is not None}


@dataclass(frozen=True)
class ViewerStarted(Event):
    """A viewer process was launched; ``pid`` is its process id."""

    name: ClassVar[str] = "viewer-started"
    viewer: str
    pid: int


@dataclass(frozen=True)
class ViewerConnected(Event):
    """A viewer connected to the listener; ``peer`` is ``"host:port"``."""

    name: ClassVar[str] = "viewer-connected"
    peer: str


@dataclass(frozen=True)
class DeviceAccepted(Event):
    """The device accepted the one-time password and sent its RFB ProtocolVersion
    (RFC 6143 section 7.1.1): relaying starts. JSON name ``session-started`` (the contract's)."""

    name: ClassVar[str] = "session-started"
    rfb_version: str
    #: True when the proxy enforces view-only; absent from the JSON otherwise.
    view_only: bool | None = None

    def as_dict(self) -> dict[str, Any]:
        return {k: v for k, v in super().as_dict().items() if v is not None}


#: The contract's name for :class:`DeviceAccepted`, kept for embedders.
SessionStarted = DeviceAccepted


@dataclass(frozen=True)
class Closed(Event):
    """The session ended; byte counts are RFB payload bytes, ``duration_s`` in seconds."""

    name: ClassVar[str] = "closed"
    reason: str
    bytes_to_viewer: int = 0
    bytes_to_device: int = 0
    duration_s: float = 0.0


@dataclass(frozen=True)
class ViewerClosed(Event):
    """One viewer's session ended and the listener waits for the next one
    (``max_viewers`` > 1). Byte counts are this viewer's."""

    name: ClassVar[str] = "viewer-closed"
    reason: str
    bytes_to_viewer: int = 0
    bytes_to_device: int = 0


@dataclass(frozen=True)
class Error(Event):
    """A failure; ``code`` is one of the contract's error codes."""

    name: ClassVar[str] = "error"
    code: str
    message: str


@dataclass(frozen=True)
class WarningEvent(Event):
    """Something the user should know that does not stop the session (e.g. ``--ums-insecure``)."""

    name: ClassVar[str] = "warning"
    message: str
    details: dict[str, Any] = field(default_factory=dict)


EventSink = Callable[[Event], None]


def discard(event: Event) -> None:
    """An :data:`EventSink` that ignores everything."""
