"""The reference IMI server: configuration, state (sessions, one-time passwords) and resources.

IMI endpoints (``docs/protocol.md`` section 1; IMI manual, "Secure VNC with IMIv2"):

``POST /umsapi/v3/login``
    HTTP Basic auth against the configured users. ``200``, ``Set-Cookie: JSESSIONID=...;
    Path=/umsapi/; Secure; HttpOnly`` and ``{"message": "JSESSIONID=..."}``; ``401``
    with an ITG error body otherwise.
``POST /umsapi/v3/logout``
    Ends the session: ``200 {"message": "Logout successful"}``; ``401`` without one.
``GET /umsapi/v3/thinclients``
    The main data of every device the user may read, as a JSON array (no
    ``shadowSecret``); ``401`` without a valid session.
``GET /umsapi/v2/thinclients/{id}`` and ``GET /umsapi/v3/thinclients/{id}``
    The device's main data; with ``?facets=shadow`` also ``shadowSecret``
    (``certificate``: PEM text, ``password``: a fresh one-time password, a UUID4
    string). ``401`` without a valid session. A version left out of the config's
    ``api_versions`` answers a plain (non-ITG) ``404`` on this path, as a UMS whose
    IMI lacks it would; login and logout stay on v3.

Sessions last :data:`SESSION_IDLE_SECONDS` (30 minutes) after the last successful
request. ITG errors are ``{"message", "errorCode", "stackTrace"}``:

============  ======  ==================================================
errorCode     status  when
============  ======  ==================================================
ITG-0A001     404     no device with that id
ITG-0A018     404     the device is in the recycle bin (``movedToBin``)
ITG-0B001     401     no or expired session; login refused
ITG-0B003     403     the user may not access that device (``devices``)
ITG-0C001     403     shadow facet without licence (``shadow_licensed``)
============  ======  ==================================================

Device-emulator endpoint (not part of IMI; stable, used by ``secshadow.lab.device`` through
:func:`secshadow.lab.imiserver.otpcheck.verify_otp`):

``POST /secshadow-device/v1/verify-otp``
    Request body (JSON, at most 4 KiB): ``{"device_id": "27", "password": "<otp>"}``.
    Answer ``200 {"valid": true}`` when the password was issued for that device less
    than :data:`OTP_LIFETIME_SECONDS` (5 minutes) ago and not used yet; it is consumed
    by this call. Otherwise ``200 {"valid": false, "reason": "expired" | "unknown"}``
    (``unknown`` also covers an already used password). A malformed request gets
    ``400 {"message": ..., "errorCode": "SECSHADOW-BAD-REQUEST", "stackTrace": null}``.
    No authentication: a UUID4 cannot be guessed, and the server listens on loopback
    by default.

Configuration (JSON; :func:`load_config`)::

    {"users": [{"name": "admin", "password": "..."},
               {"name": "ops", "password_env": "OPS_PASSWORD", "devices": ["27"]}],
     "devices": [{"id": "27", "name": "Curry", "lastIP": "127.0.0.1", "port": 5900,
                  "certificate": "<PEM>" | "certificate_file": "dev.pem",
                  "movedToBin": false, "mac": "00E0C54DCB8E", "firmwareID": "21"}],
     "shadow_licensed": true, "api_versions": ["v2", "v3"],
     "gateway": {"url": "wss://gw.example:8443", "token_key_file": "gateway-token.key.pem",
                 "token_lifetime": 300}}

A device with ``"gateway_sid": "tc-27"`` sits behind the gateway relay (PROTOCOL.md
section 6): its ``shadowSecret`` then also carries ``"gateway": {"url": ..., "token":
...}``, the console leg's URL of that session and a fresh console token signed with the
Ed25519 key in ``token_key_file`` (device tokens for agents: ``secshadow-ums token``).
Tokens are never logged.

``certificate`` may be ``""`` to emulate a UMS that never received the device's
certificate. Relative ``certificate_file`` paths are relative to the config file.
Neither user passwords nor one-time passwords are ever logged.
"""

from __future__ import annotations

import hmac
import json
import os
import re
import secrets
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from twisted.logger import Logger
from twisted.web.resource import Resource
from twisted.web.server import Request, Site

