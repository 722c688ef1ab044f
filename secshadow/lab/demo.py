"""The built-in demo: the main job, end to end, on one machine.

It starts a real VNC server (TigerVNC ``Xvnc``, blue screen with a label), the
reference IMI server and the device emulator in front of Xvnc, then runs
``secshadow-proxy`` through the IMI server as a user would. With a display it
launches the TigerVNC viewer (close its window to end); without one it saves a
snapshot PNG through the tunnel. Then the browser path: ``secshadow-web`` on the same lab,
logged in with the UMS account, shadows the device view-only, and real headless Chromium
opens the page; its screenshot goes next to the snapshot (``browser.png``). Each step is
printed as it happens.

``--gateway``: the gateway path instead (``docs/gateway.md``): ``secshadow-gateway`` runs
with TLS, the IMI server puts the console's leg and token into the device's
``shadowSecret``, the device emulator dials out to the gateway itself (the OS 12 shape),
and ``secshadow-proxy`` fetches the secret and shadows through the relay, pin and
``PROCYCMD`` end to end inside it; the snapshot is ``gateway.png``.

Run: ``bin/secshadow-demo`` (after ``bin/setup-debian``).
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from secshadow.lab.harness import UMS_USER as DEVICE_USER
from secshadow.lab.harness import LabError, ManagedProcess, child_environment, python_module, start_lab
from secshadow.lab.vnc import XvncError


def _say(text: str) -> None:
    print(f"demo: {text}", flush=True)


def _browser_path(lab: Any, screenshot: Path) -> None:
    """secshadow-web on the lab, a view-only shadowing through its API, and the page in
    real headless Chromium (selenium + Debian's chromedriver); the screenshot is saved
    once the canvas shows the device's background colour."""
    if not (shutil.which("chromium") and shutil.which("chromedriver")):
        _say("browser path skipped: chromium and chromium-driver are not installed (bin/setup-debian)")
        return
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.options import Options
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        _say("browser path skipped: selenium is not installed (pip install -e '.[test]')")
        return
    _say("browser path: starting secshadow-web (log in with the UMS account, pick a device, watch it in a tab)")
    started = time.monotonic()
    web = ManagedProcess("secshadow-web", [
        *python_module("secshadow.web.service"), "--ums", lab.ums_url, "--ums-fingerprint", lab.ums_fingerprint,
        "--listen", "tcp:0:interface=127.0.0.1", "--device-port", str(lab.device_port), "--json",
    ], lab.workdir, env=child_environment())
    driver = None
    try:
        url = web.wait_for("web-listening", timeout=30)["url"]
        _say(f"+{time.monotonic() - started:5.2f} s  secshadow-web at {url}")
        port = int(url.rstrip("/").rsplit(":", 1)[1])
        cookie = _web_call(port, "/api/login", {"user": DEVICE_USER, "password": lab.password_file.read_text().strip()})
        answer = _web_call(port, "/api/devices/27/shadow", {"view_only": True}, cookie)
        _say(f"+{time.monotonic() - started:5.2f} s  logged in as {DEVICE_USER!r}; device 27 pinned, "
             f"single-use page link valid {answer['expires_s']} s")
        options = Options()
        options.binary_location = shutil.which("chromium") or "chromium"
        profile = lab.workdir / "chromium-profile"
        for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
                     "--disable-component-update", "--disable-sync", f"--user-data-dir={profile}",
                     "--window-size=960,640"):
            options.add_argument(flag)
        driver = webdriver.Chrome(service=Service(shutil.which("chromedriver")), options=options)
        clicked = time.monotonic()
        driver.get(url.rstrip("/") + answer["url"])
        x, y = lab.xvnc.background_point
        deadline = time.monotonic() + 20
        pixel = None
        while time.monotonic() < deadline:
            pixel = driver.execute_script(
                "const c = document.querySelector('#screen canvas');"
                "if (!c || !c.width) return null;"
                "return Array.from(c.getContext('2d').getImageData(arguments[0], arguments[1], 1, 1).data.slice(0, 3));",
                x, y)
            if pixel is not None and tuple(pixel) == lab.xvnc.background_rgb:
                break
            time.sleep(0.05)
        else:
            _say(f"browser path: the page did not show the device's screen (last pixel {pixel})")
            return
        screenshot.parent.mkdir(parents=True, exist_ok=True)
        driver.save_screenshot(str(screenshot))
        _say(f"+{time.monotonic() - started:5.2f} s  the browser shows the device's screen "
             f"({time.monotonic() - clicked:.2f} s from page request to first frame); saved {screenshot}")
    except (LabError, OSError, ValueError, KeyError) as e:
        _say(f"browser path failed: {e}\n{web.log_tail(20)}")
    finally:
        if driver is not None:
            driver.quit()
        web.stop()


