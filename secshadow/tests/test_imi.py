"""The IMI client against the reference server's resource tree (treq.testing.StubTreq)."""

from __future__ import annotations

import json
import re

import pytest
import pytest_twisted
from hypothesis import given, settings
from hypothesis import strategies as st
from treq.testing import StubTreq
from twisted.internet import reactor
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock
from twisted.logger import formatEvent, globalLogPublisher
from twisted.web.resource import Resource

from secshadow.errors import SecretError, UMSError, UsageError
from secshadow.imi import (
    IMIClient,
    error_from_response,
    fetch_shadow_secret,
    secret_from_response,
    validate_base_url,
    validate_device_id,
)
from secshadow.secret import parse_certificate, secret_from_document
from secshadow.tests._umsfixtures import ADMIN_PASSWORD, DEVICE_PEM, OPS_PASSWORD, make_server
from secshadow.umstrust import UMSTrust

BASE = "https://ums.test:8443"
UUID = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$")


def client_for(resource: Resource, base: str = BASE) -> IMIClient:
    return IMIClient(Clock(), base, UMSTrust.insecure(), http_client=StubTreq(resource))


class Canned(Resource):
    """Login like UMS; every other request gets ``(status, body)``."""

    isLeaf = True

    def __init__(self, status: int, body: bytes, *, cookie: bool = True) -> None:
        super().__init__()
        self.status, self.body, self.cookie = status, body, cookie
        self.cookies_seen: list[bytes | None] = []

    def render(self, request):
        if request.path == b"/umsapi/v3/login":
            if self.cookie:
                request.addCookie(b"JSESSIONID", b"ABC123", path=b"/umsapi/", secure=True, httpOnly=True)
            return json.dumps({"message": "JSESSIONID=ABC123"}).encode()
        if request.path == b"/umsapi/v3/logout":
            return b"{}"
        self.cookies_seen.append(request.getHeader(b"cookie"))
        request.setResponseCode(self.status)
        return self.body


def assert_no_secret(message: str) -> None:
    assert ADMIN_PASSWORD not in message and OPS_PASSWORD not in message


@pytest_twisted.ensureDeferred
async def test_fetch_returns_pin_password_and_address_and_logs_out():
    resource, state, _ = make_server()
    client = client_for(resource)
    secret = await client.fetch_shadow_secret("27", "admin", ADMIN_PASSWORD)
    assert secret.certificate_der == parse_certificate(DEVICE_PEM)
    assert UUID.match(secret.password.reveal())
    assert (secret.host, secret.device_id, secret.device_name) == ("127.0.0.1", "27", "Curry")
    assert [s for s in resource.seen] == [
        ("POST", "/umsapi/v3/login"),
        ("GET", "/umsapi/v3/thinclients/27?facets=shadow"),
        ("POST", "/umsapi/v3/logout"),
    ]
    assert state._sessions == {}  # logged out
    assert state.verify_otp("27", secret.password.reveal()) == (True, "")


@pytest_twisted.ensureDeferred
async def test_session_cookie_is_sent_and_each_fetch_gets_a_fresh_password():
    resource, _, _ = make_server()
    client = client_for(resource)
    with pytest.raises(UMSError, match="not logged in"):
        await client.shadow_secret("27")
    await client.login("admin", ADMIN_PASSWORD)
    first = await client.shadow_secret("27")
    second = await client.shadow_secret("27")
    assert first.password != second.password
    await client.logout()
    assert not client.logged_in


@pytest_twisted.ensureDeferred
async def test_session_from_login_body_when_no_cookie_is_set():
    canned = Canned(404, b"")
    canned.cookie = False
    client = client_for(canned)
    await client.login("admin", ADMIN_PASSWORD)
    with pytest.raises(UMSError):
        await client.shadow_secret("27")
    assert canned.cookies_seen[0] == b"JSESSIONID=ABC123"


@pytest_twisted.ensureDeferred
async def test_falls_back_to_documented_v2_path_when_v3_is_unknown():
    resource, _, _ = make_server(api_versions=["v2"])
    secret = await client_for(resource).fetch_shadow_secret("27", "admin", ADMIN_PASSWORD)
    assert secret.device_id == "27"
    paths = [path for _, path in resource.seen]
    assert paths[1:3] == ["/umsapi/v3/thinclients/27?facets=shadow", "/umsapi/v2/thinclients/27?facets=shadow"]


