"""secshadow.procy: the PROCYCMD command and the RFB hello (PROTOCOL.md section 2)."""

from __future__ import annotations

import uuid

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from secshadow.errors import UsageError
from secshadow.procy import (
    HELLO_LENGTH,
    PROCY_PREFIX,
    BadCommand,
    Command,
    CommandParser,
    Hello,
    HelloParser,
    NotRFB,
    procy_command,
    terminator_bytes,
)
from secshadow.secret import OneTimePassword

PASSWORD = "464abcbd-1399-47d0-b011-eba2e67a72b0"
HELLO = b"RFB 003.008\n"
COMMAND = PROCY_PREFIX + PASSWORD.encode()


# ---------------------------------------------------------------- procy_command


def test_command_for_a_uuid_password_is_48_bytes() -> None:
    command = procy_command(OneTimePassword(PASSWORD))
    assert len(command) == 48
    assert command.startswith(b"PROCYCMD PW_")
    assert command == b"PROCYCMD PW_464abcbd-1399-47d0-b011-eba2e67a72b0"


def test_command_length_for_random_uuids() -> None:
    for _ in range(20):
        value = str(uuid.uuid4())
        command = procy_command(OneTimePassword(value))
        assert len(command) == 48
        assert command == b"PROCYCMD PW_" + value.encode()


@pytest.mark.parametrize(("name", "suffix"), [("none", b""), ("lf", b"\n"), ("crlf", b"\r\n")])
def test_terminators(name: str, suffix: bytes) -> None:
    assert terminator_bytes(name) == suffix
    command = procy_command(OneTimePassword(PASSWORD), terminator_bytes(name))
    assert command == COMMAND + suffix
    assert len(command) == 48 + len(suffix)


@pytest.mark.parametrize("name", ["cr", "LF", "", "\\n", "newline", "CRLF "])
def test_unknown_terminator_name_is_a_usage_error(name: str) -> None:
    with pytest.raises(UsageError) as info:
        terminator_bytes(name)
    assert "none, lf, crlf" in str(info.value)


@pytest.mark.parametrize("terminator", [b"\r", b"\n\r", b"\0", b";", b"\n\n"])
def test_unknown_terminator_bytes_are_a_usage_error(terminator: bytes) -> None:
    with pytest.raises(UsageError):
        procy_command(OneTimePassword(PASSWORD), terminator)


# ---------------------------------------------------------------- HelloParser


def _expect_hello(result: object, rest: bytes = b"", version: str = "RFB 003.008") -> None:
    assert isinstance(result, Hello)
    assert result.version == version
    assert result.raw == version.encode() + b"\n"
    assert result.rest == rest


def test_hello_fed_whole() -> None:
    result = HelloParser().feed(HELLO)
    _expect_hello(result)
    assert (result.major, result.minor) == (3, 8)  # type: ignore[union-attr]


def test_hello_with_trailing_bytes_keeps_them_in_rest() -> None:
    _expect_hello(HelloParser().feed(HELLO + b"\x00\x00\x00\x01\x02"), rest=b"\x00\x00\x00\x01\x02")


@pytest.mark.parametrize(("raw", "major", "minor"), [(b"RFB 003.003\n", 3, 3), (b"RFB 003.889\n", 3, 889)])
def test_other_versions(raw: bytes, major: int, minor: int) -> None:
    result = HelloParser().feed(raw)
    assert isinstance(result, Hello)
    assert (result.major, result.minor, result.version) == (major, minor, raw[:11].decode())


def test_hello_byte_by_byte() -> None:
    parser = HelloParser()
    for i, byte in enumerate(HELLO[:-1]):
        assert parser.feed(bytes([byte])) is None
        assert parser.buffered == i + 1
    _expect_hello(parser.feed(HELLO[-1:]))


def test_empty_feeds_do_nothing() -> None:
    parser = HelloParser()
    assert parser.feed(b"") is None
    assert parser.feed(HELLO[:5]) is None
    assert parser.feed(b"") is None
    _expect_hello(parser.feed(HELLO[5:]))


