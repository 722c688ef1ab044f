"""The reference IMI server's part in the gateway flow: console tokens in the shadowSecret
document of a device behind the gateway, and ``secshadow-ums token``."""

from __future__ import annotations

import json
import os
import stat
import subprocess
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from treq.testing import StubTreq
from twisted.internet.task import Clock

from secshadow.gateway.tokens import TokenVerifier, generate_key_pair, load_public_keys
from secshadow.lab.harness import child_environment, python_module
from secshadow.lab.imiserver.server import ConfigError, UMSResource, UMSState, config_from_dict
from secshadow.secret import secret_from_document
from secshadow.tests._umsfixtures import ADMIN_PASSWORD, config_dict

BASE = "https://ums.test:8443"


def gateway_config(tmp_path: Path, **gateway: Any) -> tuple[dict[str, Any], Path]:
    private, public = generate_key_pair(tmp_path)
    data = config_dict(gateway={"url": "wss://gw.example:8443", "token_key_file": str(private), **gateway})
    data["devices"][0]["gateway_sid"] = "tc-27"
    return data, public


async def fetch(stub: StubTreq, device: str) -> dict[str, Any]:
    login = await stub.post(f"{BASE}/umsapi/v3/login", auth=("admin", ADMIN_PASSWORD))
    cookie = (await login.json())["message"].split("=", 1)[1]
    response = await stub.get(f"{BASE}/umsapi/v3/thinclients/{device}?facets=shadow",
                              headers={"Cookie": [f"JSESSIONID={cookie}"]})
    return json.loads(await response.content())


@pytest_twisted.ensureDeferred
async def test_a_device_behind_the_gateway_gets_a_console_leg_and_token(tmp_path: Path) -> None:
    data, public = gateway_config(tmp_path, token_lifetime=120)
    stub = StubTreq(UMSResource(UMSState(config_from_dict(data, environ={}), Clock())))
    first, second = await fetch(stub, "27"), await fetch(stub, "27")
    gateway = first["shadowSecret"]["gateway"]
    assert gateway["url"] == "wss://gw.example:8443/v1/sessions/tc-27/console"
    claims = TokenVerifier(load_public_keys([public])).verify(gateway["token"], "tc-27", "console")
    assert claims.role == "console" and claims.sid == "tc-27"
    assert second["shadowSecret"]["gateway"]["token"] != gateway["token"]  # a fresh jti per request
    # The product reads it back as the secret's gateway route.
    route = secret_from_document(first).gateway
    assert route is not None and route.url == gateway["url"] and route.token.reveal() == gateway["token"]


@pytest_twisted.ensureDeferred
async def test_a_device_not_behind_the_gateway_has_no_gateway_field(tmp_path: Path) -> None:
    data, _ = gateway_config(tmp_path)
    data["devices"][0].pop("gateway_sid")
    stub = StubTreq(UMSResource(UMSState(config_from_dict(data, environ={}), Clock())))
    document = await fetch(stub, "27")
    assert "gateway" not in document["shadowSecret"]


def test_gateway_configuration_errors(tmp_path: Path) -> None:
    data = config_dict()
    data["devices"][0]["gateway_sid"] = "tc-27"
    with pytest.raises(ConfigError, match="no 'gateway'"):
        config_from_dict(data, environ={})
    with pytest.raises(ConfigError, match="token_key_file"):
        config_from_dict(config_dict(gateway={"url": "wss://gw", "token_key_file": str(tmp_path / "nope")}),
                         environ={})
    private, public = generate_key_pair(tmp_path)
    with pytest.raises(ConfigError, match="wss://"):
        config_from_dict(config_dict(gateway={"url": "http://gw", "token_key_file": str(private)}), environ={})
    with pytest.raises(ConfigError, match="not an unencrypted PEM private key"):
        config_from_dict(config_dict(gateway={"url": "wss://gw", "token_key_file": str(public)}), environ={})
    data, _ = gateway_config(tmp_path / "x")
    data["devices"][0]["gateway_sid"] = "no spaces"
    with pytest.raises(ConfigError, match="gateway_sid"):
        config_from_dict(data, environ={})


@pytest.mark.integration
def test_secshadow_ums_token_command(tmp_path: Path) -> None:
    def run(*argv: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*python_module("secshadow.lab.imiserver.cli"), "token", *argv],  # noqa: S603
                              capture_output=True, text=True, timeout=60, env=child_environment())

    assert run("--generate-key", str(tmp_path)).returncode == 0
    private, public = tmp_path / "gateway-token.key.pem", tmp_path / "gateway-token.pub.pem"
    assert stat.S_IMODE(os.stat(private).st_mode) == 0o600
    out = tmp_path / "device.token"
    result = run("--key", str(private), "--sid", "tc-27", "--role", "device", "--lifetime", "60", "--out", str(out))
    assert result.returncode == 0 and result.stdout == ""
    assert stat.S_IMODE(os.stat(out).st_mode) == 0o600
    verifier = TokenVerifier(load_public_keys([public]))
    assert verifier.verify(out.read_text().strip(), "tc-27", "device").role == "device"
    printed = run("--key", str(private), "--sid", "S1", "--role", "console")
    assert verifier.verify(printed.stdout.strip(), "S1", "console").sid == "S1"
    bad = run("--key", str(private), "--sid", "bad sid", "--role", "console")
    assert bad.returncode == 2 and "session id" in bad.stderr and "Traceback" not in bad.stderr
