"""Which way a session reaches its device: TCP, or through a gateway relay.

:class:`RoutedDialer` is the session's :class:`~secshadow.tunnel.DeviceDialer` in the
CLI, control mode and the API: TCP to the device's address, unless ``--gateway`` (and
its token) or the secret's ``"gateway": {"url", "token"}`` name a relay (PROTOCOL.md
section 6), in which case the pinned TLS runs inside the gateway's WebSocket stream.
The gateway's WebSocket client (autobahn) is imported only when a route is used.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from twisted.internet.defer import Deferred

from secshadow.errors import UsageError
from secshadow.pinning import TLSProfile
from secshadow.secret import ShadowSecret
from secshadow.tunnel import DeviceLink, connect_pinned

if TYPE_CHECKING:
    from secshadow.umstrust import UMSTrust


class RoutedDialer:
    """TCP, or the gateway the flags or the secret name (the flags win).

    ``url``: the console leg's ``wss://GATEWAY/v1/sessions/{sid}/console``; ``token``:
    its JWT (from ``--gateway-token-file``; never on argv); ``ca_file`` /
    ``fingerprint``: how the gateway's web certificate is trusted (default: the
    system's CA store with the host-name check). Raises :class:`UsageError` at
    construction for bad trust flags, and from :meth:`__call__` when a route has no
    token. A gateway token is single use: a reconnect needs a fresh secret.
    """

    def __init__(self, reactor: Any, *, url: str | None = None, token: str | None = None,
                 ca_file: str | None = None, fingerprint: str | None = None) -> None:
        if token is not None and url is None:
            raise UsageError("--gateway-token-file needs --gateway URL (or a secret that names the gateway)")
        self._reactor = reactor
        self._url, self._token = url, token
        self._trust_flags = (ca_file, fingerprint)
        # Bad trust flags fail now; the trust itself (and twisted.web) loads when a route is used.
        self._trust: UMSTrust | None = None if ca_file is None and fingerprint is None else \
            _gateway_trust(ca_file, fingerprint)
        #: What the last dial used: ``"tcp"`` or ``"gateway"`` (the audit record's ``transport``).
        self.transport = "gateway" if url else "tcp"

    def __call__(self, secret: ShadowSecret, host: str, port: int, profile: TLSProfile,
                 timeout: float) -> Deferred[DeviceLink]:
        route = secret.gateway
        url = self._url or (route.url if route is not None else None)
        if url is None:
            self.transport = "tcp"
            return connect_pinned(self._reactor, host, port, secret.certificate_der, profile, timeout)
        token = self._token or (route.token.reveal() if route is not None else None)
        if not token:
            raise UsageError("--gateway needs --gateway-token-file FILE (or a secret whose 'gateway' carries "
                             "a token)")
        from secshadow.gateway.dialer import gateway_endpoint_factory

        self.transport = "gateway"
        if self._trust is None:
            self._trust = _gateway_trust(*self._trust_flags)
        factory = gateway_endpoint_factory(self._reactor, url, token, self._trust)
        return connect_pinned(self._reactor, host, port, secret.certificate_der, profile, timeout, factory)

    def __repr__(self) -> str:
        return f"RoutedDialer(url={self._url!r}, token={'<redacted>' if self._token else None})"


def _gateway_trust(ca_file: str | None, fingerprint: str | None) -> UMSTrust:
    if ca_file is None and fingerprint is None:
        from secshadow.umstrust import UMSTrust

        return UMSTrust.system()
    from secshadow.gateway.dialer import gateway_trust

    return gateway_trust(ca_file, fingerprint)