from secshadow.lab import certs
from secshadow.errors import SecretError, UsageError
from secshadow.secret import parse_certificate
from secshadow.web.tls import ServerTLS, load_server_tls

#: A session ends this many seconds after its last successful request (IMI: 30 minutes).
SESSION_IDLE_SECONDS = 30 * 60
#: A one-time password is valid this many seconds after it was issued (IMI: 5 minutes).
OTP_LIFETIME_SECONDS = 5 * 60
#: Largest request body the server reads (verify-otp JSON).
MAX_REQUEST_BODY = 4096

VERIFY_OTP_PATH = "/secshadow-device/v1/verify-otp"

_DEVICE_ID = re.compile(r"^[A-Za-z0-9._~-]{1,64}$")
_MAC = re.compile(r"^[0-9A-Fa-f]{12}$")
_log = Logger(namespace="secshadow.lab.imiserver")


class ConfigError(UsageError):
    """The server's configuration or flags are wrong (the CLI exits 2)."""


@dataclass(frozen=True)
class User:
    """An IMI user. ``devices``: ids the user may read, or ``None`` for all."""

    name: str
    password: str = field(repr=False)
    devices: frozenset[str] | None = None


@dataclass(frozen=True)
class Device:
    """A thin client as the UMS knows it; ``certificate_pem`` is ``""`` if the UMS has none."""

    id: str
    name: str
    last_ip: str
    port: int
    certificate_pem: str
    moved_to_bin: bool = False
    mac: str = "00E0C5000000"
    firmware_id: str = "21"
    parent_id: str = "-1"
    #: The gateway session id when the device is reached through the gateway relay.
    gateway_sid: str | None = None


@dataclass(frozen=True)
class GatewaySettings:
    """``"gateway"`` of the configuration: the relay's base ``url`` (``wss://host:port``),
    the token signing key and the lifetime of minted tokens (seconds)."""

    url: str
    signing_key: Any = field(repr=False)
    token_lifetime: float = 300.0


@dataclass(frozen=True)
class UMSConfig:
    """The parsed configuration file."""

    users: Mapping[str, User]
    devices: Mapping[str, Device]
    shadow_licensed: bool = True
    api_versions: frozenset[str] = frozenset({"v2", "v3"})
    gateway: GatewaySettings | None = None


def _want(obj: Mapping[str, Any], key: str, kind: type | tuple[type, ...], where: str) -> Any:
    if key not in obj:
        raise ConfigError(f"{where}: missing {key!r}")
    value = obj[key]
    if not isinstance(value, kind) or isinstance(value, bool) and kind is not bool:
        raise ConfigError(f"{where}: {key!r} has the wrong type")
    return value


def _parse_user(raw: Any, index: int, environ: Mapping[str, str]) -> User:
    where = f"users[{index}]"
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{where} must be an object")
    name = _want(raw, "name", str, where)
    if not name or ":" in name:
        raise ConfigError(f"{where}: the user name must be non-empty and contain no ':'")
    if "password" in raw:
        password = _want(raw, "password", str, where)
    elif "password_env" in raw:
        variable = _want(raw, "password_env", str, where)
        if variable not in environ:
            raise ConfigError(f"{where}: environment variable {variable} (password_env) is not set")
        password = environ[variable]
    else:
        raise ConfigError(f"{where}: give 'password' or 'password_env'")
    if not password:
        raise ConfigError(f"{where}: the password of user {name!r} is empty")
    devices = None
    if "devices" in raw:
        allowed = raw["devices"]
        if not isinstance(allowed, list) or not all(isinstance(d, (str, int)) for d in allowed):
            raise ConfigError(f"{where}: 'devices' must be a list of device ids")
        devices = frozenset(str(d) for d in allowed)
    return User(name=name, password=password, devices=devices)


