"""The reference IMI server: configuration, IMI shapes, sessions, one-time passwords, the CLI."""

from __future__ import annotations

import json
import os
import re
import selectors
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import pytest_twisted
from treq.testing import StubTreq
from twisted.internet import reactor

from secshadow.errors import UMSError
from secshadow.imi import fetch_shadow_secret
from secshadow.secret import parse_certificate
from secshadow.tests._umscerts import make_leaf
from secshadow.tests._umsfixtures import ADMIN_PASSWORD, DEVICE_PEM, config_dict, make_server
from secshadow.lab.imiserver.otpcheck import verify_otp
from secshadow.lab.imiserver.server import (
    OTP_LIFETIME_SECONDS,
    ConfigError,
    config_from_dict,
    generate_self_signed,
    load_config,
    load_tls,
    make_site,
)
from secshadow.umstrust import UMSTrust

BASE = "https://ums.test:8443"
REPO = Path(__file__).resolve().parents[2]


async def login(stub: StubTreq, user: str = "admin", password: str = ADMIN_PASSWORD):
    response = await stub.post(f"{BASE}/umsapi/v3/login", auth=(user, password))
    return response, await response.json() if response.code == 200 else None


async def get_json(stub: StubTreq, path: str, cookie: str | None):
    headers = {"Cookie": [f"JSESSIONID={cookie}"]} if cookie else {}
    response = await stub.get(f"{BASE}{path}", headers=headers)
    return response.code, json.loads(await response.content())


async def verify(stub: StubTreq, device_id: str, password: str):
    response = await stub.post(
        f"{BASE}/secshadow-device/v1/verify-otp", json={"device_id": device_id, "password": password}
    )
    return response.code, await response.json()


# --- IMI shapes ---------------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_login_sets_the_documented_cookie_and_body():
    resource, _, _ = make_server()
    stub = StubTreq(resource)
    response, body = await login(stub)
    assert response.code == 200
    (set_cookie,) = response.headers.getRawHeaders(b"set-cookie")
    match = re.fullmatch(rb"JSESSIONID=([0-9A-F]{32}); Path=/umsapi/; Secure; HttpOnly", set_cookie)
    assert match, set_cookie
    assert body == {"message": "JSESSIONID=" + match.group(1).decode()}


@pytest_twisted.ensureDeferred
async def test_wrong_or_missing_credentials_get_401():
    resource, _, _ = make_server()
    stub = StubTreq(resource)
    for user, password in (("admin", "nope"), ("ghost", ADMIN_PASSWORD)):
        response, _ = await login(stub, user, password)
        assert response.code == 401
        assert (await response.json())["errorCode"] == "ITG-0B001"
    response = await stub.post(f"{BASE}/umsapi/v3/login")
    assert response.code == 401


@pytest_twisted.ensureDeferred
async def test_document_has_the_protocol_shape_in_order():
    resource, _, _ = make_server()
    stub = StubTreq(resource)
    _, body = await login(stub)
    token = body["message"].split("=", 1)[1]
    status, document = await get_json(stub, "/umsapi/v2/thinclients/27?facets=shadow", token)
    assert status == 200
    assert list(document) == [
        "unitID", "mac", "firmwareID", "lastIP", "shadowSecret",
        "id", "name", "parentID", "movedToBin", "objectType", "links",
    ]
    assert document["unitID"] == document["mac"] == "00E0C54DCB8E"
    assert (document["id"], document["name"], document["lastIP"]) == ("27", "Curry", "127.0.0.1")
    assert (document["parentID"], document["movedToBin"], document["objectType"]) == ("-1", False, "tc")
    assert document["links"] == [{"rel": "self", "href": f"{BASE}/umsapi/v2/thinclients/27"}]
    assert parse_certificate(document["shadowSecret"]["certificate"]) == parse_certificate(DEVICE_PEM)
    assert re.fullmatch(r"[0-9a-f-]{36}", document["shadowSecret"]["password"])
    # Without the facet: main data only.
    status, plain = await get_json(stub, "/umsapi/v3/thinclients/27", token)
    assert status == 200 and "shadowSecret" not in plain