@pytest_twisted.ensureDeferred
async def test_unknown_device_is_itg_0a001_without_v2_fallback():
    resource, state, _ = make_server()
    with pytest.raises(UMSError) as info:
        await client_for(resource).fetch_shadow_secret("99", "admin", ADMIN_PASSWORD)
    assert "device 99 not found" in info.value.message
    assert "ITG-0A001" in info.value.message
    assert not any("/v2/" in path for _, path in resource.seen)
    assert state._sessions == {}  # logged out even on failure


@pytest_twisted.ensureDeferred
async def test_device_in_recycle_bin():
    resource, _, _ = make_server()
    with pytest.raises(UMSError) as info:
        await client_for(resource).fetch_shadow_secret("28", "admin", ADMIN_PASSWORD)
    assert "device 28 is in the UMS recycle bin" in info.value.message


@pytest_twisted.ensureDeferred
async def test_access_denied_names_the_user():
    resource, _, _ = make_server()
    with pytest.raises(UMSError) as info:
        await client_for(resource).fetch_shadow_secret("27", "ops", OPS_PASSWORD)
    assert "refused access for user 'ops'" in info.value.message
    assert "ITG-0B003" in info.value.message
    assert_no_secret(info.value.message)


@pytest_twisted.ensureDeferred
async def test_licence_required():
    resource, _, _ = make_server(shadow_licensed=False)
    with pytest.raises(UMSError) as info:
        await client_for(resource).fetch_shadow_secret("27", "admin", ADMIN_PASSWORD)
    assert "requires a licence" in info.value.message and "ITG-0C001" in info.value.message


@pytest_twisted.ensureDeferred
async def test_wrong_password_is_login_refused_and_never_echoed():
    resource, _, _ = make_server()
    client = client_for(resource)
    wrong = "Wr0ng-Guess-Pw"
    with pytest.raises(UMSError) as info:
        await client.fetch_shadow_secret("27", "admin", wrong)
    assert "login refused for user 'admin'" in info.value.message
    assert wrong not in info.value.message and wrong not in repr(client)
    assert [p for _, p in resource.seen] == ["/umsapi/v3/login"]


@pytest_twisted.ensureDeferred
async def test_expired_session_is_reported():
    resource, _, clock = make_server()
    client = client_for(resource)
    await client.login("admin", ADMIN_PASSWORD)
    clock.advance(29 * 60)
    await client.shadow_secret("27")  # restarts the idle period
    clock.advance(29 * 60)
    await client.shadow_secret("27")
    clock.advance(31 * 60)
    with pytest.raises(UMSError) as info:
        await client.shadow_secret("27")
    assert "did not accept the session of user 'admin'" in info.value.message
    assert "may have expired" in info.value.message


@pytest_twisted.ensureDeferred
async def test_non_json_body_is_a_bad_response():
    canned = Canned(200, b"<html>UMS maintenance</html>")
    with pytest.raises(UMSError) as info:
        await client_for(canned).fetch_shadow_secret("27", "admin", ADMIN_PASSWORD)
    assert info.value.message.startswith("bad response from the UMS: not JSON")
    assert "/umsapi/v3/thinclients/27?facets=shadow" in info.value.message
    assert canned.cookies_seen == [b"JSESSIONID=ABC123"]


@pytest_twisted.ensureDeferred
async def test_document_without_shadow_secret_is_a_bad_response():
    canned = Canned(200, json.dumps({"id": "27", "lastIP": "10.0.0.1"}).encode())
    with pytest.raises(UMSError, match="no shadowSecret"):
        await client_for(canned).fetch_shadow_secret("27", "admin", ADMIN_PASSWORD)


@pytest_twisted.ensureDeferred
async def test_document_for_another_device_is_refused():
    body = {"id": "31", "shadowSecret": {"certificate": DEVICE_PEM, "password": "x"}}
    with pytest.raises(UMSError, match="asked for device 27"):
        await client_for(Canned(200, json.dumps(body).encode())).fetch_shadow_secret(
            "27", "admin", ADMIN_PASSWORD
        )


@pytest_twisted.ensureDeferred
async def test_empty_certificate_tells_the_user_to_reboot_the_device():
    resource, _, _ = make_server()
    with pytest.raises(SecretError) as info:
        await client_for(resource).fetch_shadow_secret("29", "admin", ADMIN_PASSWORD)
    assert "reboot the device" in info.value.message
    assert info.value.exit_code == 2


@pytest_twisted.ensureDeferred
async def test_unknown_path_everywhere_says_check_the_url():
    with pytest.raises(UMSError) as info:
        await client_for(Canned(404, b"Not Found")).fetch_shadow_secret("27", "admin", ADMIN_PASSWORD)
    assert "HTTP 404" in info.value.message and "/umsapi/v2/thinclients/27" in info.value.message


