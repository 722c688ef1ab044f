"""How the UMS web certificate is trusted: ``--ums-ca``, ``--ums-fingerprint``, ``--ums-insecure``.

The IMI response carries the device pin and the one-time password, so the HTTPS
connection to the UMS must be authenticated (``docs/protocol.md`` section 1). A
:class:`UMSTrust` is an ``IPolicyForHTTPS``: pass it as ``contextFactory`` to
:class:`twisted.web.client.Agent` (and so to treq's ``HTTPClient``).

Modes (build one from the three flags with :meth:`UMSTrust.from_flags`):

- **CA** (:meth:`UMSTrust.from_ca_file`): the chain must verify against the PEM
  file's certificates (any of them is a trust anchor, so the file may also hold the
  UMS certificate itself), and the leaf must carry a subjectAltName matching the
  host of the URL. Twisted's ``optionsForClientTLS`` with a private trust root only
  *logs* service-identity's ``CertificateError`` for a SAN-less certificate and lets
  the connection through (``docs/protocol.md`` section 3); this module does its
  own check in the verify callback and fails the handshake.
- **Fingerprint** (:meth:`UMSTrust.from_fingerprint`): accept exactly the leaf
  certificate whose DER SHA-256 is given; chain, names and dates are ignored.
- **Insecure** (:meth:`UMSTrust.insecure`): no verification at all. The caller must
  warn loudly; this module only makes it possible.

Every connection gets a fresh OpenSSL context (no session resumption: a resumed
session skips the verify callback), a ``DEFAULT`` cipher string without anonymous
suites, TLS 1.2 at least, and a re-check of the peer certificate when the handshake
is done. A refused certificate fails the handshake with :class:`UMSError` as the
connection's loss reason, so it reaches the HTTP caller (inside
``ResponseNeverReceived.reasons``); :func:`find_ums_error` digs it out with
:func:`failure_causes`, the one walker over nested failures.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import os
import re
from typing import Any, Callable, cast

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding
from OpenSSL import SSL
from OpenSSL.crypto import X509, X509StoreFlags
from service_identity import CertificateError, VerificationError
from service_identity.cryptography import verify_certificate_hostname, verify_certificate_ip_address
from twisted.internet.interfaces import IOpenSSLClientConnectionCreator
from twisted.python.failure import Failure
from twisted.web.iweb import IPolicyForHTTPS
from zope.interface import implementer

from secshadow.errors import UMSError, UsageError
from secshadow.secret import certificate_fingerprint, format_fingerprint

#: ``DEFAULT`` already excludes anonymous and null suites; say so explicitly, because a
#: cipher string that admits ``aNULL`` lets a certificate-less MITM skip the verify
#: callback entirely (``docs/protocol.md`` section 3).
CIPHERS = b"DEFAULT:!aNULL:!eNULL"

_HEX = re.compile(r"^[0-9a-fA-F]{64}$")

# OpenSSL X509_V_ERR_* numbers most often seen with a private CA, for messages.
_VERIFY_ERRORS = {
    2: "the issuer certificate is not in --ums-ca",
    9: "the certificate is not yet valid",
    10: "the certificate has expired",
    18: "the certificate is self-signed and not in --ums-ca",
    19: "a self-signed certificate in the chain is not in --ums-ca",
    20: "the issuer is not in --ums-ca",
    21: "the chain cannot be verified (incomplete chain?)",
    26: "the certificate may not be used for TLS servers",
    62: "hostname mismatch",
}


def parse_fingerprint(text: str) -> bytes:
    """Parse a SHA-256 fingerprint: 64 hex digits, colons optional, any case -> 32 bytes.

    Raises :class:`UsageError` for a wrong length or non-hex characters.
    """
    if not isinstance(text, str):
        raise UsageError("--ums-fingerprint must be text")
    compact = text.strip().replace(":", "")
    if not _HEX.match(compact):
        raise UsageError(
            "--ums-fingerprint must be the SHA-256 of the UMS certificate: 64 hex digits, "
            "colons optional (e.g. from `openssl x509 -noout -fingerprint -sha256`)"
        )
    return bytes.fromhex(compact)



def _leaf_der(cert: X509) -> bytes:
    return cert.to_cryptography().public_bytes(Encoding.DER)


def _certificate_names(cert: x509.Certificate) -> list[str]:
    """The DNS and IP subjectAltNames of a certificate, for messages."""
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    names: list[str] = [str(n) for n in san.get_values_for_type(x509.DNSName)]
    names += [str(n) for n in san.get_values_for_type(x509.IPAddress)]
    return names


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


class _Check:
    """Per-connection verification state shared by the verify and info callbacks."""

    def __init__(self) -> None:
        self.leaf_accepted = False
        self.failed = False


@implementer(IOpenSSLClientConnectionCreator)
class _ConnectionCreator:
    """One ``IOpenSSLClientConnectionCreator`` per (host, port): a fresh context per connection."""

    def __init__(self, trust: UMSTrust, host: str) -> None:
        self._trust = trust
        self._host = host

    def clientConnectionForTLS(self, tlsProtocol: Any) -> SSL.Connection:
        trust = self._trust
        host = self._host
        check = _Check()

        def fail(message: str) -> None:
            if not check.failed:
                check.failed = True
                # Twisted's own client options report verification failures this way:
                # the Failure becomes the connection's loss reason.
                tlsProtocol.failVerification(Failure(UMSError(message)))

        def verify(conn: SSL.Connection, cert: X509, errno: int, depth: int, ok: int) -> bool:
            # Never let an exception escape into OpenSSL: it would be lost or printed.
            try:
                return trust._verify(host, cert, errno, depth, bool(ok), check, fail)
            except Exception as e:  # noqa: BLE001 - a bug here must refuse, not accept
                fail(f"the UMS certificate could not be checked: {type(e).__name__}")
                return False

        def info(conn: SSL.Connection, where: int, ret: int) -> None:
            if not where & SSL.SSL_CB_HANDSHAKE_DONE or trust.mode == "insecure":
                return
            # Belt and braces: the verify callback must have accepted the leaf that is
            # actually in place (it is not called for anonymous suites or resumptions).
            peer = conn.get_peer_certificate()
            if peer is None:
                fail("the UMS presented no certificate")
            elif not check.leaf_accepted:
                fail("the UMS certificate was never verified (resumed or anonymous session refused)")
            elif trust.mode == "fingerprint" and not trust._matches(_leaf_der(peer)):
                fail(trust._mismatch_message(_leaf_der(peer)))

        context = SSL.Context(SSL.TLS_CLIENT_METHOD)
        context.set_min_proto_version(SSL.TLS1_2_VERSION)
        context.set_options(SSL.OP_NO_TICKET | SSL.OP_NO_COMPRESSION)
        context.set_session_cache_mode(SSL.SESS_CACHE_OFF)
        context.set_cipher_list(CIPHERS)
        if trust.mode == "insecure":
            context.set_verify(SSL.VERIFY_NONE)
        else:
            if trust.mode == "system":
                context.set_default_verify_paths()
            elif trust.mode == "ca":
                assert trust.ca_file is not None
                context.load_verify_locations(trust.ca_file.encode())
                # Every certificate in the file is an anchor, even a non-self-signed leaf.
                store = context.get_cert_store()
                assert store is not None
                store.set_flags(X509StoreFlags.PARTIAL_CHAIN)
            context.set_verify(SSL.VERIFY_PEER | SSL.VERIFY_FAIL_IF_NO_PEER_CERT, verify)
            context.set_info_callback(info)
        connection = SSL.Connection(context, None)
        connection.set_app_data(tlsProtocol)
        if not _is_ip(host):
            connection.set_tlsext_host_name(host.encode("idna"))
        return connection


@implementer(IPolicyForHTTPS)
class UMSTrust:
    """How to trust the UMS web certificate; an ``IPolicyForHTTPS`` for treq/Agent.

    Build one with :meth:`from_flags` (the flags as given), or :meth:`from_ca_file`,
    :meth:`from_fingerprint`, :meth:`system` or :meth:`insecure`.
    ``mode`` is ``"ca"``, ``"system"`` (the platform's CA store, the default when no
    flag is given), ``"fingerprint"`` or ``"insecure"``. Refusals surface as
    :class:`UMSError` (see :func:`find_ums_error`).
    """

    def __init__(self, mode: str, *, ca_file: str | None = None, fingerprint: bytes | None = None) -> None:
        if mode not in ("ca", "system", "fingerprint", "insecure"):
            raise UsageError(f"unknown UMS trust mode {mode!r}")
        self.mode = mode
        self.ca_file = ca_file
        self._fingerprint = fingerprint

    @classmethod
    def from_flags(cls, ca: str | None, fingerprint: str | None, insecure: bool) -> UMSTrust:
        """The trust the flags ask for: ``--ums-ca FILE``, ``--ums-fingerprint HEX`` or
        ``--ums-insecure``; with none of them, the platform's CA store (:meth:`system`).

        ``ca`` / ``fingerprint``: the flag's value, ``None`` when absent (an empty
        string is a given, malformed value). Raises :class:`UsageError` when more than
        one is given, and as :meth:`from_ca_file` / :meth:`from_fingerprint` do. The
        caller warns about ``insecure``; this constructor only builds it.
        """
        given = [flag for flag, value in (("--ums-ca", ca is not None), ("--ums-fingerprint", fingerprint is not None),
                                          ("--ums-insecure", bool(insecure))) if value]
        if len(given) > 1:
            raise UsageError(
                f"give only one of --ums-ca, --ums-fingerprint, --ums-insecure (got {' and '.join(given)})"
            )
        if ca is not None:
            return cls.from_ca_file(ca)
        if fingerprint is not None:
            return cls.from_fingerprint(fingerprint)
        if insecure:
            return cls.insecure()
        return cls.system()

    @classmethod
    def from_ca_file(cls, path: str | os.PathLike[str]) -> UMSTrust:
        """Trust certificates chaining to any certificate in the PEM file at ``path``.

        Raises :class:`UsageError` when the file cannot be read or holds no PEM certificate.
        """
        path = os.fspath(path)
        try:
            with open(path, "rb") as f:
                data = f.read(4 * 1024 * 1024)
        except OSError as e:
            raise UsageError(f"cannot read --ums-ca {path}: {e.strerror or e}") from None
        try:
            certificates = x509.load_pem_x509_certificates(data)
        except ValueError:
            certificates = []
        if not certificates:
            raise UsageError(f"--ums-ca {path} holds no PEM certificate")
        return cls("ca", ca_file=os.path.abspath(path))

    @classmethod
    def from_fingerprint(cls, text: str) -> UMSTrust:
        """Trust exactly the leaf certificate whose DER SHA-256 is ``text`` (hex, colons optional).

        Raises :class:`UsageError` for a malformed fingerprint.
        """
        return cls("fingerprint", fingerprint=parse_fingerprint(text))

    @classmethod
    def system(cls) -> UMSTrust:
        """Trust the platform's CA store (OpenSSL's default paths), with the host-name check."""
        return cls("system")

    @classmethod
    def insecure(cls) -> UMSTrust:
        """Accept any certificate. The caller must warn: the secret can then be intercepted."""
        return cls("insecure")

    @property
    def fingerprint(self) -> str | None:
        """The pinned SHA-256 as colon-separated upper-case hex, in fingerprint mode."""
        return None if self._fingerprint is None else format_fingerprint(self._fingerprint)

    def describe(self) -> str:
        """A short human description, e.g. for a progress message."""
        if self.mode == "ca":
            return f"--ums-ca {self.ca_file}"
        if self.mode == "system":
            return "the system's CA store (no --ums-ca/--ums-fingerprint given)"
        if self.mode == "fingerprint":
            return f"--ums-fingerprint {self.fingerprint}"
        return "--ums-insecure (no certificate verification)"

    def __repr__(self) -> str:
        return f"UMSTrust({self.describe()})"

    # IPolicyForHTTPS
    def creatorForNetloc(self, hostname: bytes, port: int) -> IOpenSSLClientConnectionCreator:
        """Return the connection creator for ``hostname:port`` (``hostname`` as in the URL)."""
        host = hostname.decode("ascii") if isinstance(hostname, bytes) else str(hostname)
        creator: Any = _ConnectionCreator(self, host.strip("[]"))
        return cast(IOpenSSLClientConnectionCreator, creator)

    # verification internals
    def _matches(self, der: bytes) -> bool:
        assert self._fingerprint is not None
        return hmac.compare_digest(hashlib.sha256(der).digest(), self._fingerprint)

    def _mismatch_message(self, der: bytes) -> str:
        return (
            f"the UMS certificate does not match --ums-fingerprint: expected {self.fingerprint}, "
            f"the server presented {certificate_fingerprint(der)}"
        )

    def _verify(
        self,
        host: str,
        cert: X509,
        errno: int,
        depth: int,
        ok: bool,
        check: _Check,
        fail: Callable[[str], None],
    ) -> bool:
        """The verify callback's decision; called by OpenSSL once or more per chain element."""
        if self.mode == "fingerprint":
            if depth != 0:
                return True  # the chain is irrelevant to a pin
            der = _leaf_der(cert)
            if self._matches(der):
                check.leaf_accepted = True
                return True
            fail(self._mismatch_message(der))
            return False
        # CA mode: OpenSSL's verdict on the chain, then the name.
        if not ok:
            reason = _VERIFY_ERRORS.get(errno, f"OpenSSL verify error {errno}")
            fail(f"the UMS certificate for {host} is not trusted by {self.describe()}: {reason}"
                 + ("; a self-signed UMS needs --ums-fingerprint or --ums-ca" if self.mode == "system" else ""))
            return False
        if depth != 0:
            return True
        leaf = cert.to_cryptography()
        try:
            if _is_ip(host):
                verify_certificate_ip_address(leaf, host)
            else:
                verify_certificate_hostname(leaf, host)
        except CertificateError:
            # service-identity's "no subjectAltName": Twisted only logs this one.
            fail(
                f"the UMS certificate has no subjectAltName for host {host}; it is refused "
                f"(a certificate for a UMS must name its host in subjectAltName)"
            )
            return False
        except VerificationError:
            names = ", ".join(_certificate_names(leaf)) or "none"
            fail(f"the UMS certificate is not valid for host {host} (its names: {names})")
            return False
        check.leaf_accepted = True
        return True


