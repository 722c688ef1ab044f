"""The service's side of the UMS: one logged-in IMI session per administrator.

``secshadow-web`` checks a login against the UMS (IMI v3 ``POST /umsapi/v3/login``) and
keeps only the session id (``JSESSIONID``); the password is used for that one request and
dropped. The same session lists the devices (``GET /umsapi/v3/thinclients``) and fetches
each shadow secret (``GET .../thinclients/{id}?facets=shadow``), so a shadowing started
from the browser needs no stored password: :class:`UMSSessionSource` is the
``secshadow.api`` secret source built on it.

Built on :class:`secshadow.imi.IMIClient` (its request, error and trust handling).
A ``401`` from the UMS means its session ended (idle for 30 minutes, logged out, or
killed by an administrator): :class:`UMSSessionExpired`.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from twisted.internet.defer import Deferred

from secshadow.errors import UMSError, UsageError
from secshadow.imi import IMIClient, error_from_response, validate_device_id
from secshadow.secret import ShadowSecret

#: Most devices shown from one listing.
MAX_DEVICES = 10000


class UMSSessionExpired(UMSError):
    """The UMS no longer accepts the session (HTTP 401): log in again."""


class LoginRefused(UMSError):
    """The UMS refused the user name or password."""


@dataclass(frozen=True)
class DeviceSummary:
    """One row of the device list: IMI ``id``, ``name`` and ``lastIP``."""

    id: str
    name: str
    lastIP: str  # noqa: N815 - the IMI field name, and the service's JSON field

    def as_dict(self) -> dict[str, str]:
        return {"id": self.id, "name": self.name, "lastIP": self.lastIP}


def parse_device_list(body: bytes, url: str) -> list[DeviceSummary]:
    """The devices of a ``GET /umsapi/v3/thinclients`` answer, sorted by name; devices in
    the recycle bin and entries without an id are left out. Raises :class:`UMSError`
    ("bad response") when the body is not a JSON array of objects."""
    try:
        document = json.loads(body)
    except (ValueError, RecursionError):
        raise UMSError(f"bad response from the UMS: the device list is not JSON ({url})") from None
    if isinstance(document, Mapping):  # some IMI versions wrap lists: {"thinclients": [...]}
        document = next((v for v in document.values() if isinstance(v, list)), None)
    if not isinstance(document, list):
        raise UMSError(f"bad response from the UMS: the device list is not an array ({url})")
    devices = []
    for item in document[:MAX_DEVICES]:
        if not isinstance(item, Mapping) or item.get("movedToBin") is True:
            continue
        raw_id = item.get("id")
        if isinstance(raw_id, int) and not isinstance(raw_id, bool):
            raw_id = str(raw_id)
        try:
            device_id = validate_device_id(raw_id)
        except UsageError:  # an id we could not ask for later: leave it out
            continue  # noqa: S112
        name, address = item.get("name"), item.get("lastIP")
        devices.append(DeviceSummary(device_id, name if isinstance(name, str) else "",
                                     address if isinstance(address, str) else ""))
    return sorted(devices, key=lambda d: (d.name.lower(), d.id))


class UMSSession(IMIClient):
    """An :class:`IMIClient` that logs in once and then works on the session alone.

    ``reactor``, ``base_url``, ``trust``, ``timeout``, ``http_client``: as for
    :class:`IMIClient`. ``user`` is the logged-in user's name once :meth:`login`
    succeeded.
    """

    @property
    def user(self) -> str | None:
        return self._user

    async def login(self, user: str, password: str) -> None:
        """Log in; raises :class:`LoginRefused` for a wrong name or password,
        :class:`UMSError` for anything else. The password is not kept."""
        try:
            await super().login(user, password)
        except UMSError as e:
            if e.message.startswith("login refused"):
                raise LoginRefused(e.message) from None
            raise
        finally:
            # Only the session id stays (for redacting server text); never the password.
            self._secrets = tuple(s for s in (self._login_id,) if s)

    async def devices(self) -> list[DeviceSummary]:
        """``GET /umsapi/v3/thinclients``: the devices this user may see."""
        self._need_session()
        path = "umsapi/v3/thinclients"
        url = f"{self.base_url}/{path}"
        status, _, body = await self._request("GET", path)
        if status == 401:
            raise self._expired(status, body, url)
        if status != 200:
            raise error_from_response(status, body, url=url, user=self._user, secrets=self._secrets)
        return parse_device_list(body, url)

    async def shadow_secret(self, device_id: str) -> ShadowSecret:
        """As :meth:`IMIClient.shadow_secret`; a ``401`` is :class:`UMSSessionExpired`."""
        self._need_session()
        try:
            return await super().shadow_secret(device_id)
        except UMSError as e:
            if "did not accept the session" in e.message:
                self._login_id = None
                raise UMSSessionExpired(e.message) from None
            raise

    async def check(self, device_id: str) -> None:
        """A light request on the session (the device's main data, no secret); raises
        :class:`UMSSessionExpired` when the UMS no longer accepts it. Other failures
        (network, device gone) are not the session's end and are ignored."""
        self._need_session()
        path = f"umsapi/v3/thinclients/{validate_device_id(device_id)}"
        try:
            status, _, body = await self._request("GET", path)
        except UMSError:
            return
        if status == 401:
            raise self._expired(status, body, f"{self.base_url}/{path}")

    def _need_session(self) -> None:
        if self._login_id is None:
            raise UMSSessionExpired("not logged in to the UMS (the session ended): log in again")

    def _expired(self, status: int, body: bytes, url: str) -> UMSSessionExpired:
        self._login_id = None
        message = error_from_response(status, body, url=url, user=self._user, secrets=self._secrets).message
        return UMSSessionExpired(message)

    def __repr__(self) -> str:
        return f"UMSSession({self.base_url!r}, user={self._user!r}, logged_in={self.logged_in})"


class UMSSessionSource:
    """A ``secshadow.api`` secret source on a logged-in :class:`UMSSession`: each
    :meth:`fetch` asks the UMS for a fresh secret of ``device_id`` with the session,
    no password. ``user`` / ``device_id`` go to the audit record."""

    name = "ums"
    refreshable = True

    def __init__(self, session: UMSSession, device_id: str) -> None:
        self.session = session
        self.device_id = validate_device_id(device_id)
        self.user = session.user

    def fetch(self) -> Deferred[ShadowSecret]:
        return Deferred.fromCoroutine(self.session.shadow_secret(self.device_id))

    def __repr__(self) -> str:
        return f"UMSSessionSource({self.session.base_url!r}, device={self.device_id!r}, user={self.user!r})"


def summaries(devices: list[DeviceSummary]) -> list[dict[str, Any]]:
    """The ``GET /api/devices`` JSON body."""
    return [d.as_dict() for d in devices]