@pytest_twisted.ensureDeferred
async def test_server_message_is_scrubbed_of_the_password():
    body = json.dumps({"message": f"bad password {ADMIN_PASSWORD}\n\x1b[31m", "errorCode": "ITG-0B005"})
    with pytest.raises(UMSError) as info:
        await client_for(Canned(403, body.encode())).fetch_shadow_secret("27", "admin", ADMIN_PASSWORD)
    assert_no_secret(info.value.message)
    assert "<redacted>" in info.value.message and "\x1b" not in info.value.message


ODD_PASSWORD = "Pa ss/w+rd:\u00e4!&="  # spaces, slash, plus, colon, non-ASCII: every encoding differs


def derived_forms(user: str, password: str) -> dict[str, str]:
    """The forms of the password a UMS might echo back (what the issue found in stderr)."""
    from base64 import b64encode, urlsafe_b64encode
    from urllib.parse import quote, quote_plus

    basic = b64encode(f"{user}:{password}".encode()).decode()
    return {
        "literal": password,
        "authorization header": f"Basic {basic}",
        "base64 of user:password": basic,
        "base64 of user:password, unpadded": basic.rstrip("="),
        "base64 of the password": b64encode(password.encode()).decode(),
        "urlsafe base64 of the password": urlsafe_b64encode(password.encode()).decode(),
        "quote": quote(password, safe=""),
        "quote, lower-case hex": quote(password, safe="").lower(),
        "quote with / safe": quote(password),
        "quote_plus": quote_plus(password),
    }


class EchoAuthorization(Resource):
    """A UMS that refuses with ITG-0B005 and echoes the request's Authorization header and
    every derived form of the password in its error message (``where``: "login" or
    "secret", the request that answers so)."""

    isLeaf = True

    def __init__(self, where: str) -> None:
        super().__init__()
        self.where = where

    def render(self, request):
        if request.path == b"/umsapi/v3/logout":
            return b"{}"
        if request.path == b"/umsapi/v3/login" and self.where == "secret":
            request.addCookie(b"JSESSIONID", b"ABC123", path=b"/umsapi/")
            return json.dumps({"message": "JSESSIONID=ABC123"}).encode()
        seen = (request.getHeader(b"authorization") or b"").decode()
        forms = " | ".join(derived_forms("admin", ODD_PASSWORD).values())
        request.setResponseCode(403)
        return json.dumps({"errorCode": "ITG-0B005",
                           "message": f"denied; you sent {seen!r}; we also know {forms}"}).encode()


@pytest.mark.parametrize("where", ["login", "secret"])
@pytest_twisted.ensureDeferred
async def test_every_derived_form_of_the_password_is_redacted(where: str):
    """Base64 of ``user:password`` (the Authorization header), Base64 of the password,
    percent-encoded forms: none reaches the error message; each becomes <redacted>."""
    with pytest.raises(UMSError) as info:
        await client_for(EchoAuthorization(where)).fetch_shadow_secret("27", "admin", ODD_PASSWORD)
    message = info.value.message
    assert "the UMS refused access for user 'admin' (ITG-0B005: denied" in message
    leaked = [name for name, form in derived_forms("admin", ODD_PASSWORD).items()
              if form.lower() in message.lower()]
    assert leaked == [], message
    assert "<redacted>" in message


def test_server_text_is_quoted_as_one_short_clean_line():
    """Server text from the login exchange: at most 200 characters, printable, one line."""
    body = json.dumps({"errorCode": "ITG-0B005",
                       "message": "first line\r\nsecond\u2028third\x1b[31m\t" + "y" * 5000})
    error = error_from_response(403, body.encode(), url=BASE, user="admin", secrets=(ADMIN_PASSWORD,))
    excerpt = error.message.split("(ITG-0B005: ", 1)[1]
    assert excerpt.startswith("first line second third [31m yyy")
    assert len(error.message) < 200 + 120 and error.message.count("y") <= 200
    assert all(c.isprintable() for c in error.message) and "  " not in error.message


@pytest_twisted.ensureDeferred
async def test_logs_progress_but_never_secrets():
    resource, _, _ = make_server()
    events: list[str] = []

    def observer(event):
        events.append(formatEvent(event))

    globalLogPublisher.addObserver(observer)
    try:
        secret = await client_for(resource).fetch_shadow_secret("27", "admin", ADMIN_PASSWORD)
    finally:
        globalLogPublisher.removeObserver(observer)
    text = "\n".join(events)
    assert f"logging in to UMS at {BASE}" in text
    assert "fetched shadow secret for device 27" in text
    assert ADMIN_PASSWORD not in text and secret.password.reveal() not in text
    assert "JSESSIONID" not in text


