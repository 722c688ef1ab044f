"""SessionOptions: one validator for the CLI, control mode and the API; --version;
a viewer's output logged line by line."""

from __future__ import annotations

import io
import math

import pytest
from twisted.internet.defer import ensureDeferred
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import LogEvent, formatEvent, globalLogPublisher

from secshadow import __version__, cli
from secshadow.errors import UsageError
from secshadow.options import SessionOptions
from secshadow.pinning import TLSProfile
from secshadow.viewers import _LineLogger


@pytest.mark.parametrize("values, message", [
    ({"viewer_timeout": -1}, "--viewer-timeout must be a positive number of seconds"),
    ({"hello_timeout": "nan"}, "--hello-timeout must be a positive number of seconds"),
    ({"connect_timeout": math.inf}, "--connect-timeout must be a positive number of seconds"),
    ({"connect_timeout": 0}, "--connect-timeout must be a positive number of seconds"),
    ({"idle_timeout": -0.5}, "--idle-timeout must be zero or a positive number of seconds"),
    ({"max_viewers": 1e999}, "--max-viewers must be a whole number from 1 to 1000"),
    ({"max_viewers": 1001}, "--max-viewers must be a whole number from 1 to 1000"),
    ({"max_viewers": True}, "--max-viewers must be a whole number"),
    ({"device_port": 70000}, "--device-port must be a whole number from 1 to 65535"),
    ({"tls_profile": "ancient"}, "unknown TLS profile"),
    ({"procy_terminator": "nul"}, "unknown PROCYCMD terminator"),
    ({"view_only": "yes"}, "'view_only' must be true or false"),
    ({"listen": "tcp6:0"}, "IPv6 listeners are not supported"),
    ({"colour": "blue"}, "unknown session option(s): colour"),
])
def test_the_api_and_control_mode_refuse_what_the_cli_refuses(values: dict[str, object], message: str) -> None:
    with pytest.raises(UsageError) as raised:
        SessionOptions.from_mapping(values)
    assert message in raised.value.message


@pytest.mark.parametrize("field, value", [("viewer_timeout", -1.0), ("hello_timeout", math.nan),
                                          ("max_viewers", 0), ("idle_timeout", math.inf)])
def test_direct_construction_checks_itself_too(field: str, value: object) -> None:
    with pytest.raises(UsageError):
        SessionOptions(**{field: value})  # type: ignore[arg-type]


def test_loose_values_become_typed_options() -> None:
    options = SessionOptions.from_mapping({"hello_timeout": "2.5", "max_viewers": 3.0, "tls_profile": "legacy",
                                           "procy_terminator": "crlf", "listen": "unix:/tmp/x.sock"},
                                          base=SessionOptions(view_only=True))
    assert (options.hello_timeout, options.max_viewers, options.tls_profile) == (2.5, 3, TLSProfile.LEGACY)
    assert options.terminator == b"\r\n" and options.view_only is True
    assert options.listen == "unix:/tmp/x.sock:mode=600"  # owner-only unless asked otherwise


def test_version_prints_and_exits_0() -> None:
    out, err = io.StringIO(), io.StringIO()
    code = ensureDeferred(cli.run(MemoryReactorClock(), ["--version"], io.BytesIO(), out, err,
                                  install_signals=False, start_logging=False))
    assert code.result == 0  # type: ignore[attr-defined]
    assert out.getvalue().strip() == f"secshadow-proxy {__version__}"


def test_a_viewers_output_is_logged_line_by_line_whatever_the_reads() -> None:
    lines: list[str] = []

    def observer(event: LogEvent) -> None:
        if event.get("viewer") == "tigervnc":
            lines.append(formatEvent(event))

    globalLogPublisher.addObserver(observer)
    try:
        logger = _LineLogger("tigervnc")
        for chunk in (b"DecodeManager:", b" Detected", b" 2", b" CPU core(s)\nsecond li", b"ne\r\n", b"tail"):
            logger.feed(chunk)
        logger.flush()
    finally:
        globalLogPublisher.removeObserver(observer)
    assert lines == ["[tigervnc] DecodeManager: Detected 2 CPU core(s)", "[tigervnc] second line", "[tigervnc] tail"]