@pytest.mark.parametrize("rest", [b"", b"\x01", b"\x00\x00\x00\x02\x01\x02"])
def test_hello_in_every_split(rest: bytes) -> None:
    data = HELLO + rest
    for i in range(len(data) + 1):
        for j in range(i, len(data) + 1):
            result, unfed = _feed_chunks(HelloParser(), data, [i, j])
            _expect_hello(result, rest=data[HELLO_LENGTH:len(data) - len(unfed)])
            assert result.rest + unfed == rest  # type: ignore[union-attr]


def test_garbage_is_rejected_at_the_first_byte() -> None:
    result = HelloParser().feed(b"X")
    assert isinstance(result, NotRFB)
    assert "byte 0" in result.reason


@pytest.mark.parametrize(
    ("good", "bad", "index"),
    [
        (b"RFB", b"-", 3),
        (b"RFB 00", b"a", 6),
        (b"RFB 003", b",", 7),
        (b"RFB 003.008", b"\r", 11),
        (b"", b"rfb", 0),
        (b"", b"HTTP/1.1 400 Bad Request\r\n", 0),
    ],
)
def test_wrong_byte_is_reported_as_soon_as_it_arrives(good: bytes, bad: bytes, index: int) -> None:
    parser = HelloParser()
    if good:
        assert parser.feed(good) is None
    result = parser.feed(bad)
    assert isinstance(result, NotRFB)
    assert f"byte {index}" in result.reason


def test_feeding_after_a_result_raises() -> None:
    parser = HelloParser()
    parser.feed(HELLO)
    with pytest.raises(RuntimeError):
        parser.feed(b"more")
    rejected = HelloParser()
    assert isinstance(rejected.feed(b"X"), NotRFB)
    with pytest.raises(RuntimeError):
        rejected.feed(b"")


# ---------------------------------------------------------------- CommandParser


def _expect_command(result: object, rest: bytes = b"", password: str = PASSWORD) -> None:
    assert isinstance(result, Command)
    assert result.password == password
    assert result.rest == rest


@pytest.mark.parametrize("terminator", [b"", b"\n", b"\r\n"])
def test_command_whole_with_each_terminator(terminator: bytes) -> None:
    _expect_command(CommandParser().feed(COMMAND + terminator))
    _expect_command(CommandParser().feed(COMMAND + terminator + HELLO), rest=HELLO)


@pytest.mark.parametrize("terminator", [b"\n", b"\r\n"])
def test_required_terminator_whole(terminator: bytes) -> None:
    parser = CommandParser(require_terminator=True)
    _expect_command(parser.feed(COMMAND + terminator + HELLO), rest=HELLO)


def test_command_byte_by_byte_without_terminator() -> None:
    parser = CommandParser()
    for byte in COMMAND[:-1]:
        assert parser.feed(bytes([byte])) is None
    _expect_command(parser.feed(COMMAND[-1:]))


def test_without_required_terminator_the_parser_returns_after_36_password_characters() -> None:
    # Documented: with no end marker the device reads password_length characters and
    # answers at once; a terminator arriving later is the next layer's business.
    parser = CommandParser()
    _expect_command(parser.feed(COMMAND))
    with pytest.raises(RuntimeError):
        parser.feed(b"\n")


def test_a_trailing_cr_makes_the_parser_wait_for_the_lf() -> None:
    parser = CommandParser()
    assert parser.feed(COMMAND + b"\r") is None
    _expect_command(parser.feed(b"\n" + HELLO), rest=HELLO)


def test_a_trailing_cr_not_followed_by_lf_is_kept_as_data() -> None:
    parser = CommandParser()
    assert parser.feed(COMMAND + b"\r") is None
    _expect_command(parser.feed(b"X"), rest=b"\rX")


def test_required_terminator_in_a_later_segment() -> None:
    parser = CommandParser(require_terminator=True)
    assert parser.feed(COMMAND) is None
    assert parser.feed(b"\r") is None
    _expect_command(parser.feed(b"\n" + HELLO), rest=HELLO)


def test_required_terminator_reads_any_password_length() -> None:
    parser = CommandParser(require_terminator=True)
    _expect_command(parser.feed(PROCY_PREFIX + b"short\n"), password="short")
    long_password = "p" * 256
    _expect_command(
        CommandParser(require_terminator=True).feed(PROCY_PREFIX + long_password.encode() + b"\r\n"),
        password=long_password,
    )


