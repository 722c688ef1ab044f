"""The shadow secret: the device certificate to pin and the one-time password.

Source: IMI manual, "Secure VNC with IMIv2" (``GET /umsapi/v2/thinclients/{id}?facets=shadow``),
summarised in ``docs/protocol.md`` section 1. Two input shapes are accepted:

- the IMI thin-client document as the server returned it, with ``shadowSecret``
  (``certificate``, ``password``) and ``lastIP``;
- a bare ``{"certificate": ..., "password": ...}``, optionally with ``host`` and ``port``.

Either may carry ``"gateway": {"url": ..., "token": ...}`` (inside ``shadowSecret`` for
the IMI shape): the device is then reached through a gateway relay (PROTOCOL.md section
6); the token is redacted like the password.

The certificate may be PEM text whose line breaks are real or escaped (a literal
backslash-n), or bare Base64 DER. An empty certificate is an error: the UMS never
received one from the device, and pinning is never skipped.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import ipaddress
import json
import re
from dataclasses import dataclass
from typing import Any, Mapping

from cryptography import x509

from secshadow.errors import SecretError

#: Upper bound for a one-time password; IMI issues 36-character UUIDs.
MAX_PASSWORD_LENGTH = 256
#: Upper bound for a certificate as text; a device certificate is a few KiB at most.
MAX_CERTIFICATE_TEXT = 64 * 1024
#: Upper bound for a gateway token (a JWT) in the secret.
MAX_GATEWAY_TOKEN = 4096

_PEM_BLOCK = re.compile(
    r"-----BEGIN ([A-Z0-9 ]+)-----(.*?)-----END ([A-Z0-9 ]+)-----", re.DOTALL
)
_LABEL_CHARACTERS = re.compile(r"^[A-Za-z0-9-]+$")
_ZONE = re.compile(r"^[A-Za-z0-9_.-]{1,32}$")
_JWT = re.compile(r"^[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+$")


class OneTimePassword:
    """The device's one-time password (IMI: a Java UUID, valid once, for 5 minutes).

    The value is reachable only through :meth:`reveal`; ``repr``, ``str`` and
    formatting print a redaction, and pickling is refused, so the password cannot
    slip into a log line, an event, an exception message or a file by accident.

    Raises :class:`SecretError` when the value is empty, too long, or contains
    whitespace or control characters (it is sent on the wire after ``PW_``).
    """

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        if not isinstance(value, str):
            raise SecretError("the shadow secret's password must be a string")
        if not value:
            raise SecretError("the shadow secret's password is empty")
        if len(value) > MAX_PASSWORD_LENGTH:
            raise SecretError(
                f"the shadow secret's password is longer than {MAX_PASSWORD_LENGTH} characters"
            )
        if not all(0x21 <= ord(ch) <= 0x7E for ch in value):
            raise SecretError(
                "the shadow secret's password contains whitespace, control or non-ASCII characters"
            )
        self._value = value

    def reveal(self) -> str:
        """Return the password itself; call only where it goes onto the pinned wire."""
        return self._value

    def __repr__(self) -> str:
        return "OneTimePassword(<redacted>)"

    __str__ = __repr__

    def __format__(self, spec: str) -> str:
        return repr(self)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, OneTimePassword):
            return NotImplemented
        return hmac.compare_digest(self._value.encode(), other._value.encode())

    def __hash__(self) -> int:
        return hash(OneTimePassword)

    def __reduce__(self) -> Any:
        raise TypeError("a OneTimePassword cannot be pickled")


class GatewayToken:
    """The console's gateway token (a JWT, PROTOCOL.md section 6), redacted like
    :class:`OneTimePassword`: reachable only through :meth:`reveal`, never in a
    ``repr``, ``str``, format or pickle.

    Raises :class:`SecretError` when the value is not shaped like a compact JWT
    (three base64url parts joined by dots, at most :data:`MAX_GATEWAY_TOKEN` characters).
    """

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        if not isinstance(value, str) or not _JWT.match(value.strip()) or len(value.strip()) > MAX_GATEWAY_TOKEN:
            raise SecretError("the shadow secret's gateway token is not a JWT (three base64url parts joined by dots)")
        self._value = value.strip()

    def reveal(self) -> str:
        """The token itself; call only where it goes into the gateway's Authorization header."""
        return self._value

    def __repr__(self) -> str:
        return "GatewayToken(<redacted>)"

    __str__ = __repr__

    def __format__(self, spec: str) -> str:
        return repr(self)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, GatewayToken):
            return NotImplemented
        return hmac.compare_digest(self._value.encode(), other._value.encode())

    def __hash__(self) -> int:
        return hash(GatewayToken)

    def __reduce__(self) -> Any:
        raise TypeError("a GatewayToken cannot be pickled")


