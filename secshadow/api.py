"""The embedding API: shadow devices from a Python program's own reactor.

::

    from secshadow.api import IMISource, StaticSecret, start_shadowing
    from secshadow.options import SessionOptions

    shadowing = start_shadowing(reactor, IMISource(reactor, url, "27", "admin", password, trust),
                                SessionOptions(view_only=True), on_event=print, viewer=None)
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

import os
import pwd
import time
from typing import TYPE_CHECKING, Any, Protocol as TypingProtocol

from twisted.internet.defer import CancelledError, Deferred, fail, succeed
from twisted.internet.interfaces import IStreamServerEndpoint
from twisted.logger import Logger
from twisted.python.failure import Failure

from secshadow import events
from secshadow.errors import SecretError, SecShadowError
from secshadow.options import SessionOptions
from secshadow.proxy import ShadowSession, ViewerLauncher
from secshadow.reactor import SessionReactor
from secshadow.secret import ShadowSecret
from secshadow.tunnel import DeviceDialer

if TYPE_CHECKING:  # imported when used: the CLI's start stays light
    from secshadow.audit import AuditLog
    from secshadow.umstrust import UMSTrust

log = Logger()


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

    def __init__(self, reactor: SessionReactor, base_url: str, device_id: str, user: str, password: str,
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
    :class:`SecShadowError`. :meth:`stop` ends it cleanly in any state, also while the
    secret is being fetched (``done`` then fires with a ``Closed`` whose ``reason`` is
    the one given). ``session`` is the underlying :class:`ShadowSession` once the secret
    is in hand (``None`` before)."""

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
    reactor: SessionReactor,
    source: SecretSource | ShadowSecret,
    options: SessionOptions | None = None,
    *,
    on_event: events.EventSink = events.discard,
    viewer: ViewerLauncher | None = None,
    viewer_name: str | None = None,
    viewer_endpoint: IStreamServerEndpoint | None = None,
    dialer: DeviceDialer | None = None,
    audit: AuditLog | None = None,
) -> Shadowing:
    """Start shadowing one device; returns a :class:`Shadowing` at once.

    ``source``: a :class:`SecretSource` or a :class:`ShadowSecret` (taken as a
    :class:`StaticSecret`). ``options``: :class:`~secshadow.options.SessionOptions`
    (validated on construction; ``SessionOptions.from_mapping`` builds them from loose
    values). ``viewer``: called with the listener's (host, port) to launch a viewer, or
    ``None`` to connect your own; ``viewer_name`` names it in the audit record.
    ``viewer_endpoint``: the viewer side (default: ``options.listen``; the browser bridge
    is one). ``dialer``: the device side (default: :class:`~secshadow.gateway.route.RoutedDialer`,
    TCP unless the secret names a gateway).
    ``audit``: an :class:`~secshadow.audit.AuditLog` that gets one line for this
    shadowing once its secret was fetched, however it ends.
    Events: ``secret`` (each fetch), then the session's.
    """
    options = options or SessionOptions()
    if dialer is None:
        from secshadow.gateway.route import RoutedDialer

        dialer = RoutedDialer(reactor)
    if isinstance(source, ShadowSecret):
        source = StaticSecret(source)
    handle = Shadowing()
    record = _AuditTrail(source, options, viewer_name or ("custom" if viewer else "none"), audit)

    def announce(secret: ShadowSecret, host: str, port: int) -> ShadowSecret:
        on_event(events.SecretLoaded(source=source.name, device_host=host, device_port=port,
                                     certificate_sha256=secret.certificate_sha256))
        return secret

    def begin(secret: ShadowSecret) -> Deferred[events.Closed]:
        handle.secret_fetch = None
        session = ShadowSession(reactor, secret, options, on_event=on_event, launch_viewer=viewer,
                                viewer_endpoint=viewer_endpoint, dialer=dialer,
                                refresh_secret=refresh if source.refreshable else None)
        record.began(session, secret)
        announce(secret, session.device_host, session.device_port)
        handle.session = session
        if handle.stop_reason is not None:
            session.stop(handle.stop_reason)
        return session.start()

    def refresh() -> Deferred[ShadowSecret]:
        assert handle.session is not None
        return source.fetch().addCallback(announce, handle.session.device_host, handle.session.device_port)

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
    fetching.addCallback(begin).addErrback(interrupted).addBoth(record.ended).chainDeferred(handle.done)
    return handle


class _AuditTrail:
    """Collects one shadowing's audit record (PROTOCOL.md section 8) and writes it when
    the shadowing ends, whatever ended it, once the secret was fetched."""

    def __init__(self, source: SecretSource, options: SessionOptions, viewer: str, audit: AuditLog | None) -> None:
        self._source, self._options, self._viewer, self._audit = source, options, viewer, audit
        self._session: ShadowSession | None = None
        self._secret: ShadowSecret | None = None
        self._start = time.time()

    def began(self, session: ShadowSession, secret: ShadowSecret) -> None:
        self._session, self._secret = session, secret

    def ended(self, result: Any) -> Any:
        if self._audit is None or self._session is None or self._secret is None:
            return result
        if isinstance(result, Failure):
            error = result.value
            code = error.code if isinstance(error, SecShadowError) else "internal"
            reason = error.message if isinstance(error, SecShadowError) else type(error).__name__
        else:
            code, reason = "ok", getattr(result, "reason", "")
        from secshadow.audit import AuditRecord, now_iso

        to_viewer, to_device = self._session.bytes_relayed
        end = time.time()
        try:
            self._audit.write(AuditRecord(
                start=now_iso(self._start), end=now_iso(end), duration_s=round(end - self._start, 3),
                os_user=_os_user(), ums_user=getattr(self._source, "user", None),
                device_id=getattr(self._source, "device_id", None) or self._secret.device_id,
                device_host=self._session.device_host, device_port=self._session.device_port,
                certificate_sha256=self._secret.certificate_sha256, transport=self._session.transport,
                viewer=self._viewer, view_only=self._options.view_only, bytes_to_viewer=to_viewer,
                bytes_to_device=to_device, result=code, reason=reason))
        except (OSError, SecShadowError) as e:
            # The session's own outcome stands; the lost record is said loudly.
            log.error("could not write the audit record: {error}", error=str(e))
        return result


def _os_user() -> str:
    try:
        return pwd.getpwuid(os.geteuid()).pw_name
    except KeyError:
        return str(os.geteuid())
