"""The embedding API: shadow devices from a Python program's own reactor.

::

    from secshadow.api import IMISource, StaticSecret, start_shadowing

    shadowing = start_shadowing(reactor, IMISource(reactor, url, "27", "admin", password, trust),
                                on_event=print, viewer=None)
    closed = await shadowing.done        # a secshadow.events.Closed
    # or: await shadowing.stop("console closed the tab")

One call does what ``secshadow-proxy`` does for one device: fetch the secret,
connect and pin, listen, (launch the viewer), relay, close. Every step is reported
as a typed :mod:`secshadow.events` object, the same objects the CLI prints as JSON.
Several shadowings run side by side in one reactor; each has its own listener.
``done`` fails with a :class:`secshadow.errors.SecShadowError` subclass whose
``code`` / ``exit_code`` are the CLI's.
"""

from __future__ import annotations

from typing import Any, Protocol as TypingProtocol

from twisted.internet.defer import CancelledError, Deferred, fail, succeed
from twisted.python.failure import Failure

from secshadow import events
from secshadow.errors import SecretError, SecShadowError, UsageError
from secshadow.proxy import SessionOptions, ShadowSession, ViewerLauncher
from secshadow.secret import ShadowSecret
from secshadow.umstrust import UMSTrust

#: The device's TLS port when neither the caller nor the secret names one.
DEFAULT_DEVICE_PORT = 5900


class SecretSource(TypingProtocol):
    """Where shadow secrets come from. ``name`` is the ``secret`` event's ``source``
    (``"file"`` or ``"ums"``); ``refreshable`` says whether :meth:`fetch` can be
    called again for a fresh one-time password."""

    name: str
    refreshable: bool

    def fetch(self) -> Deferred[ShadowSecret]: ...


class StaticSecret:
    """A secret already in hand (from a file, stdin, or the console's own IMI call).

    Its password works once, so :meth:`fetch` succeeds once; a second call fails with
    :class:`SecretError` saying so.
    """

    name = "file"
    refreshable = False

    def __init__(self, secret: ShadowSecret) -> None:
        self._secret: ShadowSecret | None = secret

    def fetch(self) -> Deferred[ShadowSecret]:
        secret, self._secret = self._secret, None
        if secret is None:
            return fail(SecretError(
                "the one-time password of this secret was already used; a new session needs a fresh "
                "secret from the UMS"))
        return succeed(secret)

    def __repr__(self) -> str:
        return f"StaticSecret({self._secret!r})"


class IMISource:
    """Fetches a fresh secret from an IMI server for every :meth:`fetch`
    (``secshadow.imi.fetch_shadow_secret``: login, ``?facets=shadow``, logout).

    ``password``: the IMI user's password (kept in memory only; never in ``repr``).
    ``trust``: a :class:`~secshadow.umstrust.UMSTrust`. ``timeout``: seconds per request.
    """

    name = "ums"
    refreshable = True

    def __init__(self, reactor: Any, base_url: str, device_id: str, user: str, password: str,
                 trust: UMSTrust, timeout: float = 30.0) -> None:
        self._reactor = reactor
        self.base_url, self.device_id, self.user, self.trust = base_url, device_id, user, trust
        self._password = password
        self.timeout = timeout

    def fetch(self) -> Deferred[ShadowSecret]:
        from secshadow.imi import fetch_shadow_secret

        return fetch_shadow_secret(self._reactor, self.base_url, self.device_id, self.user,
                                   self._password, self.trust, timeout=self.timeout)

    def __repr__(self) -> str:
        return f"IMISource({self.base_url!r}, device={self.device_id!r}, user={self.user!r}, {self.trust!r})"


class Shadowing:
    """A running shadowing. ``done`` fires with the final :class:`events.Closed` once
    sockets are closed, the listener released and the viewer reaped, or fails with a
    :class:`SecShadowError`. :meth:`stop` ends it cleanly (``done`` then fires with a
    ``Closed`` whose ``reason`` is the one given). ``session`` is the underlying
    :class:`ShadowSession` once the secret is in hand (``None`` before)."""

    def __init__(self) -> None:
        self.done: Deferred[events.Closed] = Deferred()
        self.session: ShadowSession | None = None
        self.secret_fetch: Deferred[ShadowSecret] | None = None
        self.stop_reason: str | None = None

    def stop(self, reason: str = "stopped") -> Deferred[events.Closed]:
        """End the shadowing now; returns ``done``."""
        if self.stop_reason is None:
            self.stop_reason = reason
            if self.session is not None:
                self.session.stop(reason)
            elif self.secret_fetch is not None:
                self.secret_fetch.cancel()
        return self.done

    @property
    def state(self) -> str:
        """``"fetching"`` before the secret arrived, then the session's state name."""
        return "fetching" if self.session is None else self.session.state.value


def start_shadowing(
    reactor: Any,
    source: SecretSource | ShadowSecret,
    *,
    on_event: events.EventSink = events.discard,
    viewer: ViewerLauncher | None = None,
    device_host: str | None = None,
    device_port: int | None = None,
    **session_options: Any,
) -> Shadowing:
    """Start shadowing one device; returns a :class:`Shadowing` at once.

    ``source``: a :class:`SecretSource` or a :class:`ShadowSecret` (taken as a
    :class:`StaticSecret`). ``device_host``/``device_port`` override the secret's
    ``lastIP``/port (default port 5900). ``session_options``: any other
    :class:`~secshadow.proxy.SessionOptions` field (``tls_profile``, ``listen``,
    ``max_viewers``, timeouts in seconds, ...). ``viewer``: called with the listener's
    (host, port) to launch a viewer, or ``None`` to connect your own.
    Events: ``secret`` (each fetch), then the session's. Bad options fail ``done``
    with :class:`UsageError`.
    """
    if isinstance(source, ShadowSecret):
        source = StaticSecret(source)
    handle = Shadowing()
    if "device_host" in session_options or "device_port" in session_options:
        raise UsageError("pass device_host/device_port as keyword arguments of start_shadowing")

    def announce(secret: ShadowSecret, host: str, port: int) -> ShadowSecret:
        on_event(events.SecretLoaded(source=source.name, device_host=host, device_port=port,
                                     certificate_sha256=secret.certificate_sha256))
        return secret

    def begin(secret: ShadowSecret) -> Deferred[events.Closed]:
        handle.secret_fetch = None
        host = device_host or secret.host
        if not host:
            raise UsageError("the secret names no device address (no lastIP/host): pass a device host")
        port = device_port or secret.port or DEFAULT_DEVICE_PORT
        try:
            options = SessionOptions(device_host=host, device_port=port, **session_options)
        except TypeError as e:
            raise UsageError(f"unknown session option: {e}") from None
        announce(secret, host, port)

        def refresh() -> Deferred[ShadowSecret]:
            return source.fetch().addCallback(announce, host, port)

        session = ShadowSession(reactor, secret, options, on_event=on_event, launch_viewer=viewer,
                                refresh_secret=refresh if source.refreshable else None)
        handle.session = session
        if handle.stop_reason is not None:
            session.stop(handle.stop_reason)
        return session.start()

    def interrupted(failure: Failure) -> Any:
        # Stopped while fetching: whatever the fetch reported, the caller stopped it.
        if handle.stop_reason is not None and handle.session is None and failure.check(
                CancelledError, SecShadowError):
            closed = events.Closed(reason=handle.stop_reason)
            on_event(closed)
            return closed
        return failure

    fetching = source.fetch()
    handle.secret_fetch = fetching
    fetching.addCallback(begin).addErrback(interrupted).chainDeferred(handle.done)
    return handle
