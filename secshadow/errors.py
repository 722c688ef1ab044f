"""One exception hierarchy; ``cli.py`` maps each class to its error code and exit code.

Codes and exit statuses are the public contract of ``secshadow-proxy``
(``docs/cli.md``). Messages say what happened and what to try; they never contain
the one-time password or the UMS password.
"""

from __future__ import annotations


class SecShadowError(Exception):
    """Base of every error the library raises on purpose.

    ``code`` is the JSON event's ``code``; ``exit_code`` the process exit status.
    """

    code = "internal"
    exit_code = 1

    @property
    def message(self) -> str:
        return str(self.args[0]) if self.args else self.__class__.__name__


class UsageError(SecShadowError):
    """Bad flags or arguments (exit 2)."""

    code = "usage"
    exit_code = 2


class SecretError(UsageError):
    """A malformed shadow secret: not JSON, missing fields, empty or bad certificate (exit 2)."""


class UMSError(SecShadowError):
    """The management server failed: unreachable, untrusted, refused, bad answer (exit 3)."""

    code = "ums"
    exit_code = 3


class DeviceUnreachable(SecShadowError):
    """The TCP connection to the device failed or timed out (exit 4)."""

    code = "device-unreachable"
    exit_code = 4


class TLSHandshakeError(SecShadowError):
    """TLS could not be negotiated with the device: versions or ciphers (exit 5)."""

    code = "tls-handshake"
    exit_code = 5


class PinMismatch(SecShadowError):
    """The device did not present the pinned certificate, or none at all (exit 6)."""

    code = "pin-mismatch"
    exit_code = 6


class DeviceRejected(SecShadowError):
    """After ``PROCYCMD`` the device closed, sent no RFB ProtocolVersion, or timed out (exit 7)."""

    code = "device-rejected"
    exit_code = 7


class ViewerError(SecShadowError):
    """The viewer could not be found or started, or never connected (exit 8)."""

    code = "viewer"
    exit_code = 8


class GatewayError(SecShadowError):
    """The gateway relay failed: unreachable, its certificate not trusted, it refused the
    token or the session, or the device side did not join in time (exit 9)."""

    code = "gateway"
    exit_code = 9
