"""A shadowing lab on one machine: a real VNC server behind the device emulator, and the
reference IMI server, as separate processes. The demo and the integration tests use it.

Everything listens on 127.0.0.1 at free ports; certificates and the IMI password are
generated into a private temporary directory (mode 0700) and removed by :meth:`Lab.stop`.
This is blocking, subprocess-based code on purpose: it drives the real programs the way
a user or a console would.
"""

from __future__ import annotations

import json
import os
import queue
import secrets
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Sequence

from secshadow.lab import certs
from secshadow.lab.vnc import XvncServer, start_xvnc

#: The IMI id and name of the lab's one device.
DEVICE_ID = "27"
DEVICE_NAME = "Curry"
UMS_USER = "admin"


class LabError(RuntimeError):
    """A lab program did not start; the message carries its last output lines."""


class ManagedProcess:
    """A child process whose stdout JSON lines are collected by a thread.

    ``events``: every JSON object read so far, in order; stderr goes to ``log_path``.
    """

    def __init__(self, name: str, argv: Sequence[str], log_dir: Path,
                 env: dict[str, str] | None = None, stdin: int | IO[bytes] | None = subprocess.DEVNULL) -> None:
        self.name = name
        self.argv = list(argv)
        self.log_path = log_dir / f"{name}.log"
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.process = subprocess.Popen(  # noqa: S603 - fixed argv, no shell
            self.argv, stdin=stdin, stdout=subprocess.PIPE, stderr=self._log, env=env,
        )
        self.events: list[dict[str, Any]] = []
        self.lines: list[str] = []
        self._queue: queue.Queue[dict[str, Any] | None] = queue.Queue()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for raw in self.process.stdout:
            line = raw.decode("utf-8", "replace").rstrip("\n")
            self.lines.append(line)
            try:
                event = json.loads(line)
            except ValueError:
                continue
            if isinstance(event, dict):
                self.events.append(event)
                self._queue.put(event)
        self._queue.put(None)

    def wait_for(self, name: str, timeout: float = 20.0) -> dict[str, Any]:
        """The first event named ``name`` (already seen or still to come)."""
        for event in self.events:
            if event.get("event") == name:
                return event
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            try:
                item = self._queue.get(timeout=remaining)
            except queue.Empty:
                break
            if item is None:
                break
            if item.get("event") == name:
                return item
        raise LabError(f"{self.name} gave no {name!r} event within {timeout:g} s:\n{self.log_tail()}")

    def named(self, name: str) -> list[dict[str, Any]]:
        return [e for e in self.events if e.get("event") == name]

    def log_tail(self, lines: int = 20) -> str:
        if not self._log.closed:
            self._log.flush()
        text = self.log_path.read_text(errors="replace").splitlines()
        return "\n".join(text[-lines:])

    def stop(self, timeout: float = 5.0) -> int | None:
        """SIGTERM, then SIGKILL after ``timeout`` seconds; returns the exit status."""
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=timeout)
        self._reader.join(timeout=timeout)
        self._log.close()
        return self.process.returncode


def python_module(module: str) -> list[str]:
    """argv prefix that runs a secshadow module with this interpreter (works uninstalled)."""
    return [sys.executable, "-m", module]


def child_environment(extra: dict[str, str] | None = None) -> dict[str, str]:
    """Our environment plus the checkout on PYTHONPATH, so children import this secshadow."""
    env = dict(os.environ)
    root = str(Path(__file__).resolve().parents[2])  # the checkout: secshadow/lab/harness.py
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.update(extra or {})
    return env


