"""The command lines: secshadow-gateway, secshadow-agent and secshadow-device --dial, run
as real processes: bad flags exit 2 with a message, gateway failures exit 9, an
unreachable target exits 4, and no token ever reaches their output."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet.protocol import Factory, Protocol

from secshadow.gateway.tokens import generate_key_pair
from secshadow.lab import certs
from secshadow.lab.harness import GatewayProcess, child_environment, python_module, start_agent, start_gateway
from secshadow.lab.vnc import free_tcp_port
from secshadow.tests._gateway_helpers import endpoint_for

pytestmark = pytest.mark.integration


def run(module_argv: list[str], timeout: float = 60) -> tuple[int, list[dict[str, Any]], str]:
    result = subprocess.run(module_argv, capture_output=True, text=True, timeout=timeout,  # noqa: S603
                            env=child_environment())
    events = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    return result.returncode, events, result.stderr


def gateway_cli(*argv: str) -> list[str]:
    return [*python_module("secshadow.gateway.cli"), "gateway", *argv]


def agent_cli(*argv: str) -> list[str]:
    return [*python_module("secshadow.gateway.cli"), "agent", *argv]


@pytest.fixture
def keys(tmp_path: Path) -> tuple[Path, Path]:
    return generate_key_pair(tmp_path)


@pytest.mark.parametrize(("extra", "message"), [
    ([], "needs at least one --token-key"),
    (["--token-key", "PRIVATE"], "holds a private key"),
    (["--token-key", "PUBLIC", "--listen", "ssl:0"], "plain stream endpoint"),
    (["--token-key", "PUBLIC", "--plaintext", "--tls-cert", "x.pem"], "not both"),
    (["--token-key", "PUBLIC", "--listen", "bogus:1"], "bad --listen endpoint"),
    (["--token-key", "PUBLIC", "--pairing-timeout", "0", "--plaintext"], "--pairing-timeout must be a positive"),
])
def test_gateway_usage_errors_exit_2(keys: tuple[Path, Path], extra: list[str], message: str) -> None:
    private, public = keys
    argv = [str(private) if a == "PRIVATE" else str(public) if a == "PUBLIC" else a for a in extra]
    if "--plaintext" not in argv and "--tls-cert" not in argv:
        argv += ["--plaintext"]
    code, _, stderr = run(gateway_cli("--listen", "tcp:0:interface=127.0.0.1", *argv)
                          if "--listen" not in argv else gateway_cli(*argv))
    assert code == 2, stderr
    assert message in stderr and "Traceback" not in stderr


def test_gateway_needs_tls_or_an_explicit_plaintext(keys: tuple[Path, Path]) -> None:
    code, _, stderr = run(gateway_cli("--listen", "tcp:0:interface=127.0.0.1", "--token-key", str(keys[1])))
    assert code == 2 and "--tls-cert" in stderr


def test_plaintext_gateway_warns_loudly(tmp_path: Path) -> None:
    port_file = tmp_path / "port"
    gateway = start_gateway(tmp_path, "--port-file", str(port_file), plaintext=True)
    try:
        assert gateway.process.events[0] == {"event": "warning", "message": "--plaintext: no TLS on the listener"}
        assert gateway.process.events[1]["tls"] is False
        assert port_file.read_text() == f"{gateway.port}\n"
    finally:
        assert gateway.stop() == 0
    assert "WARNING: --plaintext" in gateway.process.log_path.read_text()


@pytest.mark.parametrize(("argv", "message"), [
    (["--target", "nohost"], "--target wants HOST:PORT"),
    (["--target", "127.0.0.1:1", "--gateway", "ws://127.0.0.1/v1/sessions/S1/device"], "must use wss://"),
    (["--target", "127.0.0.1:1", "--token-file", "/nonexistent"], "cannot read --token-file"),
    (["--target", "127.0.0.1:1", "--gateway-fingerprint", "zz"], "--gateway-fingerprint must be"),
])
def test_agent_usage_errors_exit_2(tmp_path: Path, argv: list[str], message: str) -> None:
    token = tmp_path / "t"
    token.write_text("a.b.c\n")
    base = {"--gateway": "wss://127.0.0.1:1/v1/sessions/S1/device", "--token-file": str(token)}
    for flag, value in zip(argv[::2], argv[1::2], strict=True):
        base[flag] = value
    code, events, stderr = run(agent_cli(*[x for kv in base.items() for x in kv], "--json"))
    assert code == 2, stderr
    assert message in stderr and events[-1]["code"] == "usage"


def test_agent_exits_9_when_the_gateway_is_unreachable(tmp_path: Path) -> None:
    token = tmp_path / "t"
    token.write_text("eyJhbGciOiJFZERTQSJ9.eyJzaWQiOiJTMSJ9.c2ln\n")
    port = free_tcp_port()
    code, events, stderr = run(agent_cli("--gateway", f"wss://127.0.0.1:{port}/v1/sessions/S1/device",
                                         "--token-file", str(token), "--target", "127.0.0.1:5900", "--json"))
    assert code == 9, stderr
    assert events == [{"event": "error", "code": "gateway",
                       "message": f"the gateway is unreachable: cannot connect to 127.0.0.1:{port}: "
                                  "Connection was refused by other side: 111: Connection refused."}]
    assert "c2ln" not in stderr


@pytest.fixture
def gateway(tmp_path: Path) -> Any:
    gw = start_gateway(tmp_path, "--pairing-timeout", "3")
    yield gw
    gw.stop()


@pytest_twisted.ensureDeferred
async def test_agent_exits_4_when_its_target_is_unreachable_and_closes_the_console(gateway: GatewayProcess) -> None:
    from twisted.internet import reactor

    closed_port = free_tcp_port()
    agent = start_agent(gateway, "no-target", closed_port)

    class Console(Protocol):
        def connectionMade(self) -> None:
            from twisted.internet.defer import Deferred

            self.lost: Deferred[Any] = Deferred()

        def connectionLost(self, reason: Any = None) -> None:
            self.lost.callback(type(reason.value).__name__)

    console = await endpoint_for(reactor, gateway, "no-target", "console").connect(Factory.forProtocol(Console))
    # The agent could not reach its target: it closes, and so the console's stream ends.
    assert await console.lost == "ConnectionDone"
    assert agent.process.wait(timeout=20) == 4, agent.log_tail()
    agent.stop()
    assert agent.events[-1]["code"] == "device-unreachable"
    assert f"127.0.0.1:{closed_port}" in agent.events[-1]["message"]


@pytest.mark.parametrize(("argv", "message"), [
    (["--dial", "wss://127.0.0.1:1/v1/sessions/S1/device"], "--dial needs --token-file"),
    (["--dial", "wss://127.0.0.1:1/v1/sessions/S1/console", "--token-file", "TOKEN"], "device leg's URL"),
    (["--dial", "wss://127.0.0.1:1/v1/sessions/S1/device", "--token-file", "TOKEN", "--plaintext"], "not --plaintext"),
    (["--token-file", "TOKEN"], "go with --dial"),
])
def test_device_dial_usage_errors_exit_2(tmp_path: Path, argv: list[str], message: str) -> None:
    token = tmp_path / "token"
    token.write_text("a.b.c\n")
    password = tmp_path / "pw"
    password.write_text("x")
    argv = [str(token) if a == "TOKEN" else a for a in argv]
    code, _, stderr = run([*python_module("secshadow.lab.device.cli"), "--generate-cert", str(tmp_path / "c"),
                           "--accept-password-file", str(password), *argv])
    assert code == 2, stderr
    assert message in stderr


def test_dialing_device_exits_9_on_a_pairing_timeout(gateway: GatewayProcess, tmp_path: Path) -> None:
    cert, key = certs.write_pair(tmp_path, "dev")
    password = tmp_path / "pw"
    password.write_text("x")
    token_file = gateway.token_file("lonely-device", "device")
    code, events, stderr = run([
        *python_module("secshadow.lab.device.cli"), "--dial", gateway.leg_url("lonely-device", "device"),
        "--token-file", str(token_file), *gateway.trust_args(), "--cert", str(cert), "--key", str(key),
        "--accept-password-file", str(password),
    ])
    assert code == 9, stderr
    assert [e["event"] for e in events] == ["dialing", "error"]
    assert events[-1]["message"].startswith("pairing timeout: the console side did not join gateway session lonely-device")
    assert token_file.read_text().strip().rsplit(".", 1)[1] not in stderr
