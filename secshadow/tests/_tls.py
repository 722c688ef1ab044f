"""In-memory real TLS for unit tests: a pinned client against a pyOpenSSL server.

As in Twisted's own ``test_sslverify.py``: ``TLSMemoryBIOFactory`` on both sides,
``iosim.connectedServerAndClient`` moving the bytes, so the handshake is OpenSSL's.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from OpenSSL import SSL
from twisted.internet.interfaces import IOpenSSLServerConnectionCreator
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.test.iosim import connectedServerAndClient
from zope.interface import implementer

from secshadow.lab import certs
from secshadow.pinning import PinnedConnectionCreator, TLSProfile
from secshadow.tunnel import DeviceLink


@implementer(IOpenSSLServerConnectionCreator)
class ServerCreator:
    """A device-like TLS server: given cert/key PEM, cipher string, version range."""

    def __init__(self, cert_pem: bytes | None, key_pem: bytes | None, ciphers: bytes = b"DEFAULT",
                 max_version: int = SSL.TLS1_3_VERSION, min_version: int = SSL.TLS1_2_VERSION) -> None:
        self.cert_pem, self.key_pem = cert_pem, key_pem
        self.ciphers, self.max_version, self.min_version = ciphers, max_version, min_version

    def serverConnectionForTLS(self, tlsProtocol: Any) -> SSL.Connection:
        context = SSL.Context(SSL.TLS_SERVER_METHOD)
        context.set_min_proto_version(self.min_version)
        context.set_max_proto_version(self.max_version)
        context.set_cipher_list(self.ciphers)
        if self.cert_pem is not None and self.key_pem is not None:
            context.use_certificate(x509.load_pem_x509_certificate(self.cert_pem))
            context.use_privatekey(serialization.load_pem_private_key(self.key_pem, None))
        return SSL.Connection(context, None)


@dataclass
class RecordingServer(Protocol):
    """Records the application bytes the server side ever receives."""

    received: bytearray = field(default_factory=bytearray)

    def dataReceived(self, data: bytes) -> None:
        self.received += data


from secshadow.lab.certs import der_of  # noqa: E402,F401 - re-exported for the tests


@dataclass
class Handshake:
    """Result of :func:`pinned_pair`: the client link, the server's recorder, the pump,
    and the errors the link's ``ready`` Deferred failed with."""

    link: DeviceLink
    server: RecordingServer
    pump: Any
    errors: list[BaseException]
    clock: Clock

    def flush(self) -> None:
        """Deliver buffered writes (Twisted aggregates small TLS writes per reactor turn)."""
        self.clock.advance(0)
        self.pump.flush()


def pinned_pair(pinned_der: bytes, server: ServerCreator, profile: TLSProfile = TLSProfile.MODERN) -> Handshake:
    """Run a pinned handshake in memory against ``server``."""
    creator = PinnedConnectionCreator(pinned_der, profile)
    recorder = RecordingServer()
    links: list[DeviceLink] = []
    errors: list[BaseException] = []

    def make_link() -> DeviceLink:
        link = DeviceLink(pinned_der, profile)
        assert link.ready is not None
        link.ready.addErrback(lambda f: errors.append(f.value))
        links.append(link)
        return link

    clock = Clock()
    client_factory = TLSMemoryBIOFactory(creator, True, Factory.forProtocol(make_link), clock=clock)
    server_factory = TLSMemoryBIOFactory(server, False, Factory.forProtocol(lambda: recorder), clock=clock)
    _, _, pump = connectedServerAndClient(
        lambda: server_factory.buildProtocol(None), lambda: client_factory.buildProtocol(None)
    )
    pump.flush()
    return Handshake(links[0], recorder, pump, errors, clock)


def device_cert(**kwargs: Any) -> tuple[bytes, bytes]:
    return certs.generate_self_signed(**kwargs)