def _parse_device(raw: Any, index: int, base_dir: str) -> Device:
    where = f"devices[{index}]"
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{where} must be an object")
    device_id = str(_want(raw, "id", (str, int), where))
    if not _DEVICE_ID.match(device_id):
        raise ConfigError(f"{where}: id must be 1 to 64 letters, digits or . _ ~ -")
    where = f"device {device_id}"
    if "certificate" in raw:
        pem = _want(raw, "certificate", str, where)
    elif "certificate_file" in raw:
        path = os.path.join(base_dir, _want(raw, "certificate_file", str, where))
        try:
            with open(path, encoding="ascii") as f:
                pem = f.read(65536)
        except (OSError, UnicodeDecodeError) as e:
            raise ConfigError(f"{where}: cannot read certificate_file {path}: {e}") from None
    else:
        raise ConfigError(f"{where}: give 'certificate' (PEM text, may be empty) or 'certificate_file'")
    if pem.strip():
        try:
            parse_certificate(pem)
        except SecretError as e:
            raise ConfigError(f"{where}: {e.message}") from None
    port = raw.get("port", 5900)
    if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
        raise ConfigError(f"{where}: port must be a number from 1 to 65535")
    mac = raw.get("mac", f"00E0C5{int.from_bytes(device_id.encode()[-3:], 'big') & 0xFFFFFF:06X}")
    if not isinstance(mac, str) or not _MAC.match(mac.replace(":", "")):
        raise ConfigError(f"{where}: mac must be 12 hex digits")
    moved = raw.get("movedToBin", False)
    if not isinstance(moved, bool):
        raise ConfigError(f"{where}: movedToBin must be true or false")
    gateway_sid = raw.get("gateway_sid")
    if gateway_sid is not None and (not isinstance(gateway_sid, str) or not re.match(r"^[A-Za-z0-9_-]{1,64}$", gateway_sid)):
        raise ConfigError(f"{where}: gateway_sid must be 1 to 64 letters, digits, _ or -")
    last_ip = raw.get("lastIP", "127.0.0.1")
    name = raw.get("name", f"device-{device_id}")
    firmware = raw.get("firmwareID", "21")
    parent = raw.get("parentID", "-1")
    for key, value in (("lastIP", last_ip), ("name", name), ("firmwareID", firmware), ("parentID", parent)):
        if not isinstance(value, str):
            raise ConfigError(f"{where}: {key} must be a string")
    return Device(
        id=device_id,
        name=name,
        last_ip=last_ip,
        port=port,
        certificate_pem=pem,
        moved_to_bin=moved,
        mac=mac.replace(":", "").upper(),
        firmware_id=firmware,
        parent_id=parent,
        gateway_sid=gateway_sid,
    )


def config_from_dict(
    data: Any, base_dir: str = ".", environ: Mapping[str, str] | None = None
) -> UMSConfig:
    """Validate a decoded configuration (shape in the module docstring).

    Raises :class:`ConfigError` naming the offending entry; never quotes a password.
    """
    environ = os.environ if environ is None else environ
    if not isinstance(data, Mapping):
        raise ConfigError("the configuration must be a JSON object")
    unknown = set(data) - {"users", "devices", "shadow_licensed", "api_versions", "gateway"}
    if unknown:
        raise ConfigError(f"unknown configuration keys: {', '.join(sorted(unknown))}")
    raw_users = data.get("users", [])
    raw_devices = data.get("devices", [])
    if not isinstance(raw_users, list) or not isinstance(raw_devices, list):
        raise ConfigError("'users' and 'devices' must be lists")
    users: dict[str, User] = {}
    for i, raw in enumerate(raw_users):
        user = _parse_user(raw, i, environ)
        if user.name in users:
            raise ConfigError(f"user {user.name!r} is configured twice")
        users[user.name] = user
    devices: dict[str, Device] = {}
    for i, raw in enumerate(raw_devices):
        device = _parse_device(raw, i, base_dir)
        if device.id in devices:
            raise ConfigError(f"device {device.id} is configured twice")
        devices[device.id] = device
    licensed = data.get("shadow_licensed", True)
    if not isinstance(licensed, bool):
        raise ConfigError("shadow_licensed must be true or false")
    versions = data.get("api_versions", ["v2", "v3"])
    if not isinstance(versions, list) or not set(versions) <= {"v2", "v3"} or not versions:
        raise ConfigError('api_versions must be a non-empty list of "v2" and/or "v3"')
    gateway = _parse_gateway(data["gateway"], base_dir) if "gateway" in data else None
    behind = sorted(d.id for d in devices.values() if d.gateway_sid)
    if behind and gateway is None:
        raise ConfigError(f"device(s) {', '.join(behind)} have a gateway_sid but the configuration has no 'gateway'")
    return UMSConfig(users=users, devices=devices, shadow_licensed=licensed, api_versions=frozenset(versions),
                     gateway=gateway)