@pytest.mark.integration
@pytest_twisted.ensureDeferred
async def test_connection_refused_names_the_url():
    port = reactor.listenTCP(0, Factory.forProtocol(Protocol), interface="127.0.0.1")
    number = port.getHost().port
    await port.stopListening()
    with pytest.raises(UMSError) as info:
        await fetch_shadow_secret(reactor, f"https://127.0.0.1:{number}", "27", "admin", ADMIN_PASSWORD,
                                  UMSTrust.insecure(), timeout=5)
    assert "refused" in info.value.message
    assert f"https://127.0.0.1:{number}/umsapi/v3/login" in info.value.message


@pytest.mark.integration
@pytest_twisted.ensureDeferred
async def test_silent_server_times_out():
    port = reactor.listenTCP(0, Factory.forProtocol(Protocol), interface="127.0.0.1")
    try:
        url = f"https://127.0.0.1:{port.getHost().port}"
        with pytest.raises(UMSError) as info:
            await fetch_shadow_secret(reactor, url, "27", "admin", ADMIN_PASSWORD, UMSTrust.insecure(),
                                      timeout=0.3)
        assert "did not answer within 0.3 s" in info.value.message
    finally:
        await port.stopListening()


@pytest.mark.parametrize(
    "url, fragment",
    [
        ("", "empty"),
        ("ftp://ums:8443", "https://"),
        ("https://admin:pw@ums:8443", "must not contain a user name"),
        ("https://", "no host"),
        ("https://ums:99999", "malformed"),
        ("https://ums:8443/?x=1", "query"),
    ],
)
def test_bad_base_url_is_a_usage_error(url, fragment):
    with pytest.raises(UsageError) as info:
        validate_base_url(url)
    assert fragment in info.value.message
    assert "pw@" not in info.value.message


def test_plaintext_url_is_flagged():
    assert IMIClient(Clock(), "http://127.0.0.1:8080/", UMSTrust.insecure()).is_plaintext
    assert not IMIClient(Clock(), "https://ums:8443", UMSTrust.insecure()).is_plaintext


@pytest.mark.parametrize("device_id", ["", "27/../1", "a b", "x" * 65, None, "27?facets=x"])
def test_bad_device_id_is_a_usage_error(device_id):
    with pytest.raises(UsageError, match="device id"):
        validate_device_id(device_id)


def test_device_id_int_is_accepted():
    assert validate_device_id(27) == "27"


# Hypothesis: whatever the server sends, parsing fails only with our own errors.
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=30),
    lambda children: st.lists(children, max_size=4)
    | st.dictionaries(
        st.sampled_from(["shadowSecret", "certificate", "password", "lastIP", "id", "name", "host", "port",
                         "errorCode", "message", "x"]),
        children,
        max_size=5,
    ),
    max_leaves=20,
)


@settings(max_examples=300, deadline=None)
@given(json_values)
def test_parsing_any_json_raises_only_secret_or_ums_errors(value):
    body = json.dumps(value).encode()
    try:
        secret_from_response(body, url=BASE, device_id="27")
    except (SecretError, UMSError):
        pass
    try:
        secret_from_document(value)
    except SecretError:
        pass
    assert isinstance(error_from_response(400, body, url=BASE, device_id="27"), UMSError)


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=200), st.integers(min_value=100, max_value=599))
def test_parsing_any_bytes_raises_only_secret_or_ums_errors(body, status):
    try:
        secret_from_response(body, url=BASE, device_id="27")
    except (SecretError, UMSError):
        pass
    assert isinstance(error_from_response(status, body, url=BASE, device_id="27"), UMSError)


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=40), st.one_of(st.text(max_size=40), st.uuids().map(str)))
def test_shadow_secret_fields_of_any_text_raise_only_our_errors(certificate, password):
    body = json.dumps({"id": "27", "shadowSecret": {"certificate": certificate, "password": password}})
    try:
        secret = secret_from_response(body.encode(), url=BASE, device_id="27")
    except (SecretError, UMSError) as e:
        # Short generated passwords ("cert") occur in ordinary words of the message;
        # a leak check means something only for distinctive values such as UUIDs.
        assert len(password) < 12 or password not in e.message
    else:
        assert secret.password.reveal() == password