@dataclass
class GatewayProcess:
    """A running ``secshadow-gateway`` (TLS with a generated certificate for
    127.0.0.1/localhost, or ``--plaintext``) and the token key pair that goes with it.

    ``base_url``: ``wss://127.0.0.1:PORT`` (``ws://`` in plaintext mode); ``fingerprint``:
    the SHA-256 of its certificate (for ``--gateway-fingerprint``); ``token_key``: the
    Ed25519 signing key (mode 0600), ``token_public``: what the gateway was given.
    """

    process: ManagedProcess
    port: int
    base_url: str
    fingerprint: str
    cert: Path | None
    token_key: Path
    token_public: Path
    workdir: Path

    def leg_url(self, sid: str, role: str) -> str:
        return f"{self.base_url}/v1/sessions/{sid}/{role}"

    def mint(self, sid: str, role: str, lifetime: float = 300.0, **kwargs: Any) -> str:
        """A token for ``role`` of ``sid`` signed with the lab's key (``kwargs``: see
        :func:`secshadow.gateway.tokens.mint_token`)."""
        from secshadow.gateway.tokens import load_private_key, mint_token

        return mint_token(load_private_key(self.token_key), sid, role, lifetime, **kwargs)

    def token_file(self, sid: str, role: str, token: str | None = None, lifetime: float = 300.0) -> Path:
        """Write ``token`` (or a freshly minted one) to a mode-0600 file; returns its path."""
        path = self.workdir / f"token-{sid}-{role}-{secrets.token_hex(4)}"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write((token or self.mint(sid, role, lifetime)) + "\n")
        return path

    def trust_args(self) -> list[str]:
        return ["--gateway-fingerprint", self.fingerprint] if self.fingerprint else []

    def stop(self) -> int | None:
        return self.process.stop()


def write_token_keys(workdir: Path) -> tuple[Path, Path]:
    """An Ed25519 token key pair in ``workdir`` (``gateway-token.key.pem`` mode 0600,
    ``gateway-token.pub.pem``), reused when it exists."""
    from secshadow.gateway.tokens import generate_key_pair

    private, public = workdir / "gateway-token.key.pem", workdir / "gateway-token.pub.pem"
    if private.exists() and public.exists():
        return private, public
    return generate_key_pair(workdir)


def start_gateway(workdir: Path, *extra: str, plaintext: bool = False, name: str = "gateway") -> GatewayProcess:
    """Start ``secshadow-gateway`` on 127.0.0.1 (a free port) with ``--json``; returns once
    it listens. TLS uses a fresh self-signed certificate with subjectAltName
    ``127.0.0.1``/``localhost``. ``extra``: more flags (``--pairing-timeout 2``, ...)."""
    private, public = write_token_keys(workdir)
    argv = [*python_module("secshadow.gateway.cli"), "gateway", "--listen", "tcp:0:interface=127.0.0.1",
            "--token-key", str(public), "--json"]
    cert: Path | None = None
    fingerprint = ""
    if plaintext:
        argv.append("--plaintext")
    else:
        cert, key = certs.write_pair(workdir, f"{name}-tls", key_type="ecdsa-p256", subject_cn="secshadow-gateway",
                                     organization="secshadow lab", locality=None, country=None,
                                     san_dns=["localhost"], san_ips=["127.0.0.1"])
        fingerprint = certs.certificate_sha256(cert.read_bytes())
        argv += ["--tls-cert", str(cert), "--tls-key", str(key)]
    process = ManagedProcess(name, [*argv, *extra], workdir, env=child_environment())
    try:
        port = int(process.wait_for("gateway-listening")["port"])
    except BaseException:
        process.stop()
        raise
    scheme = "ws" if plaintext else "wss"
    return GatewayProcess(process=process, port=port, base_url=f"{scheme}://127.0.0.1:{port}",
                          fingerprint=fingerprint, cert=cert, token_key=private, token_public=public,
                          workdir=workdir)


def start_agent(gateway: GatewayProcess, sid: str, target_port: int, *extra: str,
                target_host: str = "127.0.0.1", token_file: Path | None = None, name: str = "agent",
                url: str | None = None) -> ManagedProcess:
    """Start ``secshadow-agent --json`` for the device leg of ``sid`` (a fresh token unless
    ``token_file``), splicing to ``target_host:target_port``; returns at once (it waits
    for the console). ``url``: another way to the gateway (e.g. a TLS front before it)."""
    token = token_file or gateway.token_file(sid, "device")
    return ManagedProcess(name, [
        *python_module("secshadow.gateway.cli"), "agent", "--gateway", url or gateway.leg_url(sid, "device"),
        "--token-file", str(token), "--target", f"{target_host}:{target_port}", *gateway.trust_args(),
        "--json", *extra,
    ], gateway.workdir, env=child_environment())


