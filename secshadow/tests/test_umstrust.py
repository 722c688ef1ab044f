"""UMSTrust against a real HTTPS server on 127.0.0.1 (port 0) inside the test reactor."""

from __future__ import annotations

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
import pytest_twisted
from treq.client import HTTPClient
from twisted.internet import reactor
from twisted.web.client import Agent, HTTPConnectionPool
from twisted.web.resource import Resource
from twisted.web.server import Site

from secshadow.errors import UMSError, UsageError
from secshadow.imi import connection_error
from secshadow.tests._umscerts import Pair, make_ca, make_leaf
from secshadow.umstrust import UMSTrust, find_ums_error, parse_fingerprint
from secshadow.web.tls import ServerTLS


class Hello(Resource):
    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.requests = 0

    def render_GET(self, request):
        self.requests += 1
        return b"hello from the UMS"


@pytest.fixture
def https_server():
    """Start HTTPS servers with a given certificate; yields ``start(pair) -> (port, resource)``."""
    ports = []

    def start(pair: Pair):
        resource = Hello()
        site = Site(resource)
        site.noisy = False
        tls = ServerTLS(
            [x509.load_pem_x509_certificate(pair.cert_pem)],
            serialization.load_pem_private_key(pair.key_pem, password=None),
        )
        port = reactor.listenSSL(0, site, tls, interface="127.0.0.1")
        ports.append(port)
        return port.getHost().port, resource

    yield start
    for port in ports:
        pytest_twisted.blockon(port.stopListening())


async def fetch(url: str, trust: UMSTrust) -> tuple[int, bytes]:
    """GET through treq on an Agent using ``trust``; transport failures become UMSError."""
    pool = HTTPConnectionPool(reactor, persistent=False)
    client = HTTPClient(Agent(reactor, contextFactory=trust, pool=pool))
    try:
        response = await client.get(url, timeout=10)
        return response.code, await response.content()
    except Exception as e:
        raise connection_error(e, url, 10) from e


@pytest.fixture(scope="module")
def ca():
    return make_ca()


@pytest.fixture
def ca_file(ca, tmp_path):
    path = tmp_path / "ca.pem"
    path.write_bytes(ca[0].cert_pem)
    return str(path)


@pytest.mark.integration
@pytest_twisted.ensureDeferred
async def test_fingerprint_match_accepts_self_signed_certificate(https_server):
    pair = make_leaf(cn=None, san=False)  # name-less, like a default UMS install
    port, _ = https_server(pair)
    for text in (pair.sha256, pair.sha256.replace(":", "").lower()):
        code, body = await fetch(f"https://127.0.0.1:{port}/", UMSTrust.from_fingerprint(text))
        assert (code, body) == (200, b"hello from the UMS")


@pytest.mark.integration
@pytest_twisted.ensureDeferred
async def test_fingerprint_mismatch_fails_before_any_request(https_server):
    pair = make_leaf()
    port, resource = https_server(pair)
    other = make_leaf().sha256
    with pytest.raises(UMSError) as info:
        await fetch(f"https://127.0.0.1:{port}/", UMSTrust.from_fingerprint(other))
    message = info.value.message
    assert "does not match --ums-fingerprint" in message
    assert pair.sha256 in message and other in message
    assert f"127.0.0.1:{port}" in message
    assert resource.requests == 0


@pytest.mark.integration
@pytest_twisted.ensureDeferred
async def test_ca_file_accepts_ca_signed_certificate_by_ip_and_name(https_server, ca, ca_file):
    pair = make_leaf(issuer=(ca[1], ca[2]))
    port, resource = https_server(pair)
    trust = UMSTrust.from_ca_file(ca_file)
    assert await fetch(f"https://127.0.0.1:{port}/", trust) == (200, b"hello from the UMS")
    assert await fetch(f"https://localhost:{port}/", trust) == (200, b"hello from the UMS")
    assert resource.requests == 2


@pytest.mark.integration
@pytest_twisted.ensureDeferred
async def test_ca_file_may_hold_the_server_certificate_itself(https_server, tmp_path):
    pair = make_leaf()  # self-signed, with SAN
    port, _ = https_server(pair)
    path = tmp_path / "ums.pem"
    path.write_bytes(pair.cert_pem)
    assert await fetch(f"https://127.0.0.1:{port}/", UMSTrust.from_ca_file(path)) == (200, b"hello from the UMS")


