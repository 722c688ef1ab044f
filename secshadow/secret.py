"""The shadow secret: the device certificate to pin and the one-time password.

Source: IMI manual, "Secure VNC with IMIv2" (``GET /umsapi/v2/thinclients/{id}?facets=shadow``),
summarised in ``docs/protocol.md`` section 1. Two input shapes are accepted:

- the IMI thin-client document as the server returned it, with ``shadowSecret``
  (``certificate``, ``password``) and ``lastIP``;
- a bare ``{"certificate": ..., "password": ...}``, optionally with ``host`` and ``port``.

The certificate may be PEM text whose line breaks are real or escaped (a literal
backslash-n), or bare Base64 DER. An empty certificate is an error: the UMS never
received one from the device, and pinning is never skipped.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
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

_PEM_BLOCK = re.compile(
    r"-----BEGIN ([A-Z0-9 ]+)-----(.*?)-----END ([A-Z0-9 ]+)-----", re.DOTALL
)
_HOSTNAME = re.compile(r"^[A-Za-z0-9.\-:_%\[\]]{1,253}$")


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


def certificate_fingerprint(der: bytes) -> str:
    """SHA-256 of DER bytes as colon-separated upper-case hex, e.g. ``86:49:45:...``."""
    return ":".join(f"{b:02X}" for b in hashlib.sha256(der).digest())


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
    """Validate a host name or IP literal; raises :class:`SecretError` when it is not one."""
    if not isinstance(value, str) or not _HOSTNAME.match(value.strip()):
        raise SecretError(f"{what} must be a host name or IP address")
    return value.strip()


@dataclass(frozen=True, repr=False)
class ShadowSecret:
    """What the console needs to shadow one device.

    ``certificate_der``: the device certificate to pin, DER bytes.
    ``password``: the one-time password (redacted in every ``repr``).
    ``host`` / ``port``: where the device is, if the secret says (IMI ``lastIP``);
    ``port`` is ``None`` when unspecified (callers default to 5900).
    ``device_id`` / ``device_name``: from the IMI document, for messages.
    """

    certificate_der: bytes
    password: OneTimePassword
    host: str | None = None
    port: int | None = None
    device_id: str | None = None
    device_name: str | None = None

    @property
    def certificate_sha256(self) -> str:
        """SHA-256 fingerprint of the pinned certificate, colon-separated hex."""
        return certificate_fingerprint(self.certificate_der)

    def __repr__(self) -> str:
        return (
            f"ShadowSecret(host={self.host!r}, port={self.port!r}, device_id={self.device_id!r}, "
            f"certificate_sha256={self.certificate_sha256!r}, password=<redacted>)"
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
    return ShadowSecret(
        certificate_der=certificate,
        password=password,
        host=host,
        port=port,
        device_id=str(device_id) if isinstance(device_id, (str, int)) and not isinstance(device_id, bool) else None,
        device_name=name if isinstance(name, str) else None,
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