@pytest_twisted.ensureDeferred
async def test_without_session_everything_is_401_and_logout_ends_the_session():
    resource, _, _ = make_server()
    stub = StubTreq(resource)
    status, body = await get_json(stub, "/umsapi/v3/thinclients/27?facets=shadow", None)
    assert status == 401 and body["errorCode"] == "ITG-0B001"
    _, login_body = await login(stub)
    token = login_body["message"].split("=", 1)[1]
    response = await stub.post(f"{BASE}/umsapi/v3/logout", headers={"Cookie": [f"JSESSIONID={token}"]})
    assert response.code == 200
    status, _ = await get_json(stub, "/umsapi/v3/thinclients/27", token)
    assert status == 401


@pytest_twisted.ensureDeferred
async def test_itg_errors_for_unknown_and_binned_devices():
    resource, _, _ = make_server()
    stub = StubTreq(resource)
    _, body = await login(stub)
    token = body["message"].split("=", 1)[1]
    status, error = await get_json(stub, "/umsapi/v3/thinclients/99?facets=shadow", token)
    assert status == 404 and error["errorCode"] == "ITG-0A001" and set(error) == {
        "message", "errorCode", "stackTrace"}
    status, error = await get_json(stub, "/umsapi/v3/thinclients/28?facets=shadow", token)
    assert error["errorCode"] == "ITG-0A018"


@pytest_twisted.ensureDeferred
async def test_unknown_paths_are_plain_404_so_clients_can_fall_back():
    resource, _, _ = make_server(api_versions=["v2"])
    stub = StubTreq(resource)
    response = await stub.get(f"{BASE}/umsapi/v3/thinclients/27")
    assert response.code == 404
    assert b"errorCode" not in await response.content()
    response = await stub.get(f"{BASE}/umsapi/v3/login")
    assert response.code == 405


@pytest_twisted.ensureDeferred
async def test_session_expires_after_30_idle_minutes_and_use_restarts_it():
    resource, _, clock = make_server()
    stub = StubTreq(resource)
    _, body = await login(stub)
    token = body["message"].split("=", 1)[1]
    clock.advance(25 * 60)
    assert (await get_json(stub, "/umsapi/v3/thinclients/27", token))[0] == 200
    clock.advance(25 * 60)  # 50 minutes after login, 25 after the last use
    assert (await get_json(stub, "/umsapi/v3/thinclients/27", token))[0] == 200
    clock.advance(30 * 60 + 1)
    assert (await get_json(stub, "/umsapi/v3/thinclients/27", token))[0] == 401


# --- one-time passwords ---------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_one_time_password_is_valid_once_and_only_for_its_device():
    resource, _, _ = make_server()
    stub = StubTreq(resource)
    _, body = await login(stub)
    token = body["message"].split("=", 1)[1]
    _, document = await get_json(stub, "/umsapi/v3/thinclients/27?facets=shadow", token)
    password = document["shadowSecret"]["password"]
    assert await verify(stub, "28", password) == (200, {"valid": False, "reason": "unknown"})
    assert await verify(stub, "27", password) == (200, {"valid": True})
    assert await verify(stub, "27", password) == (200, {"valid": False, "reason": "unknown"})


@pytest_twisted.ensureDeferred
async def test_one_time_password_expires_after_five_minutes():
    resource, _, clock = make_server()
    stub = StubTreq(resource)
    _, body = await login(stub)
    token = body["message"].split("=", 1)[1]
    _, early = await get_json(stub, "/umsapi/v3/thinclients/27?facets=shadow", token)
    _, late = await get_json(stub, "/umsapi/v3/thinclients/27?facets=shadow", token)
    clock.advance(OTP_LIFETIME_SECONDS - 1)
    assert await verify(stub, "27", early["shadowSecret"]["password"]) == (200, {"valid": True})
    clock.advance(2)
    assert await verify(stub, "27", late["shadowSecret"]["password"]) == (
        200, {"valid": False, "reason": "expired"})


@pytest_twisted.ensureDeferred
async def test_verify_otp_rejects_malformed_requests():
    resource, _, _ = make_server()
    stub = StubTreq(resource)
    for data in (b"not json", b'{"device_id": 27, "password": "x"}', b"{}", b"x" * 5000):
        response = await stub.post(f"{BASE}/secshadow-device/v1/verify-otp", data=data)
        assert response.code == 400
        assert (await response.json())["errorCode"] == "SECSHADOW-BAD-REQUEST"


