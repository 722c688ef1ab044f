"""Sessions and their two legs: reservation, pairing, limits, ending (sans-IO).

The gateway's decisions live here, apart from the WebSocket code (``server.py``), so
they can be driven by a ``task.Clock`` and fake legs in unit tests:

- :meth:`Registry.reserve` at the upgrade: a role already held -> 409; a new session
  beyond ``max_sessions`` -> 503; a session that is closing -> 409. The first
  reservation creates the session and starts its pairing timer.
- :meth:`Registry.opened` once the upgrade is answered; when both legs are open the
  legs are joined (each one's reader becomes the other's producer: backpressure) and
  each is sent ``{"type": "paired"}``.
- no second leg within ``pairing_timeout`` seconds -> the waiting leg is closed with
  4408. Before pairing the legs are independent: one leaving frees its role only.
- after pairing, the first leg to go closes the other (1000 if it closed cleanly, 1001
  if it was dropped); ``max_duration`` / ``max_bytes`` end the session with 4410 / 4413.
- when no leg is left the session is forgotten and a ``closed`` event reports its bytes
  each way, its duration and the close code that ended it.

States: ``waiting`` -> ``paired`` -> ``closing`` -> (forgotten); ``waiting`` -> ``closing``
on the pairing timeout. No token ever reaches this module.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Callable, ClassVar, Protocol

from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger

from secshadow.events import Event
from secshadow.gateway import wire
from secshadow.gateway.wire import Refusal

log = Logger(namespace="secshadow.gateway")


# -- events (``secshadow-gateway --json``) ----------------------------------------


@dataclass(frozen=True)
class GatewayListening(Event):
    """The gateway listens; ``tls`` is false only with ``--plaintext`` (behind a TLS front)."""

    name: ClassVar[str] = "gateway-listening"
    host: str
    port: int
    tls: bool


@dataclass(frozen=True)
class LegRefused(Event):
    """An upgrade was refused with HTTP ``status`` (``sid``/``role`` empty when the path
    was not a leg path)."""

    name: ClassVar[str] = "refused"
    sid: str
    role: str
    status: int
    reason: str
    peer: str


@dataclass(frozen=True)
class SessionPaired(Event):
    """Both legs of ``sid`` are there; ``wait_s``: how long the first one waited."""

    name: ClassVar[str] = "paired"
    sid: str
    wait_s: float


@dataclass(frozen=True)
class SessionClosed(Event):
    """Session ``sid`` is over and forgotten. ``duration_s``: from pairing (from the first
    leg when it never paired); ``close_code``: the WebSocket close code that ended it
    (1006: a leg dropped without one); ``closed_by``: ``console``, ``device`` or ``gateway``."""

    name: ClassVar[str] = "closed"
    sid: str
    paired: bool
    duration_s: float
    bytes_console_to_device: int
    bytes_device_to_console: int
    close_code: int
    closed_by: str
    reason: str


EventSink = Callable[[Event], None]


class Leg(Protocol):
    """What the registry needs of one leg's connection (``server.GatewayLeg``)."""

    role: str

    def send_paired(self) -> None:
        """Send the ``{"type": "paired"}`` text message."""

    def join(self, peer: Leg) -> None:
        """Relay further binary messages to ``peer``; make ``peer``'s reader this leg's
        producer (backpressure)."""

    def close(self, code: int, reason: str) -> None:
        """Start the WebSocket closing handshake with ``code`` (reading resumes first)."""

    def abort(self) -> None:
        """Drop the connection now."""


class State(enum.Enum):
    WAITING = "waiting"
    PAIRED = "paired"
    CLOSING = "closing"


class Session:
    """One session id's state. ``bytes_from``: payload bytes received from each role."""

    def __init__(self, sid: str, created: float) -> None:
        self.sid = sid
        self.state = State.WAITING
        self.created = created
        self.paired_at: float | None = None
        self.legs: dict[str, Leg] = {}
        self.open: set[str] = set()
        self.bytes_from = {"console": 0, "device": 0}
        self.timer: IDelayedCall | None = None
        # Why each leg is being closed, when the gateway closed it: role -> (code, reason).
        self.initiated: dict[str, tuple[int, str]] = {}
        self.close_code: int | None = None
        self.closed_by = ""
        self.reason = ""

    def peer(self, role: str) -> Leg | None:
        return self.legs.get("device" if role == "console" else "console")

    def __repr__(self) -> str:
        return f"Session(sid={self.sid!r}, state={self.state.value}, legs={sorted(self.legs)})"


