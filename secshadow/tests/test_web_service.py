"""secshadow-web's logic with Twisted's fakes: the UMS session client against the
reference IMI server's resource tree (treq's StubTreq), the device list parser, and the
service's session rules (idle expiry, UMS expiry during a shadowing, the shadow answer)
under task.Clock with a recording start_shadowing. The real service with the real lab and
real Chromium is test_web_service_real.py."""

from __future__ import annotations

import json
from typing import Any

import pytest
import pytest_twisted
from treq.testing import StubTreq
from twisted.internet.defer import Deferred
from twisted.internet.protocol import Factory
from twisted.internet.task import Clock

from secshadow import events
from secshadow.errors import PinMismatch, UMSError
from secshadow.lab.imiserver.server import SESSION_IDLE_SECONDS
from secshadow.tests._umsfixtures import ADMIN_PASSWORD, OPS_PASSWORD, make_server
from secshadow.umstrust import UMSTrust
from secshadow.web.assets import NoVNCAssets
from secshadow.web.service import WebService
from secshadow.web.ums import LoginRefused, UMSSession, UMSSessionExpired, UMSSessionSource, parse_device_list

BASE = "https://ums.test:8443"


def ums_for(resource: Any) -> UMSSession:
    return UMSSession(Clock(), BASE, UMSTrust.insecure(), http_client=StubTreq(resource))


# ------------------------------------------------------------------ the UMS session


@pytest_twisted.ensureDeferred
async def test_login_keeps_the_session_and_drops_the_password():
    resource, state, _ = make_server()
    ums = ums_for(resource)
    await ums.login("admin", ADMIN_PASSWORD)
    assert ums.logged_in and ums.user == "admin"
    kept = json.dumps({k: repr(v) for k, v in vars(ums).items()})
    assert ADMIN_PASSWORD not in kept and ADMIN_PASSWORD not in repr(ums)


@pytest_twisted.ensureDeferred
async def test_a_wrong_password_is_login_refused():
    resource, _, _ = make_server()
    ums = ums_for(resource)
    with pytest.raises(LoginRefused) as info:
        await ums.login("admin", "Tr0ub4dor&3")
    assert "Tr0ub4dor&3" not in info.value.message and not ums.logged_in


@pytest_twisted.ensureDeferred
async def test_the_device_list_comes_from_imi_v3_thinclients_per_user():
    resource, _, _ = make_server()
    admin = ums_for(resource)
    await admin.login("admin", ADMIN_PASSWORD)
    devices = await admin.devices()
    assert [d.as_dict() for d in devices] == [
        {"id": "27", "name": "Curry", "lastIP": "127.0.0.1"},
        {"id": "29", "name": "NoCert", "lastIP": "10.0.0.29"},  # 28 is in the recycle bin
    ]
    assert ("GET", "/umsapi/v3/thinclients") in resource.seen
    ops = ums_for(resource)
    await ops.login("ops", OPS_PASSWORD)
    assert await ops.devices() == []  # ops may read only 28, which is binned


@pytest_twisted.ensureDeferred
async def test_a_session_the_ums_dropped_is_expired_everywhere():
    resource, state, clock = make_server()
    ums = ums_for(resource)
    await ums.login("admin", ADMIN_PASSWORD)
    secret = await UMSSessionSource(ums, "27").fetch()
    assert secret.device_id == "27"
    clock.advance(SESSION_IDLE_SECONDS + 1)
    with pytest.raises(UMSSessionExpired):
        await ums.devices()
    with pytest.raises(UMSSessionExpired):
        await ums.shadow_secret("27")
    with pytest.raises(UMSSessionExpired):
        await ums.check("27")


def test_device_list_parsing():
    body = json.dumps([
        {"id": 7, "name": "b", "lastIP": "10.0.0.7"},
        {"id": "5", "name": "A", "lastIP": None},
        {"id": "x/../y", "name": "bad id"},
        {"id": "9", "name": "binned", "movedToBin": True},
        "not an object",
    ]).encode()
    assert [d.as_dict() for d in parse_device_list(body, "u")] == [
        {"id": "5", "name": "A", "lastIP": ""}, {"id": "7", "name": "b", "lastIP": "10.0.0.7"}]
    assert parse_device_list(b'{"thinclients": [{"id": "1", "name": "w"}]}', "u")[0].id == "1"
    for bad in (b"<html>", b'"text"', b"{}"):
        with pytest.raises(UMSError, match="bad response"):
            parse_device_list(bad, "u")


# ------------------------------------------------------------------ the service's rules