# --- configuration --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "change, fragment",
    [
        (lambda d: d["users"][0].pop("password"), "give 'password' or 'password_env'"),
        (lambda d: d["users"][0].update(password=""), "password of user 'admin' is empty"),
        (lambda d: d["users"].append({"name": "admin", "password": "x"}), "configured twice"),
        (lambda d: d["devices"][0].update(id="27/x"), "id must be"),
        (lambda d: d["devices"][0].update(certificate="-----BEGIN CERTIFICATE-----\nAAAA\n"
                                                      "-----END CERTIFICATE-----"), "device 27"),
        (lambda d: d["devices"][0].update(port=70000), "port must be"),
        (lambda d: d["devices"][0].pop("certificate"), "give 'certificate'"),
        (lambda d: d.update(extra=1), "unknown configuration keys: extra"),
        (lambda d: d.update(api_versions=["v4"]), "api_versions"),
    ],
)
def test_config_errors_are_clear_and_never_quote_passwords(change, fragment):
    data = config_dict()
    change(data)
    with pytest.raises(ConfigError) as info:
        config_from_dict(data, environ={})
    assert fragment in info.value.message
    assert ADMIN_PASSWORD not in info.value.message


def test_password_env_and_certificate_file(tmp_path):
    (tmp_path / "dev.pem").write_text(DEVICE_PEM)
    data = config_dict()
    data["users"][0] = {"name": "admin", "password_env": "UMS_TEST_PW"}
    data["devices"][0].pop("certificate")
    data["devices"][0]["certificate_file"] = "dev.pem"
    path = tmp_path / "ums.json"
    path.write_text(json.dumps(data))
    config = load_config(str(path), environ={"UMS_TEST_PW": "from-env"})
    assert config.users["admin"].password == "from-env"
    assert "from-env" not in repr(config)
    assert config.devices["27"].certificate_pem == DEVICE_PEM
    with pytest.raises(ConfigError, match="UMS_TEST_PW"):
        load_config(str(path), environ={})


def test_invalid_json_config_names_the_line(tmp_path):
    path = tmp_path / "ums.json"
    path.write_text('{"users": [\n  oops]}')
    with pytest.raises(ConfigError, match=r"not valid JSON \(line 2"):
        load_config(str(path))


def test_generated_certificate_is_reused_and_names_localhost(tmp_path):
    cert, key = generate_self_signed(str(tmp_path))
    _, first = load_tls(cert, key)
    _, second = load_tls(*generate_self_signed(str(tmp_path)))
    assert first == second
    assert os.stat(key).st_mode & 0o077 == 0
    text = Path(cert).read_bytes()
    from cryptography import x509

    san = x509.load_pem_x509_certificate(text).extensions.get_extension_for_class(x509.SubjectAlternativeName)
    assert "localhost" in san.value.get_values_for_type(x509.DNSName)


# --- real HTTPS: verify_otp over TLS -------------------------------------------------------------


@pytest.mark.integration
@pytest_twisted.ensureDeferred
async def test_verify_otp_client_over_https(tmp_path):
    cert, key = generate_self_signed(str(tmp_path))
    tls, fingerprint = load_tls(cert, key)
    from secshadow.lab.imiserver.server import config_from_dict as build

    site = make_site(build(config_dict(), environ={}), reactor)
    port = reactor.listenSSL(0, site, tls, interface="127.0.0.1")
    try:
        url = f"https://127.0.0.1:{port.getHost().port}"
        trust = UMSTrust.from_fingerprint(fingerprint)
        secret = await fetch_shadow_secret(reactor, url, "27", "admin", ADMIN_PASSWORD, trust, timeout=10)
        assert await verify_otp(reactor, url, "27", secret.password, trust) is True
        assert await verify_otp(reactor, url, "27", secret.password, trust) is False
        with pytest.raises(UMSError, match="does not match --ums-fingerprint"):
            await verify_otp(reactor, url, "27", "x", UMSTrust.from_fingerprint(make_leaf().sha256))
    finally:
        await port.stopListening()


# --- the CLI --------------------------------------------------------------------------------------


def run_cli(*args: str, timeout: float = 30) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    return subprocess.run(
        [sys.executable, "-m", "secshadow.lab.imiserver.cli", *args],
        capture_output=True, text=True, timeout=timeout, env=env, cwd=str(REPO),
    )


