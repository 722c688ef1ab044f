"""Shared fixtures for the IMI client and reference server tests."""

from __future__ import annotations

from typing import Any

from twisted.internet.task import Clock
from twisted.web.resource import Resource

from secshadow.tests._umscerts import device_certificate_pem
from secshadow.lab.imiserver.server import UMSConfig, UMSResource, UMSState, config_from_dict

ADMIN_PASSWORD = "s3cret-Admin-pw!"
OPS_PASSWORD = "ops-Pa55word"
DEVICE_PEM = device_certificate_pem()


def config_dict(**overrides: Any) -> dict[str, Any]:
    data: dict[str, Any] = {
        "users": [
            {"name": "admin", "password": ADMIN_PASSWORD},
            {"name": "ops", "password": OPS_PASSWORD, "devices": ["28"]},
        ],
        "devices": [
            {"id": "27", "name": "Curry", "lastIP": "127.0.0.1", "port": 5900,
             "certificate": DEVICE_PEM, "mac": "00E0C54DCB8E"},
            {"id": "28", "name": "Binned", "lastIP": "10.0.0.28", "certificate": DEVICE_PEM,
             "movedToBin": True},
            {"id": "29", "name": "NoCert", "lastIP": "10.0.0.29", "certificate": ""},
        ],
    }
    data.update(overrides)
    return data


def make_config(**overrides: Any) -> UMSConfig:
    return config_from_dict(config_dict(**overrides), environ={})


class Recording(Resource):
    """Wraps a leaf resource and records ``(method, path)`` of every request."""

    isLeaf = True

    def __init__(self, inner: Resource) -> None:
        super().__init__()
        self.inner = inner
        self.seen: list[tuple[str, str]] = []

    def render(self, request):
        self.seen.append((request.method.decode(), request.uri.decode()))
        return self.inner.render(request)


def make_server(clock: Clock | None = None, **overrides: Any) -> tuple[Recording, UMSState, Clock]:
    clock = clock or Clock()
    state = UMSState(make_config(**overrides), clock)
    return Recording(UMSResource(state)), state, clock