@dataclass(frozen=True, repr=False)
class GatewayRoute:
    """The secret's ``"gateway": {"url": ..., "token": ...}``: reach the device through a
    gateway relay. ``url``: the console leg's ``wss://.../v1/sessions/{sid}/console``;
    ``token``: its :class:`GatewayToken` (redacted)."""

    url: str
    token: GatewayToken

    def __repr__(self) -> str:
        return f"GatewayRoute(url={self.url!r}, token=<redacted>)"

    __str__ = __repr__


def _parse_gateway(value: object, where: str) -> GatewayRoute:
    if not isinstance(value, Mapping):
        raise SecretError(f"the shadow secret's 'gateway' must be an object with 'url' and 'token'{where}")
    url, token = value.get("url"), value.get("token")
    if not isinstance(url, str) or not isinstance(token, str):
        raise SecretError(f"the shadow secret's 'gateway' needs 'url' and 'token' strings{where}")
    # Imported here: the relay's URL rules live with the gateway code.
    from secshadow.errors import UsageError
    from secshadow.gateway.wire import parse_gateway_url

    try:
        target = parse_gateway_url(url, what="the secret's gateway url")
    except UsageError as e:
        raise SecretError(e.message) from None
    if target.role != "console":
        raise SecretError("the secret's gateway url must be the console leg (.../console)")
    return GatewayRoute(url=target.url, token=GatewayToken(token))


def format_fingerprint(digest: bytes) -> str:
    """A digest as colon-separated upper-case hex, e.g. ``86:49:45:...`` (the one format
    of every fingerprint secshadow prints: events, messages, the audit record)."""
    return ":".join(f"{b:02X}" for b in digest)


def certificate_fingerprint(der: bytes) -> str:
    """SHA-256 of DER bytes as colon-separated upper-case hex, e.g. ``86:49:45:...``."""
    return format_fingerprint(hashlib.sha256(der).digest())


def parse_certificate(text: str) -> bytes:
    """Turn the ``certificate`` field into the DER bytes to pin.

    Accepts PEM (one ``CERTIFICATE`` block; line breaks real or as literal ``\\n``)
    or bare Base64 DER. Returns the DER exactly as given, since the pin is a
    byte-for-byte comparison (``docs/protocol.md`` section 2).

    Raises :class:`SecretError` for an empty value, several certificates, a wrong PEM
    label, invalid Base64 or bytes that are not an X.509 certificate.
    """
    if not isinstance(text, str):
        raise SecretError("the shadow secret's certificate must be a string")
    if len(text) > MAX_CERTIFICATE_TEXT:
        raise SecretError("the shadow secret's certificate is implausibly large (over 64 KiB)")
    cleaned = text.replace("\\r", "\r").replace("\\n", "\n").strip()
    if not cleaned:
        raise SecretError(
            "the UMS has no certificate for this device (the shadow secret's certificate is "
            "empty): reboot the device or send settings to it once, then try again"
        )
    if "-----BEGIN" in cleaned:
        blocks = _PEM_BLOCK.findall(cleaned)
        if cleaned.count("-----BEGIN") != len(blocks):
            raise SecretError("the shadow secret's certificate has an incomplete PEM block")
        if not blocks:
            raise SecretError("the shadow secret's certificate has a PEM header but no complete block")
        if len(blocks) > 1:
            raise SecretError(
                f"the shadow secret holds {len(blocks)} PEM blocks; exactly one device certificate is expected"
            )
        begin, body, end = blocks[0]
        if begin != "CERTIFICATE" or end != "CERTIFICATE":
            raise SecretError(f"the shadow secret's PEM block is a {begin!r}, not a CERTIFICATE")
        b64 = body
    else:
        b64 = cleaned
    try:
        der = base64.b64decode("".join(b64.split()), validate=True)
    except (binascii.Error, ValueError):
        raise SecretError("the shadow secret's certificate is neither PEM nor valid Base64") from None
    if not der:
        raise SecretError("the shadow secret's certificate decodes to nothing")
    try:
        x509.load_der_x509_certificate(der)
    except (ValueError, TypeError, x509.InvalidVersion):
        raise SecretError("the shadow secret's certificate is not a valid X.509 certificate") from None
    return der