class _FakeShadowing:
    def __init__(self) -> None:
        self.done: Deferred[Any] = Deferred()
        self.stopped: list[str] = []
        self.port: Any = None

    def stop(self, reason: str = "stopped") -> Deferred[Any]:
        self.stopped.append(reason)
        if self.port is not None:
            self.port.stopListening()
        if not self.done.called:
            self.done.callback(events.Closed(reason=reason))
        return self.done


class _Recorder:
    """Stands in for secshadow.api.start_shadowing: records the call, listens at once
    (or fails with ``error``)."""

    def __init__(self, error: Exception | None = None) -> None:
        self.calls: list[dict[str, Any]] = []
        self.error = error
        self.shadowings: list[_FakeShadowing] = []

    def __call__(self, reactor: Any, source: Any, options: Any, **kw: Any) -> _FakeShadowing:
        self.calls.append({"source": source, "options": options, **kw})
        shadowing = _FakeShadowing()
        self.shadowings.append(shadowing)
        if self.error is not None:
            shadowing.done.errback(self.error)
        else:
            kw["viewer_endpoint"].listen(Factory()).addCallback(lambda port: setattr(shadowing, "port", port))
        return shadowing


def _service(tmp_path: Any, recorder: _Recorder) -> tuple[WebService, Any, Clock]:
    resource, state, clock = make_server()
    (tmp_path / "core").mkdir()
    (tmp_path / "vendor").mkdir()
    (tmp_path / "core" / "rfb.js").write_text("")
    service = WebService(clock, BASE, UMSTrust.insecure(), NoVNCAssets.at(tmp_path), clock=clock,
                         ums_factory=lambda: ums_for(resource), start=recorder, session_idle=600, check_interval=60)
    return service, state, clock


@pytest_twisted.ensureDeferred
async def test_an_idle_login_ends_and_logs_out_of_the_ums(tmp_path):
    service, state, clock = _service(tmp_path, _Recorder())
    _, session = await service.login("admin", ADMIN_PASSWORD)
    assert len(state._sessions) == 1
    clock.advance(599)
    assert not session.ended
    clock.advance(2)
    assert session.ended and service.sessions == {}
    assert state._sessions == {}  # logged out at the UMS
    assert clock.getDelayedCalls() == []


@pytest_twisted.ensureDeferred
async def test_shadow_answers_paths_with_a_token_and_ends_when_the_ums_session_does(tmp_path):
    recorder = _Recorder()
    service, state, clock = _service(tmp_path, recorder)
    _, session = await service.login("admin", ADMIN_PASSWORD)
    port = await service.shadow(session, "27", view_only=True, client_gone=Deferred())
    assert port.url.startswith("/view#token=") and "view_only=1" in port.url
    assert port.websocket.startswith("/websocket?token=")
    (call,) = recorder.calls
    assert call["options"].view_only is True and call["viewer_name"] == "browser"
    assert isinstance(call["source"], UMSSessionSource) and call["source"].device_id == "27"
    clock.advance(700)  # no idle end while a shadowing runs
    assert not session.ended
    state._sessions.clear()  # the UMS dropped the session (an administrator killed it)
    clock.advance(60)  # the next check finds out
    assert session.ended
    assert recorder.shadowings[0].stopped == ["the UMS session expired"]
    assert len(service.website.tokens) == 0
    assert clock.getDelayedCalls() == []


@pytest_twisted.ensureDeferred
async def test_shadow_reports_the_sessions_error_before_any_page(tmp_path):
    service, _, clock = _service(tmp_path, _Recorder(error=PinMismatch("the device did not present the pin")))
    _, session = await service.login("admin", ADMIN_PASSWORD)
    with pytest.raises(PinMismatch):
        await service.shadow(session, "27", view_only=False, client_gone=Deferred())
    assert session.shadowings == {} and len(service.website.tokens) == 0
    await service.end_session(session, "done")
    assert clock.getDelayedCalls() == []


@pytest_twisted.ensureDeferred
async def test_a_browser_that_leaves_before_the_answer_stops_the_shadowing(tmp_path):
    class _Slow(_Recorder):
        def __call__(self, reactor: Any, source: Any, options: Any, **kw: Any) -> _FakeShadowing:
            shadowing = _FakeShadowing()
            self.shadowings.append(shadowing)
            return shadowing  # never listens: still fetching the secret

    recorder = _Slow()
    service, _, clock = _service(tmp_path, recorder)
    _, session = await service.login("admin", ADMIN_PASSWORD)
    gone: Deferred[None] = Deferred()
    answer = Deferred.fromCoroutine(service.shadow(session, "27", view_only=False, client_gone=gone))
    answer.addErrback(lambda f: None)
    gone.callback(None)
    assert recorder.shadowings[0].stopped == ["the browser went away"]
    await service.end_session(session, "done")
    assert clock.getDelayedCalls() == []