def test_custom_password_length() -> None:
    _expect_command(CommandParser(password_length=5).feed(PROCY_PREFIX + b"abcdeRFB"), password="abcde", rest=b"RFB")


@pytest.mark.parametrize(
    "data", [b"G", b"GET / HTTP/1.1\r\n", b"procycmd pw_", b"PROCYCMD PW-", b"PROCYCMD  PW_", b"\x16\x03\x01"]
)
def test_garbage_prefix_is_a_bad_command(data: bytes) -> None:
    result = CommandParser().feed(data)
    assert isinstance(result, BadCommand)
    assert "PROCYCMD PW_" in result.reason


def test_garbage_prefix_is_refused_at_the_first_wrong_byte() -> None:
    parser = CommandParser()
    assert parser.feed(b"PROCY") is None
    assert isinstance(parser.feed(b"X"), BadCommand)
    with pytest.raises(RuntimeError):
        parser.feed(b"")


def test_overlong_line_without_terminator_is_a_bad_command() -> None:
    parser = CommandParser(require_terminator=True)
    assert parser.feed(PROCY_PREFIX + b"a" * 257) is None
    result = parser.feed(b"a")
    assert isinstance(result, BadCommand)
    assert "terminator" in result.reason
    secret = b"s3cr3t-" * 100
    result = CommandParser(require_terminator=True).feed(PROCY_PREFIX + secret)
    assert isinstance(result, BadCommand)
    assert "s3cr3t" not in result.reason


@pytest.mark.parametrize(
    ("parser", "data"),
    [
        (CommandParser(require_terminator=True), PROCY_PREFIX + b"\n"),
        (CommandParser(require_terminator=True), PROCY_PREFIX + b"\r\n"),
        (CommandParser(require_terminator=True), PROCY_PREFIX + b"pass word\n"),
        (CommandParser(), PROCY_PREFIX + b"464abcbd-1399-47d0-b011-eba2e67a72\n\n"),
        (CommandParser(), PROCY_PREFIX + b"464abcbd 1399-47d0-b011-eba2e67a72b0"),
        (CommandParser(), PROCY_PREFIX + "464abcbd-1399-47d0-b011-eba2e67a72\u00e9".encode()),
    ],
)
def test_invalid_password_characters_are_a_bad_command(parser: CommandParser, data: bytes) -> None:
    result = parser.feed(data)
    assert isinstance(result, BadCommand)
    assert "464abcbd" not in result.reason


def test_command_repr_hides_the_password() -> None:
    command = CommandParser().feed(COMMAND + HELLO)
    assert isinstance(command, Command)
    for text in (repr(command), str(command), f"{command}", "%s" % (command,), str([command])):  # noqa: UP031
        assert PASSWORD not in text
        assert "redacted" in text
        assert "12 bytes" in text


# ---------------------------------------------------------------- properties


def _feed_chunks(parser: HelloParser | CommandParser, data: bytes, cuts: list[int]) -> tuple[object, bytes]:
    """Feed ``data`` cut at ``cuts``; return the first result and the bytes never fed."""
    bounds = [0, *sorted(set(cuts)), len(data)]
    for start, end in zip(bounds, bounds[1:], strict=False):
        result = parser.feed(data[start:end])
        if result is not None:
            return result, data[end:]
    return None, b""


def _cuts(data_strategy: st.SearchStrategy[bytes]) -> st.SearchStrategy[tuple[bytes, list[int]]]:
    return data_strategy.flatmap(
        lambda data: st.tuples(st.just(data), st.lists(st.integers(0, len(data)), max_size=8))
    )


@settings(max_examples=300, deadline=None)
@given(st.lists(st.binary(max_size=40), max_size=8))
def test_random_bytes_never_make_hello_parser_raise(chunks: list[bytes]) -> None:
    parser = HelloParser()
    for chunk in chunks:
        result = parser.feed(chunk)
        if result is not None:
            assert isinstance(result, (Hello, NotRFB))
            return