def _parse_gateway(raw: Any, base_dir: str) -> GatewaySettings:
    from secshadow.gateway.tokens import load_private_key
    from secshadow.gateway.wire import parse_gateway_url

    where = "gateway"
    if not isinstance(raw, Mapping):
        raise ConfigError("'gateway' must be an object with 'url' and 'token_key_file'")
    url = _want(raw, "url", str, where).rstrip("/")
    try:
        parse_gateway_url(f"{url}/v1/sessions/x/console", what="gateway.url")
    except UsageError as e:
        raise ConfigError(f"{e.message} (gateway.url is the base, e.g. wss://gw.example:8443)") from None
    path = os.path.join(base_dir, _want(raw, "token_key_file", str, where))
    try:
        key = load_private_key(path)
    except UsageError as e:
        raise ConfigError(f"gateway.token_key_file: {e.message}") from None
    lifetime = raw.get("token_lifetime", 300)
    if isinstance(lifetime, bool) or not isinstance(lifetime, (int, float)) or not 0 < lifetime <= 3600:
        raise ConfigError("gateway.token_lifetime must be a number of seconds from 1 to 3600")
    return GatewaySettings(url=url, signing_key=key, token_lifetime=float(lifetime))


def load_config(path: str, environ: Mapping[str, str] | None = None) -> UMSConfig:
    """Read and validate the JSON configuration file at ``path``; raises :class:`ConfigError`."""
    try:
        with open(path, "rb") as f:
            text = f.read(16 * 1024 * 1024)
    except OSError as e:
        raise ConfigError(f"cannot read the configuration {path}: {e.strerror or e}") from None
    try:
        data = json.loads(text)
    except (ValueError, RecursionError) as e:
        where = f" (line {e.lineno}, column {e.colno})" if isinstance(e, json.JSONDecodeError) else ""
        raise ConfigError(f"the configuration {path} is not valid JSON{where}") from None
    return config_from_dict(data, os.path.dirname(os.path.abspath(path)), environ)


class Clock(Protocol):
    """What the state needs of a clock: ``IReactorTime.seconds`` (a reactor or ``task.Clock``)."""

    def seconds(self) -> float: ...


class UMSState:
    """Sessions and one-time passwords, timed by an injectable clock (``IReactorTime``)."""

    def __init__(self, config: UMSConfig, clock: Clock) -> None:
        self.config = config
        self._clock = clock
        self._sessions: dict[str, tuple[str, float]] = {}  # token -> (user, last use)
        self._otps: dict[str, dict[str, float]] = {}  # device id -> {password: expiry}

    def authenticate(self, name: str, password: str) -> User | None:
        """The user if ``password`` is right, else ``None`` (constant-time comparison)."""
        user = self.config.users.get(name)
        expected = user.password if user is not None else "\0unknown-user"
        matches = hmac.compare_digest(password.encode("utf-8"), expected.encode("utf-8"))
        return user if matches and user is not None else None

    def open_session(self, user: User) -> str:
        """Start a session and return its token (32 hex digits, like Tomcat's JSESSIONID)."""
        token = secrets.token_hex(16).upper()
        self._sessions[token] = (user.name, self._clock.seconds())
        return token

    def session_user(self, token: str | None) -> User | None:
        """The session's user, restarting its idle period; ``None`` if unknown or expired."""
        now = self._clock.seconds()
        for key, (_, last) in list(self._sessions.items()):
            if now - last > SESSION_IDLE_SECONDS:
                del self._sessions[key]
        if not token or token not in self._sessions:
            return None
        name, _ = self._sessions[token]
        self._sessions[token] = (name, now)
        return self.config.users.get(name)

    def close_session(self, token: str) -> None:
        self._sessions.pop(token, None)

    def issue_otp(self, device_id: str) -> str:
        """A fresh one-time password for the device (UUID4 text), valid for 5 minutes, once."""
        now = self._clock.seconds()
        pending = self._otps.setdefault(device_id, {})
        for key, expiry in list(pending.items()):
            if expiry <= now:
                del pending[key]
        password = str(uuid.uuid4())
        pending[password] = now + OTP_LIFETIME_SECONDS
        return password

    def verify_otp(self, device_id: str, password: str) -> tuple[bool, str]:
        """Check and consume a one-time password: ``(True, "")`` or ``(False, "expired"|"unknown")``."""
        now = self._clock.seconds()
        pending = self._otps.get(device_id, {})
        found = None
        for candidate in list(pending):
            if hmac.compare_digest(candidate.encode(), password.encode("utf-8", "replace")):
                found = candidate
        if found is None:
            return False, "unknown"
        expiry = pending.pop(found)
        if expiry <= now:
            return False, "expired"
        return True, ""


