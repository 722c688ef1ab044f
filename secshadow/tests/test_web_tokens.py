"""Unit tests of the browser path's rules with Twisted's fakes: single-use tokens and
their 60 s (task.Clock), the Origin rule, the headers, the WebSocket gate's refusals
(DummyRequest), the endpoint's URLs (MemoryReactorClock) and the noVNC lookup."""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

import pytest
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock
from twisted.web.test.requesthelper import DummyRequest

from secshadow.errors import UsageError
from secshadow.web.assets import INSTALL_COMMAND, NOVNC_VERSION, NoVNCAssets, find_novnc
from secshadow.web.endpoint import SharedSiteEndpoint, Ticket, WebSite, WebViewerEndpoint
from secshadow.web.policy import OriginPolicy, check_frame_ancestors, normalize_origin, security_headers
from secshadow.web.tokens import TOKEN_LIFETIME, TokenStore, looks_like_token, new_token

# ------------------------------------------------------------------ tokens


def test_a_token_is_128_random_bits_in_base64url():
    tokens = {new_token() for _ in range(2000)}
    assert len(tokens) == 2000
    for token in list(tokens)[:50]:
        assert looks_like_token(token)
        assert len(base64.urlsafe_b64decode(token + "==")) == 16


def test_a_token_works_once_and_leaves_no_timer():
    clock = Clock()
    store: TokenStore[str] = TokenStore(clock)
    token = store.mint("session-1")
    assert store.redeem(token) == "session-1"
    assert store.redeem(token) is None
    assert clock.getDelayedCalls() == []


def test_a_token_expires_after_60_seconds_unused():
    clock = Clock()
    store: TokenStore[str] = TokenStore(clock)
    expired: list[str] = []
    token = store.mint("session-1", on_expire=lambda: expired.append("gone"))
    clock.advance(TOKEN_LIFETIME - 0.5)
    assert len(store) == 1 and expired == []
    clock.advance(1)
    assert expired == ["gone"]
    assert store.redeem(token) is None
    assert clock.getDelayedCalls() == []


def test_unknown_and_malformed_tokens_open_nothing():
    clock = Clock()
    store: TokenStore[str] = TokenStore(clock)
    token = store.mint("session-1")
    for wrong in (new_token(), "", None, 42, token[:-1], token + "A", token.upper() if token != token.upper() else "x",
                  "../../etc/passwd", "ä" * 22):
        assert store.redeem(wrong) is None
    assert store.redeem(token) == "session-1"


def test_revoking_forgets_the_token_and_its_timer_and_repr_hides_tokens():
    clock = Clock()
    store: TokenStore[str] = TokenStore(clock)
    token = store.mint("s")
    assert token not in repr(store)
    assert store.revoke(token) is True
    assert store.revoke(token) is False
    assert clock.getDelayedCalls() == []
    store.mint("a"), store.mint("b")
    store.clear()
    assert len(store) == 0 and clock.getDelayedCalls() == []


# ------------------------------------------------------------------ Origin


@pytest.mark.parametrize("origin,host,secure", [
    (None, "127.0.0.1:4000", False),                      # no browser: the token is enough
    ("http://127.0.0.1:4000", "127.0.0.1:4000", False),   # our own page
    ("http://localhost:4000", "localhost:4000", False),
    ("https://10.1.2.3", "10.1.2.3:443", True),            # default port written or not
    ("http://[::1]:4000", "[::1]:4000", False),
    ("https://console.example:8443", "shadow.example", True),  # configured
])
def test_origins_that_may_open_the_websocket(origin, host, secure):
    assert OriginPolicy(["https://console.example:8443"]).allows(origin, host, secure)


@pytest.mark.parametrize("origin,host,secure", [
    ("http://evil.example", "127.0.0.1:4000", False),            # a foreign page
    ("http://evil.example:4000", "evil.example:4000", False),     # DNS rebinding: names match, no address
    ("null", "127.0.0.1:4000", False),                            # sandboxed frame / file: page
    ("https://127.0.0.1:4000", "127.0.0.1:4000", False),          # scheme differs
    ("http://127.0.0.1:4001", "127.0.0.1:4000", False),           # port differs
    ("http://127.0.0.1:4000/path", "127.0.0.1:4000", False),      # not an origin
    ("http://127.0.0.1:4000", None, False),                       # no Host to compare with
])
def test_origins_that_are_refused(origin, host, secure):
    assert not OriginPolicy().allows(origin, host, secure)