@dataclass
class Lab:
    """A running lab. ``ums_url``, ``ums_fingerprint``: the IMI server and its certificate's
    SHA-256; ``device_port``: the emulator's TLS port; ``device_cert``: its certificate PEM
    (the pin); ``password_file``: the IMI user's password, mode 0600."""

    workdir: Path
    xvnc: XvncServer | None
    ums: ManagedProcess | None = None
    device: ManagedProcess | None = None
    ums_url: str = ""
    ums_fingerprint: str = ""
    device_port: int = 0
    device_cert: Path = field(default_factory=Path)
    device_key: Path = field(default_factory=Path)
    password_file: Path = field(default_factory=Path)
    #: With ``start_lab(gateway=True)``: the gateway, and the device's session id there.
    gateway: GatewayProcess | None = None
    gateway_sid: str = ""
    _owns_workdir: bool = True

    def proxy_argv(self, *extra: str) -> list[str]:
        """``secshadow-proxy`` fetching the secret from the lab's IMI server."""
        return [
            *python_module("secshadow.cli"),
            "--ums", self.ums_url, "--device", DEVICE_ID, "--ums-user", UMS_USER,
            "--ums-password-file", str(self.password_file), "--ums-fingerprint", self.ums_fingerprint,
            "--device-port", str(self.device_port), *extra,
        ]

    def fresh_password(self) -> str:
        """A fresh one-time password for the lab's device, fetched from the IMI server
        with secshadow's own IMI client, in a child process (as a console would)."""
        script = (
            "import sys\n"
            "from twisted.internet import task\n"
            "from twisted.internet.defer import ensureDeferred\n"
            "from secshadow.imi import fetch_shadow_secret\n"
            "from secshadow.umstrust import UMSTrust\n"
            "async def main(reactor, url, device, user, password_file, fingerprint):\n"
            "    with open(password_file) as f:\n"
            "        password = f.read().strip()\n"
            "    secret = await fetch_shadow_secret(reactor, url, device, user, password,\n"
            "                                       UMSTrust.from_fingerprint(fingerprint))\n"
            "    sys.stdout.write(secret.password.reveal())\n"
            "task.react(lambda reactor, *a: ensureDeferred(main(reactor, *a)), sys.argv[1:])\n"
        )
        result = subprocess.run(  # noqa: S603 - fixed argv, no shell
            [sys.executable, "-c", script, self.ums_url, DEVICE_ID, UMS_USER, str(self.password_file),
             self.ums_fingerprint], capture_output=True, timeout=30, env=child_environment())
        if result.returncode != 0:
            raise LabError(f"could not fetch a one-time password: {result.stderr.decode(errors='replace')}")
        return result.stdout.decode()

    def secret_json(self, password: str, host: str = "127.0.0.1") -> bytes:
        """A short-form secret (``--secret-file``) for the lab's device with ``password``."""
        return json.dumps({"certificate": self.device_cert.read_text(), "password": password,
                           "host": host, "port": self.device_port}).encode()

    def start_device(self, *extra: str, cert: Path | None = None, key: Path | None = None,
                     name: str = "device") -> ManagedProcess:
        """Another device emulator (e.g. an impostor with ``cert``/``key``) checking
        passwords with the lab's IMI server; returns it once it listens."""
        vnc_port = self.xvnc.rfb_port if self.xvnc else 5901
        process = ManagedProcess(name, [
            *python_module("secshadow.lab.device.cli"), "--listen", "tcp:0:interface=127.0.0.1",
            "--cert", str(cert or self.device_cert), "--key", str(key or self.device_key),
            "--vnc", f"127.0.0.1:{vnc_port}", "--ums", self.ums_url, "--device-id", DEVICE_ID,
            "--ums-fingerprint", self.ums_fingerprint, *extra,
        ], self.workdir, env=child_environment())
        process.wait_for("listening")
        return process

    def start_dialing_device(self, gateway: GatewayProcess, sid: str, *extra: str,
                             cert: Path | None = None, key: Path | None = None,
                             name: str = "dialing-device") -> ManagedProcess:
        """A device emulator that dials the gateway's device leg of ``sid`` itself
        (``secshadow-device --dial``), checking passwords with the lab's IMI server;
        returns once it announced ``dialing``."""
        vnc_port = self.xvnc.rfb_port if self.xvnc else 5901
        process = ManagedProcess(name, [
            *python_module("secshadow.lab.device.cli"), "--dial", gateway.leg_url(sid, "device"),
            "--token-file", str(gateway.token_file(sid, "device")), *gateway.trust_args(),
            "--cert", str(cert or self.device_cert), "--key", str(key or self.device_key),
            "--vnc", f"127.0.0.1:{vnc_port}", "--ums", self.ums_url, "--device-id", DEVICE_ID,
            "--ums-fingerprint", self.ums_fingerprint, *extra,
        ], self.workdir, env=child_environment())
        process.wait_for("dialing")
        return process

    def stop(self) -> None:
        for process in (self.device, self.ums, self.gateway.process if self.gateway else None):
            if process is not None:
                process.stop()
        if self.xvnc is not None:
            self.xvnc.stop()
        if self._owns_workdir:
            for path in sorted(self.workdir.rglob("*"), reverse=True):
                if path.is_dir():
                    path.rmdir()
                else:
                    path.unlink()
            self.workdir.rmdir()

    def __enter__(self) -> Lab:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def start_lab(workdir: Path | None = None, *, with_xvnc: bool = True, device_args: Sequence[str] = (),
              background: str = "#1f6feb", label: str | None = "secshadow demo",
              progress: Any = None, gateway: bool = False) -> Lab:
    """Start Xvnc (optional), ``secshadow-ums`` and ``secshadow-device``; returns a :class:`Lab`.

    ``gateway``: also start ``secshadow-gateway`` (TLS) first, and configure the IMI
    server so the device sits behind it (session id ``tc-27``): its ``shadowSecret`` then
    carries ``"gateway": {"url", "token"}`` for the console.

    ``progress``: called with a sentence before each step (the demo prints them).
    Raises :class:`LabError` or :class:`secshadow.lab.vnc.XvncError` when a program fails.
    """
    say = progress or (lambda text: None)
    owns = workdir is None
    work = Path(tempfile.mkdtemp(prefix="secshadow-lab-")) if workdir is None else workdir
    os.chmod(work, 0o700)
    lab = Lab(workdir=work, xvnc=None, _owns_workdir=owns)
    try:
        if with_xvnc:
            say("starting a real VNC server (TigerVNC Xvnc) with a recognisable screen")
            lab.xvnc = start_xvnc(background=background, label=label)
            say(f"Xvnc is on display :{lab.xvnc.display}, RFB port {lab.xvnc.rfb_port}")
        say("generating the device certificate (self-signed, name-less, like IGEL's sample)")
        lab.device_cert, lab.device_key = certs.write_pair(work, "device")
        lab.password_file = work / "ums-password"
        fd = os.open(lab.password_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        password = secrets.token_urlsafe(18)
        with os.fdopen(fd, "w") as f:
            f.write(password + "\n")
        config: dict[str, Any] = {
            "users": [{"name": UMS_USER, "password_env": "SECSHADOW_LAB_UMS_PASSWORD"}],
            "devices": [{
                "id": DEVICE_ID, "name": DEVICE_NAME, "lastIP": "127.0.0.1",
                "certificate_file": str(lab.device_cert), "mac": "00E0C54DCB8E", "firmwareID": "21",
            }],
        }
        if gateway:
            say("starting the gateway relay (secshadow-gateway, TLS, Ed25519 token keys)")
            lab.gateway = start_gateway(work)
            lab.gateway_sid = f"tc-{DEVICE_ID}"
            say(f"gateway at {lab.gateway.base_url}, certificate SHA-256 {lab.gateway.fingerprint[:23]}...")
            config["gateway"] = {"url": lab.gateway.base_url, "token_key_file": str(lab.gateway.token_key)}
            config["devices"][0]["gateway_sid"] = lab.gateway_sid
        config_path = work / "ums.json"
        config_path.write_text(json.dumps(config, indent=2))
        say("starting the reference IMI server (secshadow-ums, HTTPS, self-signed)")
        lab.ums = ManagedProcess("ums", [
            *python_module("secshadow.lab.imiserver.cli"), "--config", str(config_path),
            "--listen", "tcp:0:interface=127.0.0.1", "--generate-cert", str(work / "ums-tls"),
        ], work, env=child_environment({"SECSHADOW_LAB_UMS_PASSWORD": password}))
        listening = lab.ums.wait_for("listening")
        lab.ums_url = f"https://127.0.0.1:{listening['port']}"
        lab.ums_fingerprint = listening["certificate_sha256"]
        say(f"IMI server at {lab.ums_url}, certificate SHA-256 {lab.ums_fingerprint[:23]}...")
        say("starting the device emulator (secshadow-device: TLS, PROCYCMD check, relay to Xvnc)")
        lab.device = lab.start_device(*device_args)
        lab.device_port = int(lab.device.wait_for("listening")["port"])
        say(f"device emulator on 127.0.0.1:{lab.device_port}")
        return lab
    except BaseException:
        lab.stop()
        raise