def _parse_port(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise SecretError("the shadow secret's port must be a number from 1 to 65535")
    if isinstance(value, str) and not re.fullmatch(r"[0-9]{1,5}", value):
        raise SecretError("the shadow secret's port must be a number from 1 to 65535")
    port = int(value)
    if not 1 <= port <= 65535:
        raise SecretError("the shadow secret's port must be a number from 1 to 65535")
    return port


def parse_host(value: object, what: str = "the device host") -> str:
    """Validate a device host: an IP address literal or a DNS host name; returns it as written
    (surrounding white space removed).

    Accepted: IPv4 (``10.0.0.5``), IPv6 without brackets (``::1``, ``fe80::1%eth0``), and
    host names of ASCII letters, digits and ``-`` (RFC 1123): labels of 1 to 63
    characters that neither start nor end with ``-``, 253 characters at most, one
    optional trailing dot, a last label that is not all digits (``127.1`` is neither an
    address nor a name). ``[::1]`` is refused with the hint to drop the brackets.

    Raises :class:`SecretError` (a :class:`~secshadow.errors.UsageError`, exit 2) whose
    message starts with ``what`` and says what is wrong, without repeating the value (a
    malformed secret could hold the password where the host should be).
    """
    if not isinstance(value, str):
        raise SecretError(f"{what} must be a host name or IP address")
    text = value.strip()
    if not text:
        raise SecretError(f"{what} is empty; give a host name or IP address")
    if _is_ip_literal(text):
        return text
    if text.startswith("[") or text.endswith("]"):
        inner = text.strip("[]")
        hint = f": {inner!r}" if _is_ip_literal(inner) else ""
        raise SecretError(f"{what}: write an IP address without brackets{hint}")
    if not text.isascii():
        raise SecretError(f"{what} has non-ASCII characters; write an international name in its "
                          f"xn-- (punycode) form")
    if ":" in text:
        raise SecretError(f"{what} is neither an IP address nor a host name (give the port separately)")
    name = text[:-1] if text.endswith(".") else text
    if len(name) > 253:
        raise SecretError(f"{what} is longer than 253 characters")
    labels = name.split(".")
    for label in labels:
        if not label:
            raise SecretError(f"{what} has an empty label (two dots in a row, or a leading dot)")
        if len(label) > 63:
            raise SecretError(f"{what} has a label longer than 63 characters")
        if not _LABEL_CHARACTERS.match(label):
            raise SecretError(f"{what} is not a host name: only letters, digits, '-' and '.' are "
                              f"allowed (no '_', spaces or other characters)")
        if label.startswith("-") or label.endswith("-"):
            raise SecretError(f"{what} is not a host name: a label cannot start or end with '-'")
    if labels[-1].isdigit():
        raise SecretError(f"{what} is not an IP address, and not a host name either (its last "
                          f"label is all digits)")
    return text


def _is_ip_literal(text: str) -> bool:
    """An IPv4 or IPv6 address; an IPv6 zone (``%eth0``) must look like an interface name."""
    _, percent, zone = text.partition("%")
    if percent and not _ZONE.match(zone):
        return False
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


@dataclass(frozen=True, repr=False)
class ShadowSecret:
    """What the console needs to shadow one device.

    ``certificate_der``: the device certificate to pin, DER bytes.
    ``password``: the one-time password (redacted in every ``repr``).
    ``host`` / ``port``: where the device is, if the secret says (IMI ``lastIP``);
    ``port`` is ``None`` when unspecified (callers default to 5900).
    ``device_id`` / ``device_name``: from the IMI document, for messages.
    ``gateway``: a :class:`GatewayRoute` when the device is reached through a gateway
    relay (``"gateway": {"url", "token"}`` in the document), else ``None``.
    """

    certificate_der: bytes
    password: OneTimePassword
    host: str | None = None
    port: int | None = None
    device_id: str | None = None
    device_name: str | None = None
    gateway: GatewayRoute | None = None

    @property
    def certificate_sha256(self) -> str:
        """SHA-256 fingerprint of the pinned certificate, colon-separated hex."""
        return certificate_fingerprint(self.certificate_der)

    def __repr__(self) -> str:
        return (
            f"ShadowSecret(host={self.host!r}, port={self.port!r}, device_id={self.device_id!r}, "
            f"certificate_sha256={self.certificate_sha256!r}, password=<redacted>"
            + (f", gateway={self.gateway.url!r} token=<redacted>" if self.gateway is not None else "")
            + ")"
        )

    __str__ = __repr__

    def __reduce__(self) -> Any:
        raise TypeError("a ShadowSecret cannot be pickled")


def _text_field(obj: Mapping[str, Any], key: str, where: str) -> str:
    if key not in obj:
        raise SecretError(f"the shadow secret has no {key!r} field{where}")
    value = obj[key]
    if not isinstance(value, str):
        raise SecretError(f"the shadow secret's {key!r} must be a string{where}")
    return value


def secret_from_document(document: Mapping[str, Any]) -> ShadowSecret:
    """Build a :class:`ShadowSecret` from a decoded JSON object (either shape above).

    Raises :class:`SecretError` naming the missing or malformed field.
    """
    if not isinstance(document, Mapping):
        raise SecretError("the shadow secret must be a JSON object")
    if "shadowSecret" in document:
        inner = document["shadowSecret"]
        if not isinstance(inner, Mapping):
            raise SecretError("the IMI document's 'shadowSecret' must be an object")
        where = " in 'shadowSecret'"
        host_value = document.get("lastIP")
        port_value = None
        device_id = document.get("id")
        name = document.get("name")
    else:
        inner = document
        where = ""
        host_value = document.get("host")
        port_value = document.get("port")
        device_id = None
        name = None
    certificate = parse_certificate(_text_field(inner, "certificate", where))
    password = OneTimePassword(_text_field(inner, "password", where))
    host = None if host_value in (None, "") else parse_host(host_value, "the secret's host (lastIP)")
    port = None if port_value is None else _parse_port(port_value)
    gateway_value = inner.get("gateway")
    gateway = None if gateway_value is None else _parse_gateway(gateway_value, where)
    return ShadowSecret(
        certificate_der=certificate,
        password=password,
        host=host,
        port=port,
        device_id=str(device_id) if isinstance(device_id, (str, int)) and not isinstance(device_id, bool) else None,
        device_name=name if isinstance(name, str) else None,
        gateway=gateway,
    )


def load_secret(data: bytes | str) -> ShadowSecret:
    """Parse JSON text (bytes are UTF-8) into a :class:`ShadowSecret`.

    Raises :class:`SecretError` when it is not JSON, not an object, or malformed.
    The error never quotes the input, which holds the password.
    """
    if isinstance(data, bytes):
        try:
            data = data.decode("utf-8")
        except UnicodeDecodeError:
            raise SecretError("the shadow secret is not UTF-8 text") from None
    if not data.strip():
        raise SecretError("the shadow secret is empty (expected a JSON object)")
    try:
        document = json.loads(data)
    except (ValueError, RecursionError) as e:
        position = f" (line {e.lineno}, column {e.colno})" if isinstance(e, json.JSONDecodeError) else ""
        raise SecretError(f"the shadow secret is not valid JSON{position}") from None
    return secret_from_document(document)