@pytest.mark.integration
@pytest_twisted.ensureDeferred
async def test_ca_signed_certificate_without_subject_alt_name_is_refused(https_server, ca, ca_file):
    # The pitfall of docs/protocol.md section 3: Twisted alone only logs this case.
    pair = make_leaf(cn="127.0.0.1", san=False, issuer=(ca[1], ca[2]))
    port, resource = https_server(pair)
    with pytest.raises(UMSError) as info:
        await fetch(f"https://127.0.0.1:{port}/", UMSTrust.from_ca_file(ca_file))
    assert "certificate has no subjectAltName for host 127.0.0.1" in info.value.message
    assert resource.requests == 0


@pytest.mark.integration
@pytest_twisted.ensureDeferred
async def test_ca_signed_certificate_for_another_name_is_refused(https_server, ca, ca_file):
    pair = make_leaf(cn="127.0.0.1", dns=("ums.other.example",), ips=("10.9.9.9",), issuer=(ca[1], ca[2]))
    port, resource = https_server(pair)
    for host in ("127.0.0.1", "localhost"):
        with pytest.raises(UMSError) as info:
            await fetch(f"https://{host}:{port}/", UMSTrust.from_ca_file(ca_file))
        assert f"not valid for host {host}" in info.value.message
        assert "ums.other.example" in info.value.message
    assert resource.requests == 0


@pytest.mark.integration
@pytest_twisted.ensureDeferred
async def test_certificate_from_another_ca_is_not_trusted(https_server, ca_file):
    stranger = make_ca()
    port, resource = https_server(make_leaf(issuer=(stranger[1], stranger[2])))
    with pytest.raises(UMSError) as info:
        await fetch(f"https://127.0.0.1:{port}/", UMSTrust.from_ca_file(ca_file))
    assert "not trusted by --ums-ca" in info.value.message
    assert ca_file in info.value.message
    assert resource.requests == 0


@pytest.mark.integration
@pytest_twisted.ensureDeferred
async def test_insecure_accepts_anything(https_server, ca):
    port, _ = https_server(make_leaf(cn="nobody", san=False))
    assert await fetch(f"https://127.0.0.1:{port}/", UMSTrust.insecure()) == (200, b"hello from the UMS")


@pytest.mark.integration
@pytest_twisted.ensureDeferred
async def test_plain_http_server_gives_a_tls_error_naming_the_url():
    from twisted.internet.protocol import Factory, Protocol

    class Garbage(Protocol):
        def connectionMade(self):
            self.transport.write(b"HTTP/1.1 400 Bad Request\r\n\r\n")
            self.transport.loseConnection()

    port = reactor.listenTCP(0, Factory.forProtocol(Garbage), interface="127.0.0.1")
    try:
        url = f"https://127.0.0.1:{port.getHost().port}/"
        with pytest.raises(UMSError) as info:
            await fetch(url, UMSTrust.insecure())
        assert url in info.value.message
    finally:
        await port.stopListening()


@pytest.mark.integration
@pytest_twisted.ensureDeferred
async def test_anonymous_cipher_server_is_refused_in_every_mode():
    # A certificate-less peer would skip the verify callback (docs/protocol.md section 3).
    from OpenSSL import SSL
    from twisted.internet.interfaces import IOpenSSLServerConnectionCreator
    from zope.interface import implementer

    @implementer(IOpenSSLServerConnectionCreator)
    class Anonymous:
        def serverConnectionForTLS(self, protocol):
            context = SSL.Context(SSL.TLS_SERVER_METHOD)
            context.set_max_proto_version(SSL.TLS1_2_VERSION)
            context.set_cipher_list(b"aNULL:@SECLEVEL=0")
            return SSL.Connection(context, None)

    resource = Hello()
    port = reactor.listenSSL(0, Site(resource), Anonymous(), interface="127.0.0.1")
    try:
        url = f"https://127.0.0.1:{port.getHost().port}/"
        for trust in (UMSTrust.insecure(), UMSTrust.from_fingerprint(make_leaf().sha256)):
            with pytest.raises(UMSError) as info:
                await fetch(url, trust)
            assert url in info.value.message
        assert resource.requests == 0
    finally:
        await port.stopListening()


