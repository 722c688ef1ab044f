"""Client for the reference server's one-time-password check (device emulator side).

A real IGEL device hands the password it received after ``PROCYCMD PW_`` to the UMS
over its own management channel, which is not public (``docs/protocol.md`` section 2,
step 6). The emulator uses ``POST /secshadow-device/v1/verify-otp`` of
``secshadow-ums`` instead; the endpoint is specified in :mod:`secshadow.lab.imiserver.server`.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from treq.client import HTTPClient
from twisted.internet.defer import Deferred
from twisted.web.client import Agent, HTTPConnectionPool

from secshadow.errors import UMSError
from secshadow.imi import connection_error, validate_base_url, validate_device_id
from secshadow.secret import OneTimePassword
from secshadow.lab.imiserver.server import VERIFY_OTP_PATH
from secshadow.umstrust import UMSTrust


def verify_otp(
    reactor: Any,
    ums_url: str,
    device_id: str,
    password: str | OneTimePassword,
    trust: UMSTrust,
    timeout: float = 10.0,
) -> Deferred[bool]:
    """Ask ``secshadow-ums`` at ``ums_url`` whether ``password`` is a live one-time password.

    Fires ``True`` (the password is now consumed) or ``False`` (unknown, used or
    expired). Fails with :class:`UMSError` when the server cannot be reached, its
    certificate is not trusted, or it answers anything but the documented shape;
    :class:`UsageError` for a bad URL or device id. The password is never logged.
    """

    async def run() -> bool:
        base = validate_base_url(ums_url)
        device = validate_device_id(device_id)
        value = password.reveal() if isinstance(password, OneTimePassword) else password
        if not isinstance(value, str):
            raise UMSError("the one-time password to verify must be text")
        url = base + VERIFY_OTP_PATH
        pool = HTTPConnectionPool(reactor, persistent=False)
        agent: Any = Agent(reactor, contextFactory=trust, connectTimeout=timeout, pool=pool)
        client = HTTPClient(agent)
        try:
            response = await client.request(
                "POST",
                url,
                json={"device_id": device, "password": value},
                allow_redirects=False,
                timeout=timeout,
                reactor=reactor,
            )
            body = await response.content()
        except Exception as e:  # noqa: BLE001 - every transport failure becomes a UMSError
            raise connection_error(e, url, timeout) from None
        try:
            document = json.loads(body)
        except (ValueError, RecursionError):
            document = None
        if response.code != 200 or not isinstance(document, Mapping) or not isinstance(
            document.get("valid"), bool
        ):
            raise UMSError(f"bad response from the UMS to the one-time password check: HTTP {response.code} ({url})")
        return bool(document["valid"])

    return Deferred.fromCoroutine(run())