def test_origin_normalization_and_bad_configured_origins():
    assert normalize_origin("HTTPS://Console.Example:443/") == "https://console.example"
    assert normalize_origin("http://[::1]:80") == "http://[::1]"
    for bad in ("console.example", "ftp://x", "https://u:p@x", "https://x/app", "https://x?q"):
        with pytest.raises(UsageError):
            OriginPolicy([bad])


# ------------------------------------------------------------------ headers


def test_default_headers_forbid_framing_caching_and_foreign_scripts():
    headers = security_headers(None)
    csp = headers[b"Content-Security-Policy"].decode()
    assert "default-src 'self'" in csp and "script-src 'self'" in csp and "connect-src 'self'" in csp
    assert "frame-ancestors 'none'" in csp
    assert headers[b"X-Frame-Options"] == b"DENY"
    assert headers[b"Cache-Control"] == b"no-store"
    assert headers[b"Referrer-Policy"] == b"no-referrer"


def test_a_console_that_embeds_the_page_names_itself_in_frame_ancestors():
    headers = security_headers(check_frame_ancestors("https://console.example:8443 'self'"))
    assert "frame-ancestors https://console.example:8443 'self'" in headers[b"Content-Security-Policy"].decode()
    assert b"X-Frame-Options" not in headers
    for bad in ("", "*", "javascript:alert(1)", "https://x; script-src *"):
        with pytest.raises(UsageError):
            check_frame_ancestors(bad)


# ------------------------------------------------------------------ the gate


class _CountingFactory(Factory):
    def __init__(self, accept: bool = True) -> None:
        self.built = 0
        self.accept = accept

    def buildProtocol(self, addr: Any) -> Protocol | None:
        self.built += 1
        return Protocol() if self.accept else None


@pytest.fixture
def novnc(tmp_path: Path) -> NoVNCAssets:
    root = tmp_path / "novnc"
    (root / "core").mkdir(parents=True)
    (root / "vendor").mkdir()
    (root / "core" / "rfb.js").write_text("export default class RFB {}\n")
    (root / "package.json").write_text(json.dumps({"version": NOVNC_VERSION}))
    return NoVNCAssets.at(root)


def _upgrade(token: str, origin: str | None = "http://127.0.0.1:4000") -> DummyRequest:
    request = DummyRequest([b"websocket"])
    request.method = b"GET"
    request.isSecure = lambda: False  # type: ignore[method-assign]
    request.args = {b"token": [token.encode()]}
    request.requestHeaders.setRawHeaders(b"host", [b"127.0.0.1:4000"])
    request.requestHeaders.setRawHeaders(b"upgrade", [b"websocket"])
    if origin is not None:
        request.requestHeaders.setRawHeaders(b"origin", [origin.encode()])
    return request


def _render(site: WebSite, request: DummyRequest) -> tuple[int, bytes]:
    body = site.root.getChildWithDefault(b"websocket", request).render(request)
    return request.responseCode or 200, body


def test_gate_refuses_a_foreign_origin_without_burning_the_token(novnc):
    clock = Clock()
    site = WebSite(novnc, clock)
    factory = _CountingFactory()
    token = site.tokens.mint(Ticket(factory))
    status, body = _render(site, _upgrade(token, origin="http://evil.example"))
    assert status == 403 and b"origin" in body
    assert factory.built == 0
    assert site.tokens.redeem(token) is not None  # the real user can still use it


def test_gate_refuses_unknown_reused_and_expired_tokens_before_the_session_sees_anything(novnc):
    clock = Clock()
    site = WebSite(novnc, clock)
    factory = _CountingFactory()
    status, _ = _render(site, _upgrade(new_token()))
    assert status == 403
    used = site.tokens.mint(Ticket(factory))
    site.tokens.redeem(used)
    status, body = _render(site, _upgrade(used))
    assert status == 403 and b"already used or has expired" in body
    expired = site.tokens.mint(Ticket(factory))
    clock.advance(TOKEN_LIFETIME)
    status, _ = _render(site, _upgrade(expired))
    assert status == 403
    assert factory.built == 0
    assert clock.getDelayedCalls() == []


def test_gate_refuses_when_the_session_takes_no_viewer_and_plain_http(novnc):
    site = WebSite(novnc, Clock())
    factory = _CountingFactory(accept=False)
    token = site.tokens.mint(Ticket(factory))
    status, body = _render(site, _upgrade(token))
    assert status == 403 and factory.built == 1 and b"accepts no viewer" in body
    plain = _upgrade(site.tokens.mint(Ticket(factory)))
    plain.requestHeaders.removeHeader(b"upgrade")
    assert _render(site, plain)[0] == 400