def _run_proxy(lab: Any, name: str, argv: list[str], started: float,
               wait: float) -> tuple[int, float, float | None, ManagedProcess]:
    """Run secshadow-proxy (``argv``, JSON events) to its end, saying each stage's event
    up to ``session-started`` with the seconds since ``started`` (``time.monotonic()``),
    then its ``closed``/``error``. ``wait``: seconds it may run. Returns its exit status,
    the seconds from ``started`` to its end, those to the first RFB byte (``None`` if it
    never got there) and the process (for its log). Raises ``subprocess.TimeoutExpired``
    when it runs longer (it is stopped)."""
    _say(f"running secshadow-proxy {' '.join(argv[2:])}")
    proxy = ManagedProcess(name, argv, lab.workdir, env=child_environment())
    first_frame = None
    try:
        for stage in ("secret", "pinned", "listening", "viewer-connected", "session-started"):
            try:
                event = proxy.wait_for(stage, timeout=60)
            except LabError:
                break
            elapsed = time.monotonic() - started
            _say(f"+{elapsed:5.2f} s  {stage}: { {k: v for k, v in event.items() if k != 'event'} }")
            if stage == "session-started":
                first_frame = elapsed
        status = proxy.process.wait(timeout=wait)
        total = time.monotonic() - started
    finally:
        proxy.stop()
    for event in proxy.named("closed") + proxy.named("error"):
        _say(f"+{total:5.2f} s  {event['event']}: { {k: v for k, v in event.items() if k != 'event'} }")
    return status, total, first_frame, proxy


def _gateway_path(lab: Any, snapshot: Path) -> int:
    """The device emulator dials out to the lab's gateway; secshadow-proxy fetches the
    secret (which names the gateway leg and carries the console token) and saves one
    frame through the relay. Returns the proxy's exit status."""
    assert lab.gateway is not None
    _say(f"a device emulator dials out to the gateway (session {lab.gateway_sid}), as an OS 12 device would")
    started = time.monotonic()
    device = lab.start_dialing_device(lab.gateway, lab.gateway_sid)
    snapshot.parent.mkdir(parents=True, exist_ok=True)
    argv = lab.proxy_argv("--json", "--snapshot", str(snapshot), *lab.gateway.trust_args())
    status, total, first_frame, proxy = _run_proxy(lab, "gateway-proxy", argv, started, wait=120)
    if status == 0:  # the device's session ends with the proxy's; give it a moment to say so
        try:
            device.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            pass
    device.stop()
    gateway_events = [e for e in lab.gateway.process.events if e.get("event") in ("paired", "closed")]
    for event in gateway_events:
        _say(f"gateway: {event}")
    if status != 0:
        _say(f"secshadow-proxy exited {status}; its messages:\n{proxy.log_tail(30)}")
    else:
        _say(f"snapshot of the device's screen through the gateway saved to {snapshot} (device dial-out to "
             f"first RFB byte {first_frame or 0:.2f} s, to saved frame {total:.2f} s)")
    verdicts = [e.get("accepted") for e in device.named("procycmd")]
    _say(f"the dialing device saw {len(verdicts)} PROCYCMD command(s), accepted: {verdicts}")
    return status