@settings(max_examples=300, deadline=None)
@given(
    st.lists(st.binary(max_size=80) | st.builds(lambda b: PROCY_PREFIX[: len(b) % 13] + b, st.binary()), max_size=8),
    st.booleans(),
    st.integers(1, 300),
)
def test_random_bytes_never_make_command_parser_raise(chunks: list[bytes], require: bool, length: int) -> None:
    parser = CommandParser(password_length=length, require_terminator=require)
    for chunk in chunks:
        result = parser.feed(chunk)
        if result is not None:
            assert isinstance(result, (Command, BadCommand))
            return


hello_inputs = st.builds(
    lambda major, minor, rest: f"RFB {major:03d}.{minor:03d}\n".encode() + rest,
    st.integers(0, 999),
    st.integers(0, 999),
    st.binary(max_size=30),
) | st.binary(max_size=30)


@settings(max_examples=300, deadline=None)
@given(_cuts(hello_inputs))
def test_any_chunking_of_a_hello_gives_the_same_result(case: tuple[bytes, list[int]]) -> None:
    data, cuts = case
    whole, _ = _feed_chunks(HelloParser(), data, [])
    chunked, unfed = _feed_chunks(HelloParser(), data, cuts)
    if isinstance(whole, Hello):
        assert isinstance(chunked, Hello)
        assert (chunked.version, chunked.major, chunked.minor, chunked.raw) == (
            whole.version, whole.major, whole.minor, whole.raw)
        # Nothing is lost: what the parser kept plus what was never fed is the whole tail.
        assert chunked.rest + unfed == whole.rest
    elif isinstance(whole, NotRFB):
        assert isinstance(chunked, NotRFB)
    else:
        assert chunked is None


passwords = st.text(alphabet=st.characters(min_codepoint=0x21, max_codepoint=0x7E), min_size=1, max_size=60)


@settings(max_examples=300, deadline=None)
@given(
    passwords.flatmap(
        lambda pw: _cuts(
            st.builds(
                lambda term, rest: PROCY_PREFIX + pw.encode() + term + rest,
                st.sampled_from([b"\n", b"\r\n"]),
                st.binary(max_size=20),
            )
        ).map(lambda case: (pw, *case))
    )
)
def test_any_chunking_with_required_terminator_gives_the_same_result(case: tuple[str, bytes, list[int]]) -> None:
    password, data, cuts = case
    whole, _ = _feed_chunks(CommandParser(require_terminator=True), data, [])
    chunked, unfed = _feed_chunks(CommandParser(require_terminator=True), data, cuts)
    assert isinstance(whole, Command) and whole.password == password
    assert isinstance(chunked, Command) and chunked.password == password
    assert chunked.rest + unfed == whole.rest


@settings(max_examples=300, deadline=None)
@given(
    _cuts(
        st.builds(
            lambda pw, rest: PROCY_PREFIX + pw.encode() + rest,
            st.text(alphabet=st.characters(min_codepoint=0x21, max_codepoint=0x7E), min_size=36, max_size=36),
            # Without a terminator on the wire the stream goes on with the viewer's RFB,
            # which never starts with CR or LF.
            st.binary(max_size=20).filter(lambda b: not b.startswith((b"\n", b"\r"))),
        )
    )
)
def test_any_chunking_without_terminator_gives_the_same_result(case: tuple[bytes, list[int]]) -> None:
    data, cuts = case
    whole, _ = _feed_chunks(CommandParser(), data, [])
    chunked, unfed = _feed_chunks(CommandParser(), data, cuts)
    assert isinstance(whole, Command)
    assert isinstance(chunked, Command)
    assert chunked.password == whole.password
    assert chunked.rest + unfed == whole.rest


@settings(max_examples=200, deadline=None)
@given(_cuts(st.binary(max_size=60)), st.booleans())
def test_any_chunking_of_arbitrary_bytes_gives_the_same_verdict(case: tuple[bytes, list[int]], require: bool) -> None:
    data, cuts = case
    whole, _ = _feed_chunks(CommandParser(require_terminator=require), data, [])
    chunked, _ = _feed_chunks(CommandParser(require_terminator=require), data, cuts)
    if isinstance(whole, BadCommand):
        assert isinstance(chunked, BadCommand)
    elif whole is None:
        assert chunked is None