class Registry:
    """All sessions of one gateway process.

    ``clock``: ``IReactorTime`` (timers). ``on_event``: receives :class:`SessionPaired`
    and :class:`SessionClosed`. ``pairing_timeout``, ``max_duration``: seconds (0: no
    duration limit). ``max_sessions``: sessions at once, waiting or paired.
    ``max_bytes``: payload bytes per session, both ways together (0: no limit).
    """

    def __init__(
        self,
        clock: IReactorTime,
        on_event: EventSink,
        *,
        pairing_timeout: float = wire.PAIRING_TIMEOUT,
        max_sessions: int = 10_000,
        max_duration: float = 0.0,
        max_bytes: int = 0,
    ) -> None:
        self._clock = clock
        self._emit = on_event
        self.pairing_timeout = pairing_timeout
        self.max_sessions = max_sessions
        self.max_duration = max_duration
        self.max_bytes = max_bytes
        self.sessions: dict[str, Session] = {}

    # -- the upgrade -----------------------------------------------------------

    def check(self, sid: str, role: str) -> None:
        """Raise :class:`Refusal` (409, 503) if ``role`` of ``sid`` could not be reserved now."""
        session = self.sessions.get(sid)
        if session is None:
            if len(self.sessions) >= self.max_sessions:
                raise Refusal(503, "gateway at its session limit")
            return
        if session.state is not State.WAITING:
            raise Refusal(409, "session already paired or closing")
        if role in session.legs:
            raise Refusal(409, "role already connected")

    def reserve(self, sid: str, role: str, leg: Leg) -> Session:
        """Hold ``role`` of ``sid`` for ``leg`` (called when the upgrade is accepted).

        Raises :class:`Refusal` as :meth:`check` does. Starts the pairing timer when this
        creates the session.
        """
        self.check(sid, role)
        session = self.sessions.get(sid)
        if session is None:
            session = Session(sid, self._clock.seconds())
            self.sessions[sid] = session
            session.timer = self._clock.callLater(self.pairing_timeout, self._pairing_timed_out, session)
        session.legs[role] = leg
        return session

    def opened(self, session: Session, role: str) -> None:
        """``role``'s upgrade was answered (WebSocket open): pair if both are open."""
        leg = session.legs.get(role)
        if leg is None:
            return
        session.open.add(role)
        if session.state is State.CLOSING:
            code, reason = session.close_code or wire.CLOSE_GOING_AWAY, session.reason or "session closing"
            self._gateway_close(session, role, code, reason)
            return
        if session.open == {"console", "device"} and session.state is State.WAITING:
            self._pair(session)

    # -- traffic and policy ----------------------------------------------------

    def relayed(self, session: Session, role: str, count: int) -> None:
        """``count`` payload bytes from ``role`` were relayed; enforces ``max_bytes``."""
        session.bytes_from[role] += count
        if self.max_bytes and session.state is State.PAIRED:
            if session.bytes_from["console"] + session.bytes_from["device"] > self.max_bytes:
                self._end(session, wire.CLOSE_SESSION_BYTES, "session byte limit reached")

    def violation(self, session: Session, role: str, code: int, reason: str) -> None:
        """``role`` broke the protocol (e.g. binary before ``paired``): close it with ``code``."""
        log.info("session {sid}: closing the {role} ({code}): {reason}", sid=session.sid, role=role,
                 code=code, reason=reason)
        self._gateway_close(session, role, code, reason)

    def silent(self, session: Session, role: str, seconds: float) -> None:
        """``role`` sent nothing for ``seconds``: drop it (the other leg follows if paired)."""
        leg = session.legs.get(role)
        if leg is None:
            return
        log.info("session {sid}: the {role} was silent for {s:g} s; dropping it", sid=session.sid,
                 role=role, s=seconds)
        session.initiated.setdefault(role, (wire.CLOSE_GOING_AWAY, f"silent for {seconds:g} s"))
        leg.abort()

    def gone(self, session: Session, role: str, code: int, reason: str) -> None:
        """``role``'s connection is lost; ``code``/``reason``: as its close handshake said
        (1006 when it was dropped). Closes the peer after pairing; forgets the session
        once no leg is left."""
        if session.legs.pop(role, None) is None:
            return
        session.open.discard(role)
        by = role
        if role in session.initiated:
            code, reason = session.initiated.pop(role)
            by = "gateway"
        if session.state is State.WAITING or session.close_code is None:
            session.close_code, session.reason, session.closed_by = code, reason, by
        if session.state is State.PAIRED:
            session.state = State.CLOSING
            self._cancel_timer(session)
            peer_role = "device" if role == "console" else "console"
            if peer_role in session.legs:
                clean = code in (wire.CLOSE_NORMAL,)
                session.legs[peer_role].close(
                    wire.CLOSE_NORMAL if clean else wire.CLOSE_GOING_AWAY,
                    f"the {role} closed" if clean else f"the {role} is gone",
                )
        if not session.legs:
            self._forget(session)

    def stop(self) -> None:
        """The gateway is shutting down: close every leg with 1001."""
        for session in list(self.sessions.values()):
            self._end(session, wire.CLOSE_GOING_AWAY, "gateway shutting down")

    # -- internals -------------------------------------------------------------

    def _pair(self, session: Session) -> None:
        self._cancel_timer(session)
        now = self._clock.seconds()
        session.state = State.PAIRED
        session.paired_at = now
        console, device = session.legs["console"], session.legs["device"]
        console.join(device)
        device.join(console)
        console.send_paired()
        device.send_paired()
        log.info("session {sid}: paired after {wait:.3f} s", sid=session.sid, wait=now - session.created)
        self._emit(SessionPaired(sid=session.sid, wait_s=round(now - session.created, 3)))
        if self.max_duration > 0:
            session.timer = self._clock.callLater(self.max_duration, self._expired, session)

    def _pairing_timed_out(self, session: Session) -> None:
        session.timer = None
        if session.state is not State.WAITING:
            return
        log.info("session {sid}: no second leg within {s:g} s (4408)", sid=session.sid, s=self.pairing_timeout)
        self._end(session, wire.CLOSE_PAIRING_TIMEOUT, "pairing timeout")

    def _expired(self, session: Session) -> None:
        session.timer = None
        self._end(session, wire.CLOSE_SESSION_EXPIRED, "session duration limit reached")

    def _end(self, session: Session, code: int, reason: str) -> None:
        """The gateway ends ``session``: every leg is closed with ``code``."""
        if session.close_code is None or session.state is not State.CLOSING:
            session.close_code, session.reason, session.closed_by = code, reason, "gateway"
        session.state = State.CLOSING
        self._cancel_timer(session)
        for role in list(session.legs):
            self._gateway_close(session, role, code, reason)

    def _gateway_close(self, session: Session, role: str, code: int, reason: str) -> None:
        leg = session.legs.get(role)
        if leg is None:
            return
        session.initiated.setdefault(role, (code, reason))
        if role in session.open:
            leg.close(code, reason)
        else:
            leg.abort()  # still in the opening handshake: nothing to say to it

    def _cancel_timer(self, session: Session) -> None:
        if session.timer is not None and session.timer.active():
            session.timer.cancel()
        session.timer = None

    def _forget(self, session: Session) -> None:
        self._cancel_timer(session)
        if self.sessions.get(session.sid) is session:
            del self.sessions[session.sid]
        now = self._clock.seconds()
        start = session.paired_at if session.paired_at is not None else session.created
        code = session.close_code if session.close_code is not None else wire.CLOSE_ABNORMAL
        log.info(
            "session {sid}: closed ({code}, {reason}, by {by}) after {duration:.3f} s; "
            "{c2d} bytes console->device, {d2c} bytes device->console",
            sid=session.sid, code=code, reason=session.reason, by=session.closed_by or "?",
            duration=now - start, c2d=session.bytes_from["console"], d2c=session.bytes_from["device"],
        )
        self._emit(SessionClosed(
            sid=session.sid,
            paired=session.paired_at is not None,
            duration_s=round(now - start, 3),
            bytes_console_to_device=session.bytes_from["console"],
            bytes_device_to_console=session.bytes_from["device"],
            close_code=code,
            closed_by=session.closed_by,
            reason=session.reason,
        ))