def _itg(code: str, message: str) -> dict[str, Any]:
    return {"message": message, "errorCode": code, "stackTrace": None}


class UMSResource(Resource):
    """The whole URL space as one leaf resource; routes on the path segments."""

    isLeaf = True

    def __init__(self, state: UMSState) -> None:
        super().__init__()
        self.state = state

    # helpers
    def _json(self, request: Request, status: int, body: Any) -> bytes:
        request.setResponseCode(status)
        request.setHeader(b"Content-Type", b"application/json; charset=utf-8")
        request.setHeader(b"Cache-Control", b"no-store")
        return json.dumps(body).encode("utf-8")

    def _not_found(self, request: Request) -> bytes:
        # Deliberately not an ITG body: an unknown path, as a servlet container answers it.
        request.setResponseCode(404)
        request.setHeader(b"Content-Type", b"text/plain; charset=utf-8")
        return b"Not Found\n"

    def _method_not_allowed(self, request: Request, allowed: bytes) -> bytes:
        request.setHeader(b"Allow", allowed)
        return self._json(request, 405, {"message": "Method Not Allowed", "errorCode": None, "stackTrace": None})

    def render(self, request: Request) -> bytes:
        path = (request.path or b"/").decode("utf-8", "replace")
        parts = [p for p in path.split("/") if p]
        method = request.method
        if parts[:1] == ["umsapi"] and len(parts) >= 3:
            version = parts[1]
            if version == "v3" and parts[2:] == ["login"]:
                return self._login(request) if method == b"POST" else self._method_not_allowed(request, b"POST")
            if version == "v3" and parts[2:] == ["logout"]:
                return self._logout(request) if method == b"POST" else self._method_not_allowed(request, b"POST")
            if version == "v3" and parts[2:] == ["thinclients"]:
                if method not in (b"GET", b"HEAD"):
                    return self._method_not_allowed(request, b"GET")
                return self._thinclient_list(request)
            if version in self.state.config.api_versions and len(parts) == 4 and parts[2] == "thinclients":
                if method not in (b"GET", b"HEAD"):
                    return self._method_not_allowed(request, b"GET")
                return self._thinclient(request, parts[3])
        if path.rstrip("/") == VERIFY_OTP_PATH:
            return self._verify_otp(request) if method == b"POST" else self._method_not_allowed(request, b"POST")
        return self._not_found(request)

    def _login(self, request: Request) -> bytes:
        name = request.getUser().decode("utf-8", "replace")
        password = request.getPassword().decode("utf-8", "replace")
        user = self.state.authenticate(name, password) if name else None
        if user is None:
            _log.info("login refused for user {user!r}", user=name)
            request.setHeader(b"WWW-Authenticate", b'Basic realm="UMS"')
            return self._json(request, 401, _itg("ITG-0B001", "Authentication failed"))
        token = self.state.open_session(user)
        request.addCookie(b"JSESSIONID", token.encode(), path=b"/umsapi/", secure=True, httpOnly=True)
        _log.info("user {user!r} logged in", user=user.name)
        return self._json(request, 200, {"message": f"JSESSIONID={token}"})

    def _session_token(self, request: Request) -> str | None:
        raw = request.getCookie(b"JSESSIONID")
        return raw.decode("ascii", "replace") if raw else None

    def _logout(self, request: Request) -> bytes:
        token = self._session_token(request)
        user = self.state.session_user(token)
        if user is None or token is None:
            return self._json(request, 401, _itg("ITG-0B001", "Not authenticated"))
        self.state.close_session(token)
        _log.info("user {user!r} logged out", user=user.name)
        request.addCookie(b"JSESSIONID", b"", path=b"/umsapi/", secure=True, httpOnly=True, max_age=b"0")
        return self._json(request, 200, {"message": "Logout successful"})

    def _thinclient(self, request: Request, device_id: str) -> bytes:
        user = self.state.session_user(self._session_token(request))
        if user is None:
            return self._json(request, 401, _itg("ITG-0B001", "Not authenticated"))
        device = self.state.config.devices.get(device_id)
        if device is None:
            return self._json(request, 404, _itg("ITG-0A001", f"Thin client with id {device_id} not found"))
        if user.devices is not None and device.id not in user.devices:
            return self._json(request, 403, _itg("ITG-0B003", "Access denied"))
        if device.moved_to_bin:
            return self._json(request, 404, _itg("ITG-0A018", f"Thin client {device_id} is in the recycle bin"))
        args: dict[bytes, list[bytes]] = request.args or {}
        facets = {
            f.strip().decode("utf-8", "replace")
            for value in args.get(b"facets", [])
            for f in value.split(b",")
        }
        document: dict[str, Any] = {
            "unitID": device.mac,
            "mac": device.mac,
            "firmwareID": device.firmware_id,
            "lastIP": device.last_ip,
        }
        if "shadow" in facets:
            if not self.state.config.shadow_licensed:
                return self._json(request, 403, _itg("ITG-0C001", "A licence is required for this feature"))
            document["shadowSecret"] = {
                "certificate": device.certificate_pem,
                "password": self.state.issue_otp(device.id),
            }
            _log.info("issued a one-time password for device {device} to user {user!r}",
                      device=device.id, user=user.name)
            gateway = self.state.config.gateway
            if device.gateway_sid and gateway is not None:
                from secshadow.gateway.tokens import mint_token
                from secshadow.gateway.wire import session_url

                document["shadowSecret"]["gateway"] = {
                    "url": session_url(gateway.url, device.gateway_sid, "console"),
                    "token": mint_token(gateway.signing_key, device.gateway_sid, "console", gateway.token_lifetime),
                }
                _log.info("issued a console token for gateway session {sid} (device {device})",
                          sid=device.gateway_sid, device=device.id)
        version = "v3" if b"/v3/" in (request.path or b"") else "v2"
        self_href = f"{_origin(request)}/umsapi/{version}/thinclients/{device.id}"
        document.update(
            {
                "id": device.id,
                "name": device.name,
                "parentID": device.parent_id,
                "movedToBin": device.moved_to_bin,
                "objectType": "tc",
                "links": [{"rel": "self", "href": self_href}],
            }
        )
        return self._json(request, 200, document)

    def _thinclient_list(self, request: Request) -> bytes:
        """``GET /umsapi/v3/thinclients``: the main data of every device the user may
        read (no ``shadowSecret``; devices in the recycle bin included, flagged)."""
        user = self.state.session_user(self._session_token(request))
        if user is None:
            return self._json(request, 401, _itg("ITG-0B001", "Not authenticated"))
        origin = _origin(request)
        listing = [
            {"unitID": d.mac, "mac": d.mac, "firmwareID": d.firmware_id, "lastIP": d.last_ip, "id": d.id,
             "name": d.name, "parentID": d.parent_id, "movedToBin": d.moved_to_bin, "objectType": "tc",
             "links": [{"rel": "self", "href": f"{origin}/umsapi/v3/thinclients/{d.id}"}]}
            for d in self.state.config.devices.values()
            if user.devices is None or d.id in user.devices
        ]
        return self._json(request, 200, listing)

    def _verify_otp(self, request: Request) -> bytes:
        assert request.content is not None
        raw = request.content.read(MAX_REQUEST_BODY + 1)
        try:
            if len(raw) > MAX_REQUEST_BODY:
                raise ValueError("request body too large")
            body = json.loads(raw)
            device_id = body["device_id"]
            password = body["password"]
            if not isinstance(device_id, str) or not isinstance(password, str):
                raise TypeError
        except (ValueError, TypeError, KeyError, RecursionError):
            return self._json(
                request,
                400,
                {
                    "message": 'expected JSON {"device_id": "...", "password": "..."}',
                    "errorCode": "SECSHADOW-BAD-REQUEST",
                    "stackTrace": None,
                },
            )
        valid, reason = self.state.verify_otp(device_id, password)
        safe_id = device_id if _DEVICE_ID.match(device_id) else "<invalid id>"
        if valid:
            _log.info("one-time password for device {device} accepted", device=safe_id)
            return self._json(request, 200, {"valid": True})
        _log.info("one-time password for device {device} refused ({reason})", device=safe_id, reason=reason)
        return self._json(request, 200, {"valid": False, "reason": reason})


