"""secshadow-web for real: the service as a subprocess against the lab's reference IMI
server, device emulator and Xvnc, driven over HTTP and by real headless Chromium.

Set ``SECSHADOW_SCREENSHOTS=DIR`` to keep the page's screenshots (docs/images/ are made
this way)."""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import ssl
import time
from pathlib import Path
from typing import Any, Iterator

import pytest

from secshadow.lab.harness import Lab, ManagedProcess, child_environment, python_module
from secshadow.tests._screens import share_of_colour
from secshadow.tests._web_helpers import chromium, wait_for_pixel
from secshadow.tests.conftest import require_program

pytestmark = pytest.mark.integration


def start_service(lab: Lab, workdir: Path, *extra: str) -> tuple[ManagedProcess, dict[str, Any]]:
    process = ManagedProcess("secshadow-web", [
        *python_module("secshadow.web.service"), "--ums", lab.ums_url, "--ums-fingerprint", lab.ums_fingerprint,
        "--listen", "tcp:0:interface=127.0.0.1", "--device-port", str(lab.device_port), "--json", *extra,
    ], workdir, env=child_environment())
    return process, process.wait_for("web-listening", timeout=30)


@pytest.fixture(scope="module")
def service(lab: Lab, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    workdir = tmp_path_factory.mktemp("web-service")
    audit = workdir / "audit.jsonl"
    process, listening = start_service(lab, workdir, "--audit", str(audit))
    try:
        yield {"process": process, "url": listening["url"], "audit": audit,
               "port": int(listening["url"].rsplit(":", 1)[1].strip("/"))}
    finally:
        process.stop()
    text = process.log_path.read_text(errors="replace")
    assert "Traceback" not in text and "Unhandled" not in text, text[-3000:]


def call(service: dict[str, Any], method: str, path: str, body: Any = None, cookie: str | None = None,
         origin: str | None = "own", headers: dict[str, str] | None = None) -> tuple[int, Any, http.client.HTTPMessage]:
    conn = http.client.HTTPConnection("127.0.0.1", service["port"], timeout=60)
    sent = dict(headers or {})
    if origin == "own":
        origin = f"http://127.0.0.1:{service['port']}"
    if origin is not None:
        sent["Origin"] = origin
    if cookie is not None:
        sent["Cookie"] = cookie
    payload = None
    if body is not None:
        payload = json.dumps(body).encode()
        sent["Content-Type"] = "application/json"
    conn.request(method, path, body=payload, headers=sent)
    response = conn.getresponse()
    raw = response.read()
    conn.close()
    return response.status, (json.loads(raw) if raw else None), response.headers


def login(service: dict[str, Any], lab: Lab) -> str:
    status, body, headers = call(service, "POST", "/api/login",
                                 {"user": "admin", "password": lab.password_file.read_text().strip()})
    assert status == 200, body
    return headers["Set-Cookie"].split(";", 1)[0]


def test_a_wrong_ums_password_is_refused_in_words(service, lab: Lab):
    status, body, headers = call(service, "POST", "/api/login", {"user": "admin", "password": "not-the-password"})
    assert status == 401
    assert body == {"code": "ums", "message": "The UMS refused this user name or password."}
    assert headers["Set-Cookie"] is None
    assert "not-the-password" not in service["process"].log_tail(200)


def test_login_devices_logout(service, lab: Lab):
    assert call(service, "GET", "/api/devices")[0] == 401
    status, body, headers = call(service, "POST", "/api/login",
                                 {"user": "admin", "password": lab.password_file.read_text().strip()})
    assert status == 200 and body == {"user": "admin"}
    flags = [f.strip().lower() for f in headers["Set-Cookie"].split(";")]
    assert "httponly" in flags and "samesite=strict" in flags and "path=/" in flags
    assert "secure" not in flags  # plain http on loopback
    cookie = headers["Set-Cookie"].split(";", 1)[0]
    status, devices, _ = call(service, "GET", "/api/devices", cookie=cookie)
    assert status == 200 and devices == [{"id": "27", "name": "Curry", "lastIP": "127.0.0.1"}]
    assert call(service, "POST", "/api/logout", cookie=cookie)[0] == 204
    assert call(service, "GET", "/api/devices", cookie=cookie)[0] == 401
    assert call(service, "GET", "/api/session", cookie=cookie)[0] == 401


def test_state_changing_requests_from_another_site_are_refused(service, lab: Lab):
    status, body, _ = call(service, "POST", "/api/login", {"user": "admin", "password": "x"},
                           origin="http://evil.example")
    assert status == 403 and body["code"] == "csrf"
    status, body, _ = call(service, "POST", "/api/login", {"user": "admin", "password": "x"},
                           headers={"Sec-Fetch-Site": "cross-site"})
    assert status == 403 and body["code"] == "csrf"
    cookie = login(service, lab)
    before = len(lab.device.named("procycmd"))
    status, body, _ = call(service, "POST", "/api/devices/27/shadow", {"view_only": True}, cookie=cookie,
                           origin="http://evil.example")
    assert status == 403 and body["code"] == "csrf"
    status, body, _ = call(service, "POST", "/api/devices/27/shadow", cookie=cookie, origin="null")
    assert status == 403
    time.sleep(0.5)
    assert len(lab.device.named("procycmd")) == before  # the device never heard of it
    call(service, "POST", "/api/logout", cookie=cookie)


def _keep(driver: Any, name: str) -> Path | None:
    directory = os.environ.get("SECSHADOW_SCREENSHOTS")
    if not directory:
        return None
    path = Path(directory) / name
    driver.save_screenshot(str(path))
    return path


def test_a_person_logs_in_finds_the_device_and_watches_it(service, lab: Lab, tmp_path: Path):
    require_program("chromium")
    require_program("chromedriver")
    from selenium.webdriver.common.by import By

    driver = chromium(tmp_path / "profile", 1100, 760)
    before = len(lab.device.named("procycmd"))
    audited = len(service["audit"].read_text().splitlines()) if service["audit"].exists() else 0
    try:
        driver.get(service["url"])
        user = driver.find_element(By.ID, "user")
        assert driver.execute_script("return document.body.dataset.view") == "login"
        _keep(driver, "web-login.png")
        user.send_keys("admin")
        driver.find_element(By.ID, "password").send_keys("not-the-password")
        driver.find_element(By.ID, "login").click()
        _wait(lambda: "refused" in driver.find_element(By.ID, "message").text)
        driver.find_element(By.ID, "password").send_keys(lab.password_file.read_text().strip())
        driver.find_element(By.ID, "login").click()
        _wait(lambda: driver.execute_script("return document.body.dataset.view") == "devices")
        rows = driver.find_elements(By.CSS_SELECTOR, "#device-rows tr")
        assert [r.text.split("\n")[0] for r in rows] == ["Curry 127.0.0.1 27 Shadow"]
        driver.find_element(By.ID, "search").send_keys("zzz")
        assert driver.find_elements(By.CSS_SELECTOR, "#device-rows tr") == []
        assert driver.find_element(By.ID, "no-devices").is_displayed()
        search = driver.find_element(By.ID, "search")
        search.clear()
        search.send_keys("cur")
        _keep(driver, "web-devices.png")
        assert driver.find_element(By.ID, "view-only").is_selected()  # the safe choice is the default
        started = time.monotonic()
        driver.find_element(By.CSS_SELECTOR, "button[data-device='27']").click()
        x, y = lab.xvnc.background_point
        wait_for_pixel(driver, "#screen", x, y, lab.xvnc.background_rgb, timeout=30)
        print(f"click to first frame: {time.monotonic() - started:.2f} s")
        assert driver.find_element(By.ID, "badge").is_displayed()
        _wait(lambda: driver.find_element(By.ID, "message").text == "")  # no stale "Connecting..."
        assert driver.find_element(By.ID, "disconnect").is_displayed()
        shot = tmp_path / "screen.png"
        driver.save_screenshot(str(shot))
        assert share_of_colour(shot, lab.xvnc.background_rgb) > 0.25
        _keep(driver, "web-screen.png")
        driver.find_element(By.ID, "disconnect").click()
        _wait(lambda: driver.execute_script("return document.body.dataset.view") == "devices")
        assert "ended" in driver.find_element(By.ID, "message").text
        _wait(lambda: len(service["audit"].read_text().splitlines()) > audited if service["audit"].exists() else False)
        record = json.loads(service["audit"].read_text().splitlines()[-1])
        assert (record["viewer"], record["view_only"], record["ums_user"], record["device_id"]) == (
            "browser", True, "admin", "27")
        assert record["result"] == "ok" and record["bytes_to_viewer"] > 100  # noVNC asks for compressed encodings
        driver.find_element(By.ID, "logout").click()
        _wait(lambda: driver.execute_script("return document.body.dataset.view") == "login")
        assert "logged out" in driver.find_element(By.ID, "message").text
    finally:
        driver.quit()
    verdicts = lab.device.named("procycmd")[before:]
    assert verdicts == [{"event": "procycmd", "accepted": True, "reason": "ok"}]


def test_closing_the_tab_ends_the_session(service, lab: Lab, tmp_path: Path):
    require_program("chromium")
    cookie = login(service, lab)
    status, answer, _ = call(service, "POST", "/api/devices/27/shadow", {}, cookie=cookie)
    assert status == 200 and answer["expires_s"] == 60 and answer["view_only"] is False
    assert answer["url"].startswith("/view#token=")
    audited = len(service["audit"].read_text().splitlines()) if service["audit"].exists() else 0
    driver = chromium(tmp_path / "profile")
    try:
        driver.get(service["url"].rstrip("/") + answer["url"])
        x, y = lab.xvnc.background_point
        wait_for_pixel(driver, "#screen", x, y, lab.xvnc.background_rgb, timeout=30)
    finally:
        driver.quit()  # the tab (and the browser) goes away without a word
    _wait(lambda: len(service["audit"].read_text().splitlines()) > audited, timeout=30)
    record = json.loads(service["audit"].read_text().splitlines()[-1])
    assert record["result"] == "ok" and record["view_only"] is False
    token = answer["websocket"].split("token=", 1)[1]
    assert "browser viewer connecting" in service["process"].log_tail(2000)  # the upgrade was logged ...
    assert token not in service["process"].log_tail(2000)  # ... without its token
    assert token not in service["audit"].read_text()
    call(service, "POST", "/api/logout", cookie=cookie)


def test_https_with_a_generated_certificate_whose_fingerprint_is_printed(lab: Lab, tmp_path: Path):
    process, listening = start_service(lab, tmp_path, "--generate-cert")
    try:
        assert listening["url"].startswith("https://127.0.0.1:")
        port = int(listening["url"].rsplit(":", 1)[1].strip("/"))
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE  # compared by fingerprint below, as a person would
        conn = http.client.HTTPSConnection("127.0.0.1", port, context=context, timeout=30)
        conn.request("POST", "/api/login", body=json.dumps(
            {"user": "admin", "password": lab.password_file.read_text().strip()}),
            headers={"Content-Type": "application/json", "Origin": f"https://127.0.0.1:{port}"})
        response = conn.getresponse()
        response.read()
        der = conn.sock.getpeercert(binary_form=True)
        conn.close()
        shown = ":".join(f"{b:02X}" for b in hashlib.sha256(der).digest())
        assert listening["certificate_sha256"] == shown
        assert response.status == 200
        assert "secure" in [f.strip().lower() for f in response.headers["Set-Cookie"].split(";")]
    finally:
        process.stop()


def test_missing_novnc_is_a_usage_error_that_says_how_to_install(lab: Lab, tmp_path: Path):
    process = ManagedProcess("secshadow-web-no-novnc", [
        *python_module("secshadow.web.service"), "--ums", lab.ums_url, "--ums-fingerprint", lab.ums_fingerprint,
        "--listen", "tcp:0:interface=127.0.0.1", "--novnc", str(tmp_path), "--json"], tmp_path,
        env=child_environment())
    error = process.wait_for("error", timeout=30)
    assert process.process.wait(timeout=30) == 2
    process.stop()
    assert error["code"] == "usage" and "npm install" in error["message"]


def _wait(condition: Any, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.1)
    assert condition()



def test_an_unreachable_device_is_explained_in_words(lab: Lab, tmp_path: Path):
    require_program("chromium")
    from selenium.webdriver.common.by import By

    from secshadow.lab.vnc import free_tcp_port

    process, listening = start_service(lab, tmp_path, "--device-port", str(free_tcp_port()))
    driver = chromium(tmp_path / "profile", 1100, 560)
    try:
        driver.get(listening["url"])
        driver.find_element(By.ID, "user").send_keys("admin")
        driver.find_element(By.ID, "password").send_keys(lab.password_file.read_text().strip())
        driver.find_element(By.ID, "login").click()
        _wait(lambda: driver.execute_script("return document.body.dataset.view") == "devices")
        driver.find_element(By.CSS_SELECTOR, "button[data-device='27']").click()
        _wait(lambda: "cannot be reached" in driver.find_element(By.ID, "message").text, timeout=30)
        assert driver.execute_script("return document.body.dataset.view") == "devices"
        assert "error" in driver.find_element(By.ID, "message").get_attribute("class")
        _keep(driver, "web-error.png")
    finally:
        driver.quit()
        process.stop()


def test_the_demo_saves_the_browser_page_next_to_the_snapshot(tmp_path: Path):
    for program in ("Xvnc", "xsetroot", "chromium", "chromedriver"):
        require_program(program)
    import subprocess

    from secshadow.lab.vnc import DEFAULT_BACKGROUND, parse_rgb

    env = child_environment()
    env.pop("DISPLAY", None)
    result = subprocess.run([*python_module("secshadow.lab.demo"), "--snapshot", str(tmp_path / "snapshot.png")],
                            capture_output=True, timeout=240, env=env)
    output = result.stdout.decode()
    assert result.returncode == 0, output + result.stderr.decode()
    assert "the browser shows the device's screen" in output
    page = tmp_path / "browser.png"
    assert share_of_colour(page, parse_rgb(DEFAULT_BACKGROUND)) > 0.3
    assert share_of_colour(tmp_path / "snapshot.png", parse_rgb(DEFAULT_BACKGROUND)) > 0.5