def test_every_answer_carries_the_security_headers(novnc):
    site = WebSite(novnc, Clock(), frame_ancestors="https://console.example")
    request = DummyRequest([b"view"])
    site.root.getChildWithDefault(b"view", request)
    assert b"frame-ancestors https://console.example" in request.responseHeaders.getRawHeaders(
        b"content-security-policy")[0]
    assert request.responseHeaders.getRawHeaders(b"cache-control") == [b"no-store"]


# ------------------------------------------------------------------ endpoints


def test_endpoint_url_holds_the_token_in_the_fragment_and_websocket_in_the_query(novnc):
    reactor = MemoryReactorClock()
    endpoint = WebViewerEndpoint(reactor, "tcp:0:interface=127.0.0.1", assets=novnc, view_only=True)
    ports: list[Any] = []
    endpoint.listen(_CountingFactory()).addCallback(ports.append)
    (port,) = ports
    page, _, fragment = port.url.partition("#")
    assert page.startswith("http://127.0.0.1:") and page.endswith("/view")
    token = fragment.split("&")[0].removeprefix("token=")
    assert looks_like_token(token) and "view_only=1" in fragment
    assert port.websocket.startswith("ws://127.0.0.1:") and port.websocket.endswith(f"/websocket?token={token}")
    assert token not in repr(port)
    assert len(reactor.getDelayedCalls()) == 1  # the token's 60 s
    port.stopListening()
    assert reactor.getDelayedCalls() == []
    assert endpoint.website.tokens.redeem(token) is None


def test_endpoint_refuses_a_bad_listen_string(novnc):
    with pytest.raises(UsageError, match="not a server endpoint"):
        WebViewerEndpoint(MemoryReactorClock(), "nonsense:1", assets=novnc)


def test_shared_site_endpoint_registers_one_token_per_session(novnc):
    clock = Clock()
    site = WebSite(novnc, clock)
    endpoint = SharedSiteEndpoint(site, view_only=False)
    ports: list[Any] = []
    endpoint.listen(_CountingFactory()).addCallback(ports.append)
    assert endpoint.listening.called
    (port,) = ports
    assert port.url.startswith("/view#token=") and port.websocket.startswith("/websocket?token=")
    assert len(site.tokens) == 1
    port.stopListening()
    assert len(site.tokens) == 0 and clock.getDelayedCalls() == []


# ------------------------------------------------------------------ noVNC lookup


def test_novnc_is_found_in_an_npm_prefix_and_its_version_read(tmp_path, novnc):
    prefix = tmp_path / "prefix"
    package = prefix / "node_modules" / "@novnc" / "novnc"
    package.parent.mkdir(parents=True)
    novnc.root.rename(package)
    found = find_novnc(str(prefix), environ={})
    assert found.root == package.resolve() and found.version == NOVNC_VERSION
    assert find_novnc(None, environ={"SECSHADOW_NOVNC": str(prefix)}).root == package.resolve()
    xdg = tmp_path / "xdg"
    (xdg / "secshadow").mkdir(parents=True)
    package.parent.parent.parent.rename(xdg / "secshadow" / "novnc")
    assert find_novnc(None, environ={"XDG_DATA_HOME": str(xdg)}).version == NOVNC_VERSION


def test_missing_novnc_says_how_to_install_it(tmp_path, monkeypatch):
    monkeypatch.setattr("secshadow.web.assets.DEFAULT_NOVNC_DIR", str(tmp_path / "none"))
    with pytest.raises(UsageError) as info:
        find_novnc(str(tmp_path / "empty"), environ={})
    assert INSTALL_COMMAND in info.value.message
    with pytest.raises(UsageError) as info:
        find_novnc(None, environ={"SECSHADOW_NOVNC": str(tmp_path / "nothing-here")})
    assert "npm install" in info.value.message


def test_setup_script_installs_the_pinned_novnc():
    script = (Path(__file__).resolve().parents[2] / "bin" / "setup-debian").read_text()
    assert f'NOVNC_PACKAGE="@novnc/novnc@{NOVNC_VERSION}"' in script
    assert f'"version": "{NOVNC_VERSION}"' in script
    assert "chromium chromium-driver" in script


def test_every_static_file_is_package_data():
    import fnmatch
    import re as _re

    from secshadow.web.endpoint import STATIC_DIR

    setup = (Path(__file__).resolve().parents[2] / "setup.py").read_text()
    patterns = _re.search(r'"secshadow\.web": \[([^\]]*)\]', setup)
    assert patterns is not None
    globs = _re.findall(r'"([^"]+)"', patterns.group(1))
    files = [f"static/{p.name}" for p in STATIC_DIR.iterdir()]
    assert files and all(any(fnmatch.fnmatch(f, g) for g in globs) for f in files)