@pytest.mark.integration
def test_cli_config_error_exits_2_without_traceback(tmp_path):
    bad = tmp_path / "ums.json"
    bad.write_text(json.dumps({"users": [{"name": "admin"}]}))
    result = run_cli("--config", str(bad), "--generate-cert", str(tmp_path / "c"))
    assert result.returncode == 2
    assert "secshadow-ums: error: users[0]: give 'password' or 'password_env'" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.integration
def test_cli_needs_a_certificate(tmp_path):
    path = tmp_path / "ums.json"
    path.write_text(json.dumps(config_dict()))
    result = run_cli("--config", str(path))
    assert result.returncode == 2
    assert "--generate-cert" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.integration
def test_cli_bad_listen_and_busy_port(tmp_path):
    import socket

    path = tmp_path / "ums.json"
    path.write_text(json.dumps(config_dict()))
    certs = str(tmp_path / "c")
    result = run_cli("--config", str(path), "--generate-cert", certs, "--listen", "nonsense:1")
    assert result.returncode == 2 and "bad --listen endpoint" in result.stderr
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        number = busy.getsockname()[1]
        result = run_cli("--config", str(path), "--generate-cert", certs,
                         "--listen", f"tcp:{number}:interface=127.0.0.1")
    assert result.returncode == 1
    assert f"cannot listen on tcp:{number}" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.integration
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_cli_stops_cleanly_on_a_signal_right_after_listening(tmp_path, sig):
    path = tmp_path / "ums.json"
    path.write_text(json.dumps(config_dict()))
    process = subprocess.Popen(
        [sys.executable, "-m", "secshadow.lab.imiserver.cli", "--config", str(path), "--generate-cert",
         str(tmp_path / "c"), "--listen", "tcp:0:interface=127.0.0.1"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env=dict(os.environ, PYTHONPATH=str(REPO)), cwd=str(REPO),
    )
    try:
        assert json.loads(_read_line(process.stdout, time.monotonic() + 30))["event"] == "listening"
        process.send_signal(sig)
        _, stderr = process.communicate(timeout=15)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert process.returncode == 0
    assert "stopping" in stderr and "Traceback" not in stderr


def _read_line(stream, deadline: float) -> str:
    selector = selectors.DefaultSelector()
    selector.register(stream, selectors.EVENT_READ)
    try:
        while time.monotonic() < deadline:
            if selector.select(timeout=0.2):
                return stream.readline()
        raise AssertionError("secshadow-ums printed no listening event in time")
    finally:
        selector.close()


@pytest.mark.integration
@pytest_twisted.ensureDeferred
async def test_cli_serves_a_secret_end_to_end(tmp_path):
    config = tmp_path / "ums.json"
    config.write_text(json.dumps(config_dict()))
    port_file = tmp_path / "port"
    env = dict(os.environ, PYTHONPATH=str(REPO))
    process = subprocess.Popen(
        [sys.executable, "-m", "secshadow.lab.imiserver.cli", "--config", str(config),
         "--generate-cert", str(tmp_path / "certs"), "--listen", "tcp:0:interface=127.0.0.1",
         "--port-file", str(port_file)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=str(REPO),
    )
    try:
        event = json.loads(_read_line(process.stdout, time.monotonic() + 30))
        assert event["event"] == "listening" and event["host"] == "127.0.0.1"
        assert port_file.read_text().strip() == str(event["port"])
        url = f"https://127.0.0.1:{event['port']}"
        trust = UMSTrust.from_fingerprint(event["certificate_sha256"])
        secret = await fetch_shadow_secret(reactor, url, "27", "admin", ADMIN_PASSWORD, trust, timeout=10)
        assert secret.certificate_der == parse_certificate(DEVICE_PEM)
        assert secret.host == "127.0.0.1"
        assert await verify_otp(reactor, url, "27", secret.password, trust) is True
        assert await verify_otp(reactor, url, "27", secret.password, trust) is False
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            _, stderr = process.communicate(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            _, stderr = process.communicate()
    assert process.returncode == 0
    assert "listening on https://127.0.0.1:" in stderr
    assert "issued a one-time password for device 27" in stderr
    assert ADMIN_PASSWORD not in stderr and secret.password.reveal() not in stderr
    assert "Traceback" not in stderr