def failure_causes(exc: BaseException | Failure | None) -> list[BaseException]:
    """The exception and everything nested in it, depth first, each exception once.

    Follows Agent's ``reasons`` lists (``ResponseNeverReceived``,
    ``RequestTransmissionFailed``, ``ResponseFailed``: lists of :class:`Failure`),
    ``__cause__`` and ``__context__``; a :class:`Failure` stands for its ``value``.
    Cycles end; anything that is not an exception is skipped. ``[]`` for ``None``.
    This is the one walker over failure causes (the IMI client's error mapping uses it).
    """
    found: list[BaseException] = []
    stack: list[Any] = [exc]
    while stack:
        item = stack.pop()
        if isinstance(item, Failure):
            item = item.value
        if not isinstance(item, BaseException) or any(item is seen for seen in found):
            continue
        found.append(item)
        reasons = getattr(item, "reasons", None)
        stack.extend([item.__context__, item.__cause__])
        stack.extend(reversed(reasons if isinstance(reasons, list) else []))
    return found


def find_ums_error(exc: BaseException | Failure | None) -> UMSError | None:
    """The first :class:`UMSError` (e.g. raised by the trust policy) inside a connection
    failure, found by :func:`failure_causes`; ``None`` when there is none."""
    return next((e for e in failure_causes(exc) if isinstance(e, UMSError)), None)
