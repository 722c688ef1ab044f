"""The secret's ``"gateway": {"url", "token"}`` (secshadow.secret) and the console stream's
transport (secshadow.gateway.dialer.GatewayStream) with fakes."""

from __future__ import annotations

import json
import pickle
from typing import Any

import pytest
from twisted.internet.interfaces import IConsumer, IPushProducer, ITransport
from twisted.internet.testing import StringTransport

from secshadow.errors import SecretError
from secshadow.gateway import wire
from secshadow.gateway.dialer import GatewayAddress, GatewayStream
from secshadow.lab import certs
from secshadow.relay import push_producer_of
from secshadow.secret import GatewayToken, load_secret
from secshadow.wsstream import AutobahnSide

TOKEN = "eyJhbGciOiJFZERTQSIsInR5cCI6IkpXVCJ9.eyJzaWQiOiJTMSJ9.c2lnbmF0dXJlLXNlY3JldC14eXo"
URL = "wss://gw.example:8443/v1/sessions/S1/console"
CERT = certs.generate_self_signed()[0].decode()


def secret(**gateway: Any) -> bytes:
    return json.dumps({"certificate": CERT, "password": "p-1", "gateway": gateway}).encode()


def test_short_form_secret_with_gateway() -> None:
    loaded = load_secret(secret(url=URL, token=TOKEN))
    assert loaded.gateway is not None
    assert loaded.gateway.url == URL
    assert loaded.gateway.token.reveal() == TOKEN
    for text in (repr(loaded), str(loaded), f"{loaded}", repr(loaded.gateway), f"{loaded.gateway.token}"):
        assert TOKEN not in text and "c2lnbmF0dXJl" not in text
    assert "token=<redacted>" in repr(loaded)
    with pytest.raises(TypeError):
        pickle.dumps(loaded.gateway.token)


def test_imi_document_carries_the_gateway_inside_shadow_secret() -> None:
    document = {"lastIP": "10.0.0.5", "id": "27", "name": "Curry",
                "shadowSecret": {"certificate": CERT, "password": "p-1", "gateway": {"url": URL, "token": TOKEN}}}
    loaded = load_secret(json.dumps(document))
    assert loaded.gateway is not None and loaded.gateway.url == URL and loaded.host == "10.0.0.5"


def test_no_gateway_is_none() -> None:
    assert load_secret(json.dumps({"certificate": CERT, "password": "p"})).gateway is None


@pytest.mark.parametrize(("gateway", "message"), [
    ({"url": URL}, "needs 'url' and 'token'"),
    ({"url": URL, "token": "not a jwt"}, "not a JWT"),
    ({"url": "wss://gw/v1/sessions/S1/device", "token": TOKEN}, "console leg"),
    ({"url": "ws://gw/v1/sessions/S1/console", "token": TOKEN}, "wss://"),
    ({"url": "wss://gw/elsewhere", "token": TOKEN}, "path must be"),
])
def test_malformed_gateway_is_a_secret_error_without_the_token(gateway: dict[str, str], message: str) -> None:
    with pytest.raises(SecretError, match=message) as caught:
        load_secret(secret(**gateway))
    assert TOKEN not in caught.value.message


def test_gateway_must_be_an_object() -> None:
    with pytest.raises(SecretError, match="must be an object"):
        load_secret(json.dumps({"certificate": CERT, "password": "p", "gateway": URL}))


def test_gateway_token_equality_and_hash_do_not_leak() -> None:
    assert GatewayToken(TOKEN) == GatewayToken(TOKEN + "\n")
    assert hash(GatewayToken(TOKEN)) == hash(GatewayToken("a.b.c"))


# -- GatewayStream, the transport of the paired stream -------------------------------


class FakeLeg(AutobahnSide):
    """Stands for the client WebSocket protocol: messages sent, reading state."""

    STATE_OPEN = 3

    def __init__(self) -> None:
        self.state = self.STATE_OPEN
        self.transport = StringTransport()
        self.messages: list[tuple[bytes, bool]] = []
        self.reading = True
        self.closed: int | None = None
        self.aborted = False

    def sendMessage(self, payload: bytes, isBinary: bool = False) -> None:
        self.messages.append((payload, isBinary))

    def pause_reading(self) -> None:
        self.reading = False

    def resume_reading(self) -> None:
        self.reading = True

    def close_cleanly(self, code: int) -> None:
        self.closed = code

    def abort(self) -> None:
        self.aborted = True


def stream() -> tuple[GatewayStream, FakeLeg]:
    leg = FakeLeg()
    return GatewayStream(leg, GatewayAddress("gw", 443, "S1", "console")), leg  # type: ignore[arg-type]


def test_writes_become_binary_messages_of_at_most_64_kib() -> None:
    s, leg = stream()
    data = bytes(range(256)) * 1024  # 256 KiB + change
    s.write(data + b"tail")
    assert all(binary for _, binary in leg.messages)
    assert [len(p) for p, _ in leg.messages] == [wire.MAX_MESSAGE] * 4 + [4]
    assert b"".join(p for p, _ in leg.messages) == data + b"tail"
    s.writeSequence([b"a", b"b"])
    assert leg.messages[-1] == (b"ab", True)


def test_stream_is_a_push_producer_and_a_consumer_of_the_socket() -> None:
    s, leg = stream()
    assert ITransport.providedBy(s) and IPushProducer.providedBy(s) and IConsumer.providedBy(s)
    assert push_producer_of(s) is s  # relay.Splice can pause it directly
    s.pauseProducing()
    assert not leg.reading and s.paused
    s.resumeProducing()
    assert leg.reading and not s.paused
    producer = StringTransport()
    s.registerProducer(producer, True)
    assert leg.transport.producer is producer and leg.transport.streaming
    s.unregisterProducer()
    assert leg.transport.producer is None
    assert s.getPeer() == GatewayAddress("gw", 443, "S1", "console")


def test_writes_after_the_websocket_started_closing_are_dropped() -> None:
    s, leg = stream()
    leg.state = 2  # autobahn's STATE_CLOSING: sendMessage would raise
    s.write(b"late record")
    assert leg.messages == []


def test_lose_and_abort() -> None:
    s, leg = stream()
    s.loseConnection()
    assert leg.closed == 1000 and s.disconnecting
    s.write(b"late")
    assert leg.messages == []  # nothing after a close started
    s2, leg2 = stream()
    s2.stopProducing()  # like TCP: the consumer is gone, close cleanly
    assert leg2.closed == 1000 and not leg2.aborted
    s3, leg3 = stream()
    s3.abortConnection()
    assert leg3.aborted