def _web_call(port: int, path: str, body: dict[str, Any], cookie: str | None = None) -> Any:
    """One JSON POST to secshadow-web; returns the session cookie for /api/login, else
    the decoded answer. ValueError with the service's message on an error status."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    headers = {"Content-Type": "application/json", "Origin": f"http://127.0.0.1:{port}"}
    if cookie:
        headers["Cookie"] = cookie
    conn.request("POST", path, body=json.dumps(body), headers=headers)
    response = conn.getresponse()
    raw = response.read()
    conn.close()
    if response.status != 200:
        raise ValueError(f"{path}: HTTP {response.status} {raw.decode(errors='replace')}")
    if path == "/api/login":
        return response.headers["Set-Cookie"].split(";", 1)[0]
    return json.loads(raw)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="secshadow-demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--viewer", choices=("auto", "tigervnc", "snapshot"), default="auto",
                        help="auto: TigerVNC when $DISPLAY is set and vncviewer is installed, else snapshot")
    parser.add_argument("--snapshot", default="demo-output/snapshot.png", metavar="FILE",
                        help="where the snapshot PNG goes (default: %(default)s)")
    parser.add_argument("--no-browser", action="store_true",
                        help="skip the browser path (secshadow-web and headless Chromium)")
    parser.add_argument("--gateway", action="store_true",
                        help="the gateway path instead: the device dials out to secshadow-gateway, the proxy "
                             "shadows through it (snapshot: gateway.png next to --snapshot)")
    args = parser.parse_args(argv)

    mode = args.viewer
    if mode == "auto":
        mode = "tigervnc" if os.environ.get("DISPLAY") and shutil.which("vncviewer") else "snapshot"
    missing = [p for p in ("Xvnc", "xsetroot") if shutil.which(p) is None]
    if missing:
        _say(f"missing programs: {', '.join(missing)}; run bin/setup-debian first")
        sys.exit(2)

    try:
        lab = start_lab(progress=_say, gateway=args.gateway)
    except (LabError, XvncError) as e:
        _say(f"could not start the lab: {e}")
        sys.exit(1)
    status = 1
    if args.gateway:
        try:
            status = _gateway_path(lab, Path(args.snapshot).with_name("gateway.png"))
        except (LabError, subprocess.TimeoutExpired) as e:
            _say(f"demo failed: {e}")
        finally:
            _say("stopping the gateway, the device emulator, the IMI server and Xvnc")
            lab.stop()
        sys.exit(status)
    try:
        extra = ["--json"]
        if mode == "snapshot":
            snapshot = Path(args.snapshot)
            snapshot.parent.mkdir(parents=True, exist_ok=True)
            extra += ["--snapshot", str(snapshot)]
            _say("no display: the proxy will save one frame through the tunnel instead of a viewer")
        else:
            extra += ["--viewer", "tigervnc"]
            _say("a TigerVNC window will open: close it to end the session")
        status, total, first_frame, proxy = _run_proxy(lab, "proxy", lab.proxy_argv(*extra), time.monotonic(),
                                                       wait=600)
        if status != 0:
            _say(f"secshadow-proxy exited {status}; its messages:\n{proxy.log_tail(30)}")
        elif mode == "snapshot":
            _say(f"snapshot of the device's screen saved to {args.snapshot} "
                 f"(proxy start to first RFB byte {first_frame:.2f} s, to saved frame {total:.2f} s)")
        else:
            _say(f"viewer closed; session over after {total:.1f} s")
        if status == 0 and mode == "snapshot" and not args.no_browser:
            _browser_path(lab, Path(args.snapshot).with_name("browser.png"))
        device_verdicts = [e.get("accepted") for e in (lab.device.named("procycmd") if lab.device else [])]
        _say(f"the device emulator saw {len(device_verdicts)} PROCYCMD command(s), accepted: {device_verdicts}")
    except (LabError, subprocess.TimeoutExpired) as e:
        _say(f"demo failed: {e}")
    finally:
        _say("stopping the device emulator, the IMI server and Xvnc")
        lab.stop()
    sys.exit(status)


if __name__ == "__main__":
    main()