@pytest.mark.parametrize(
    "text",
    ["", "AB:CD", "zz" * 32, "0" * 63, "0" * 65, "sha256:" + "0" * 64],
)
def test_malformed_fingerprint_is_a_usage_error(text):
    with pytest.raises(UsageError) as info:
        UMSTrust.from_fingerprint(text)
    assert "64 hex digits" in info.value.message


def test_fingerprint_accepts_colons_and_any_case():
    pair = make_leaf()
    expected = pair.sha256
    assert UMSTrust.from_fingerprint(expected.lower()).fingerprint == expected
    assert parse_fingerprint(expected.replace(":", "")) == bytes.fromhex(expected.replace(":", ""))


def test_ca_file_must_exist_and_hold_a_certificate(tmp_path):
    with pytest.raises(UsageError, match="cannot read --ums-ca"):
        UMSTrust.from_ca_file(tmp_path / "missing.pem")
    empty = tmp_path / "empty.pem"
    empty.write_text("not a certificate\n")
    with pytest.raises(UsageError, match="holds no PEM certificate"):
        UMSTrust.from_ca_file(empty)


def test_find_ums_error_digs_through_nested_reasons():
    from twisted.python.failure import Failure
    from twisted.web._newclient import ResponseNeverReceived

    inner = UMSError("the UMS certificate does not match --ums-fingerprint")
    outer = ResponseNeverReceived([Failure(inner)])
    assert find_ums_error(outer) is inner
    assert find_ums_error(ValueError("x")) is None


def test_describe_names_the_mode():
    assert "--ums-insecure" in UMSTrust.insecure().describe()
    assert UMSTrust.from_fingerprint("ab" * 32).describe().startswith("--ums-fingerprint AB:AB")


def test_from_flags_is_the_one_constructor_for_the_three_flags(tmp_path):
    pem = tmp_path / "ca.pem"
    pem.write_bytes(make_ca()[0].cert_pem)
    assert UMSTrust.from_flags(None, None, False).mode == "system"
    assert UMSTrust.from_flags(str(pem), None, False).mode == "ca"
    pinned = UMSTrust.from_flags(None, "ab" * 32, False)
    assert (pinned.mode, pinned.fingerprint) == ("fingerprint", ":".join(["AB"] * 32))
    assert UMSTrust.from_flags(None, None, True).mode == "insecure"
    with pytest.raises(UsageError, match="only one of --ums-ca, --ums-fingerprint, --ums-insecure"):
        UMSTrust.from_flags(str(pem), "ab" * 32, False)
    with pytest.raises(UsageError, match="--ums-fingerprint and --ums-insecure"):
        UMSTrust.from_flags(None, "ab" * 32, True)
    # An empty value is a mistake, not "no flag": it must not fall back to the system store.
    with pytest.raises(UsageError, match="--ums-fingerprint"):
        UMSTrust.from_flags(None, "", False)
    with pytest.raises(UsageError, match="cannot read --ums-ca"):
        UMSTrust.from_flags("", None, False)


def test_one_cause_walker_serves_both_the_trust_and_the_imi_errors():
    """``failure_causes`` is the one walker: depth first through Agent ``reasons``
    (Failures), ``__cause__`` and ``__context__``, each exception once, cycles ended."""
    from twisted.python.failure import Failure
    from twisted.web._newclient import ResponseFailed, ResponseNeverReceived

    import secshadow.imi as imi
    from secshadow.umstrust import failure_causes

    timeout = TimeoutError("slow")
    trust = UMSError("the UMS certificate does not match --ums-fingerprint")
    try:
        try:
            raise timeout
        except TimeoutError:
            raise ValueError("wrapped") from trust
    except ValueError as e:
        wrapped = e
    wrapped.__context__ = wrapped  # a cycle must not loop forever
    outer = ResponseNeverReceived([Failure(ResponseFailed([Failure(wrapped), "not an exception"]))])
    causes = failure_causes(Failure(outer))
    assert causes[0] is outer and trust in causes and len(causes) == len({id(c) for c in causes})
    assert [type(c).__name__ for c in causes] == ["ResponseNeverReceived", "ResponseFailed", "ValueError",
                                                  "UMSError"]
    assert find_ums_error(outer) is trust
    assert "does not match --ums-fingerprint" in imi.connection_error(outer, "https://u").message
    # imi has no walker of its own any more.
    assert not hasattr(imi, "_causes")