def _origin(request: Request) -> str:
    scheme = "https" if request.isSecure() else "http"
    host = request.getHeader(b"host")
    if host and re.match(rb"^[A-Za-z0-9.\-:\[\]]{1,300}$", host):
        return f"{scheme}://{host.decode('ascii')}"
    address = request.getHost()
    return f"{scheme}://{getattr(address, 'host', '127.0.0.1')}:{getattr(address, 'port', 0)}"


class UMSSite(Site):
    """A ``Site`` whose access log is one short line per request: method, path, status.

    The query string is left out; no header (``Authorization``, ``Cookie``) is logged.
    """

    noisy = False

    def log(self, request: Any) -> None:
        path = (request.path or b"").decode("utf-8", "replace")
        _log.info(
            "{method} {path} -> {code}",
            method=request.method.decode("ascii", "replace"),
            path=path,
            code=request.code,
        )


def make_site(config: UMSConfig, clock: Clock | None = None) -> UMSSite:
    """The ``twisted.web`` site serving the configuration (``clock`` defaults to the reactor)."""
    if clock is None:
        from twisted.internet import reactor as clock
    assert clock is not None
    return UMSSite(UMSResource(UMSState(config, clock)))


def generate_self_signed(directory: str) -> tuple[str, str]:
    """Create (or reuse) ``ums-cert.pem`` and ``ums-key.pem`` in ``directory``.

    The certificate (from :func:`secshadow.lab.certs.generate_self_signed`) is self-signed,
    EC P-256, valid for 825 days, with subjectAltName ``DNS:localhost, IP:127.0.0.1, IP:::1``. Existing files are reused so the
    fingerprint stays stable across restarts. Returns ``(cert_path, key_path)``;
    raises :class:`ConfigError` if the directory cannot be written.
    """
    cert_path = os.path.join(directory, "ums-cert.pem")
    key_path = os.path.join(directory, "ums-key.pem")
    if os.path.exists(cert_path) and os.path.exists(key_path):
        return cert_path, key_path
    cert_pem, key_pem = certs.generate_self_signed(
        key_type="ecdsa-p256",
        subject_cn="secshadow-ums",
        organization="secshadow",
        locality=None,
        country=None,
        days=825,
        san_dns=["localhost"],
        san_ips=["127.0.0.1", "::1"],
    )
    try:
        os.makedirs(directory, exist_ok=True)
        fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(key_pem)
        with open(cert_path, "wb") as f:
            f.write(cert_pem)
    except OSError as e:
        raise ConfigError(f"cannot write the generated certificate to {directory}: {e.strerror or e}") from None
    return cert_path, key_path


def load_tls(cert_path: str, key_path: str) -> tuple[ServerTLS, str]:
    """Server TLS from PEM files (the product's :func:`secshadow.web.tls.load_server_tls`:
    TLS 1.2+, ``DEFAULT`` ciphers), and the certificate's SHA-256 fingerprint
    (``AA:BB:...``).

    Raises :class:`ConfigError` when a file cannot be read or they do not form a pair.
    """
    try:
        tls = load_server_tls(cert_path, key_path, flags=("--cert", "--key"))
    except UsageError as e:
        raise ConfigError(e.message) from None
    return tls, tls.fingerprint
