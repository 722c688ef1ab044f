"""secshadow.rfbfilter: view-only enforced by the proxy (PROTOCOL.md section 7).

Unit tests for every handshake variant (RFB 3.3 / 3.7 / 3.8, None / VNC Authentication,
failures) and every client message type; hypothesis properties (the output does not
depend on how the streams are chunked; the device receives only whitelisted messages;
garbage raises nothing but RFBFilterError and never grows the buffers past the cap);
known answers from real viewers (TigerVNC 1.12 captured live, noVNC's own
``_sendEncodings`` run under node), re-checked live when the programs are installed.
"""

from __future__ import annotations

import collections
import struct
import time
import tracemalloc
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from secshadow.errors import ViewerError
from secshadow.rfbfilter import (
    MAX_BUFFERED,
    PASSED_MESSAGE_TYPES,
    STRIPPED_ENCODINGS,
    RFBFilterError,
    ViewOnlyFilter,
)
from secshadow.tests import _rfb
from secshadow.tests._rfb import STRIPPED, WHITELIST, encodings_of, s32, set_encodings, split_client_messages
from secshadow.tests.conftest import in_ci, require_program

V33, V37, V38 = b"RFB 003.003\n", b"RFB 003.007\n", b"RFB 003.008\n"
OK = struct.pack(">I", 0)
FAILED = struct.pack(">I", 1)
CHALLENGE = bytes(range(16))
RESPONSE = bytes(range(100, 116))
PIXEL_FORMAT = struct.pack(">BBBBHHHBBBxxx", 32, 24, 0, 1, 255, 255, 255, 16, 8, 0)
EXTENDED_CLIPBOARD = 0xC0A1E5CE - (1 << 32)
SETTINGS = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def u32(value: int) -> bytes:
    return struct.pack(">I", value)


def server_init(width: int = 64, height: int = 48, name: bytes = b"device") -> bytes:
    return struct.pack(">HH", width, height) + PIXEL_FORMAT + u32(len(name)) + name


def reason(text: bytes) -> bytes:
    return u32(len(text)) + text


def connected(shared: int = 0) -> ViewOnlyFilter:
    """A filter through a 3.8 / None handshake, ServerInit included."""
    f = ViewOnlyFilter()
    assert f.from_server(V38) == V38
    assert f.from_client(V38) == V38
    assert f.from_server(b"\x01\x01") == b"\x01\x01"
    assert f.from_client(b"\x01") == b"\x01"
    assert f.from_server(OK) == OK
    assert f.from_client(bytes([shared])) == b"\x01"
    assert f.from_server(server_init()) == server_init()
    return f


# ====================================================================== handshake


def test_rfb38_none_handshake_passes_and_forces_the_shared_flag() -> None:
    f = ViewOnlyFilter()
    assert f.state == "viewer protocol-version, device protocol-version"
    assert f.from_server(V38) == V38
    assert f.from_client(V38) == V38
    assert f.rfb_version == "3.8"
    assert f.from_server(b"\x02\x01\x02") == b"\x02\x01\x02"
    assert f.from_client(b"\x01") == b"\x01"
    assert f.security_type == 1
    assert f.from_server(OK) == OK  # 3.8 sends SecurityResult after None (RFC 6143 7.2.1)
    assert f.from_client(b"\x00") == b"\x01"  # asked for exclusive access: forced shared
    assert f.viewer_shared_flag == 0
    assert f.from_server(server_init()) == server_init()
    assert f.framebuffer_size == (64, 48)
    assert f.state == "viewer messages, device relay"


@pytest.mark.parametrize("version", [V37, V38])
def test_vnc_authentication_in_37_and_38(version: bytes) -> None:
    f = ViewOnlyFilter()
    f.from_server(version)
    f.from_client(version)
    assert f.from_server(b"\x01\x02") == b"\x01\x02"
    assert f.from_client(b"\x02") == b"\x02"
    assert f.from_server(CHALLENGE) == CHALLENGE
    assert f.from_client(RESPONSE) == RESPONSE
    assert f.from_server(OK) == OK
    assert f.from_client(b"\x01") == b"\x01"
    assert f.viewer_shared_flag == 1
    assert f.from_server(server_init()) == server_init()
    assert f.state == "viewer messages, device relay"


def test_rfb37_none_has_no_security_result() -> None:
    f = ViewOnlyFilter()
    f.from_server(V38)  # a 3.8 device, a viewer that asks for 3.7
    f.from_client(V37)
    assert f.rfb_version == "3.7"
    f.from_server(b"\x01\x01")
    f.from_client(b"\x01")
    assert f.state == "viewer client-init, device server-init"
    # ServerInit directly: four zero bytes here are width and height, not a SecurityResult.
    init = server_init(width=0, height=0)
    assert f.from_server(init) == init
    assert f.framebuffer_size == (0, 0)
    assert f.state == "viewer client-init, device relay"
    assert f.from_client(b"\x00") == b"\x01"


def test_rfb33_none_the_device_decides_and_sends_no_security_result() -> None:
    f = ViewOnlyFilter()
    f.from_server(V33)
    f.from_client(V33)
    assert f.state == "viewer awaiting-device-security, device security-type"
    assert f.from_server(u32(1)) == u32(1)
    assert f.security_type == 1
    assert f.from_client(b"\x00") == b"\x01"  # no choice byte in 3.3: this is ClientInit
    assert f.from_server(server_init()) == server_init()
    assert f.state == "viewer messages, device relay"


def test_rfb33_vnc_authentication() -> None:
    f = ViewOnlyFilter()
    f.from_server(V33)
    f.from_client(V33)
    assert f.from_server(u32(2) + CHALLENGE) == u32(2) + CHALLENGE  # type and challenge at once
    assert f.from_client(RESPONSE + b"\x00") == RESPONSE + b"\x01"
    assert f.from_server(OK + server_init()) == OK + server_init()
    assert f.state == "viewer messages, device relay"


@pytest.mark.parametrize(("offered", "kept"), [
    ([19, 2, 16, 1], [2, 1]),
    ([1], [1]),
    ([2, 2, 30], [2, 2]),
    ([16, 5, 6, 13, 129, 2], [2]),
])
def test_the_security_list_keeps_only_none_and_vnc_auth(offered: list[int], kept: list[int]) -> None:
    f = ViewOnlyFilter()
    f.from_server(V38)
    f.from_client(V38)
    assert f.from_server(bytes([len(offered), *offered])) == bytes([len(kept), *kept])


def test_a_device_offering_neither_none_nor_vnc_auth_is_refused() -> None:
    f = ViewOnlyFilter()
    f.from_server(V38)
    f.from_client(V38)
    with pytest.raises(RFBFilterError, match=r"only security types \[19, 16\]"):
        f.from_server(b"\x02\x13\x10")


def test_the_viewer_may_not_choose_a_type_the_filter_removed() -> None:
    f = ViewOnlyFilter()
    f.from_server(V38)
    f.from_client(V38)
    f.from_server(b"\x03\x13\x01\x02")
    with pytest.raises(RFBFilterError, match=r"chose security type 19.*offered \[1, 2\]"):
        f.from_client(b"\x13")


@pytest.mark.parametrize("chosen", [3, 16, 19, 0x01000000])
def test_rfb33_device_choosing_another_type_is_refused(chosen: int) -> None:
    f = ViewOnlyFilter()
    f.from_server(V33)
    f.from_client(V33)
    with pytest.raises(RFBFilterError, match=f"security type {chosen} "):
        f.from_server(u32(chosen))


def test_rfb33_failure_carries_a_reason_and_closes() -> None:
    f = ViewOnlyFilter()
    f.from_server(V33)
    f.from_client(V33)
    data = u32(0) + reason(b"too many connections")
    assert f.from_server(data[:6]) + f.from_server(data[6:]) == data
    assert f.state == "viewer closed, device closed"
    with pytest.raises(RFBFilterError, match="after the device refused"):
        f.from_client(b"\x01")


@pytest.mark.parametrize("version", [V37, V38])
def test_zero_security_types_carry_a_reason(version: bytes) -> None:
    f = ViewOnlyFilter()
    f.from_server(V38)
    f.from_client(version)
    data = b"\x00" + reason(b"no thanks")
    assert f.from_server(data) == data
    assert f.state == "viewer closed, device closed"
    with pytest.raises(RFBFilterError, match="after it refused"):
        f.from_server(b"x")


def test_rfb38_failed_security_result_has_a_reason() -> None:
    f = ViewOnlyFilter()
    f.from_server(V38)
    f.from_client(V38)
    f.from_server(b"\x01\x02")
    f.from_client(b"\x02")
    f.from_server(CHALLENGE)
    f.from_client(RESPONSE)
    data = FAILED + reason(b"Authentication failed")
    assert b"".join(f.from_server(data[i:i + 1]) for i in range(len(data))) == data
    assert f.state == "viewer closed, device closed"


@pytest.mark.parametrize("version", [V33, V37])
def test_older_failed_security_results_have_no_reason(version: bytes) -> None:
    f = ViewOnlyFilter()
    f.from_server(version)
    f.from_client(version)
    if version == V33:
        f.from_server(u32(2) + CHALLENGE)
    else:
        f.from_server(b"\x01\x02")
        f.from_client(b"\x02")
        f.from_server(CHALLENGE)
    f.from_client(RESPONSE)
    assert f.from_server(FAILED) == FAILED
    assert f.state == "viewer closed, device closed"
    # Had the filter expected a 3.8 reason string, these bytes would look like one.
    with pytest.raises(RFBFilterError, match="after it refused"):
        f.from_server(u32(4) + b"oops")


def test_an_empty_reason_string_ends_at_its_length() -> None:
    f = ViewOnlyFilter()
    f.from_server(V38)
    f.from_client(V38)
    assert f.from_server(b"\x00" + u32(0)) == b"\x00" + u32(0)
    assert f.state == "viewer closed, device closed"


@pytest.mark.parametrize("device", [b"RFB 003.889\n", b"RFB 004.001\n", b"RFB 005.000\n", V38])
def test_newer_device_versions_accept_a_38_viewer(device: bytes) -> None:
    f = ViewOnlyFilter()
    assert f.from_server(device) == device
    assert f.from_client(V38) == V38
    assert f.rfb_version == "3.8"


@pytest.mark.parametrize("viewer", [b"RFB 003.005\n", b"RFB 003.006\n", b"RFB 003.889\n",
                                    b"RFB 004.000\n", b"RFB 003.014\n", b"RFB 000.000\n"])
def test_unofficial_viewer_versions_are_refused(viewer: bytes) -> None:
    f = ViewOnlyFilter()
    f.from_server(b"RFB 005.000\n")
    with pytest.raises(RFBFilterError, match="view-only follows 3.3, 3.7 and 3.8"):
        f.from_client(viewer)


def test_a_viewer_asking_for_more_than_the_device_offers_is_refused() -> None:
    f = ViewOnlyFilter()
    f.from_server(V37)
    with pytest.raises(RFBFilterError, match="newer than the device's 3.7"):
        f.from_client(V38)


@pytest.mark.parametrize("device", [b"RFB 003.002\n", b"RFB 002.009\n"])
def test_devices_older_than_33_are_refused(device: bytes) -> None:
    with pytest.raises(RFBFilterError, match="older than 3.3"):
        ViewOnlyFilter().from_server(device)


@pytest.mark.parametrize(("side", "data", "at"), [
    ("server", b"HTTP/1.1 400", 0),
    ("server", b"RFB 3.8\n", 5),
    ("server", b"RFB 003.008\r", 11),
    ("client", b"GET / HTTP/1.1\r\n", 0),
])
def test_garbage_instead_of_a_version_is_refused_at_the_first_wrong_byte(side: str, data: bytes, at: int) -> None:
    f = ViewOnlyFilter()
    if side == "client":
        f.from_server(V38)
    feed = f.from_server if side == "server" else f.from_client
    for i in range(at):
        assert feed(data[i:i + 1]) == b""
    with pytest.raises(RFBFilterError, match=f"mismatch at byte {at}"):
        feed(data[at:at + 1])


def test_the_viewer_may_not_speak_before_the_device() -> None:
    with pytest.raises(RFBFilterError, match="before the device's ProtocolVersion"):
        ViewOnlyFilter().from_client(V38)


def test_a_viewer_choice_before_the_device_list_is_refused_not_guessed() -> None:
    f = ViewOnlyFilter()
    f.from_server(V38)
    with pytest.raises(RFBFilterError, match="before the device's security types"):
        f.from_client(V38 + b"\x01\x00")


def test_device_bytes_before_the_viewer_version_are_refused() -> None:
    f = ViewOnlyFilter()
    with pytest.raises(RFBFilterError, match="before the viewer's ProtocolVersion"):
        f.from_server(V38 + b"\x01\x01")


def test_device_bytes_before_the_viewer_choice_are_refused() -> None:
    f = ViewOnlyFilter()
    f.from_server(V38)
    f.from_client(V38)
    with pytest.raises(RFBFilterError, match="before the viewer chose a security type"):
        f.from_server(b"\x01\x01" + OK)


def test_every_call_after_a_refusal_raises_and_nothing_stays_buffered() -> None:
    f = connected()
    f.from_client(b"\x02\x00")  # a partial SetEncodings is held
    assert f.viewer_buffered == 2
    with pytest.raises(RFBFilterError):
        f.from_client(b"\x00\x01" + u32(0) + b"\x11")
    assert f.viewer_buffered == 0
    assert f.state == "viewer failed, device failed"
    for feed in (f.from_client, f.from_server):
        with pytest.raises(RFBFilterError, match="already refused"):
            feed(b"\x03")


def test_the_error_is_a_viewer_error() -> None:
    assert issubclass(RFBFilterError, ViewerError)
    assert RFBFilterError("x").code == "viewer"


# ====================================================================== device after ServerInit


def test_after_server_init_the_device_bytes_are_returned_as_the_same_object() -> None:
    f = connected()
    for data in (b"\x00\x00\x00\x01" + bytes(12), b"", bytes(100_000)):
        assert f.from_server(data) is data


def test_server_init_and_the_first_update_in_one_chunk() -> None:
    f = ViewOnlyFilter()
    f.from_server(V38)
    f.from_client(V38)
    f.from_server(b"\x01\x01")
    f.from_client(b"\x01")
    update = b"\x00\x00\x00\x00"
    assert f.from_server(OK + server_init(name=b"n" * 10) + update) == OK + server_init(name=b"n" * 10) + update
    assert f.state == "viewer client-init, device relay"


def test_a_long_desktop_name_streams_through_unbuffered() -> None:
    f = ViewOnlyFilter()
    f.from_server(V33)
    f.from_client(V33)
    f.from_server(u32(1))
    name = b"N" * 1_000_000
    out = f.from_server(server_init(name=b"")[:20] + u32(len(name)))
    for i in range(0, len(name), 4096):
        out += f.from_server(name[i:i + 4096])
        assert f.device_buffered == 0
    assert out == server_init(name=name)
    assert f.state.endswith("device relay")


# ====================================================================== client messages


def test_set_pixel_format_passes() -> None:
    f = connected()
    message = b"\x00\x00\x00\x00" + PIXEL_FORMAT
    assert f.from_client(message) == message
    assert f.passed["SetPixelFormat"] == 1


@pytest.mark.parametrize("incremental", [0, 1])
def test_framebuffer_update_request_passes(incremental: int) -> None:
    f = connected()
    message = struct.pack(">BBHHHH", 3, incremental, 0, 0, 1024, 768)
    assert f.from_client(message) == message


def test_enable_continuous_updates_and_fences_pass() -> None:
    f = connected()
    cu = struct.pack(">BBHHHH", 150, 1, 0, 0, 64, 48)
    fence = struct.pack(">BxxxIB", 248, 0x80000004, 64) + bytes(64)
    empty_fence = struct.pack(">BxxxIB", 248, 0, 0)
    assert f.from_client(cu + fence + empty_fence) == cu + fence + empty_fence
    assert f.passed == {"EnableContinuousUpdates": 1, "ClientFence": 2}


def test_a_fence_payload_over_64_bytes_is_refused() -> None:
    f = connected()
    with pytest.raises(RFBFilterError, match="65-byte payload"):
        f.from_client(struct.pack(">BxxxIB", 248, 0, 65))


@pytest.mark.parametrize(("name", "message"), [
    ("KeyEvent", struct.pack(">BBxxI", 4, 1, 0x61)),
    ("PointerEvent", struct.pack(">BBHH", 5, 1, 10, 10)),
    ("PointerEvent", struct.pack(">BBHH", 5, 0x80, 10, 10)),
    ("ClientCutText", struct.pack(">BxxxI", 6, 5) + b"hello"),
    ("ClientCutText", struct.pack(">BxxxI", 6, 0)),
    ("xvp", struct.pack(">BxBB", 250, 1, 3)),  # XVP_REBOOT
    ("SetDesktopSize", struct.pack(">BxHHBx", 251, 800, 600, 2) + bytes(32)),
    ("SetDesktopSize", struct.pack(">BxHHBx", 251, 800, 600, 0)),
    ("gii", struct.pack(">BBHH", 253, 0x81, 2, 1)),  # big-endian Version
    ("gii", struct.pack("<BBH", 253, 0x00, 24) + bytes(24)),  # little-endian injected event
    ("QEMUExtendedKeyEvent", struct.pack(">BBHII", 255, 0, 1, 0x61, 0x1E)),
    ("QEMUAudio", struct.pack(">BBH", 255, 1, 0)),
    ("QEMUAudio", struct.pack(">BBH", 255, 1, 1)),
    ("QEMUAudio", struct.pack(">BBHBBI", 255, 1, 2, 3, 2, 44100)),
])
def test_input_messages_are_dropped_and_the_stream_stays_in_step(name: str, message: bytes) -> None:
    f = connected()
    fbur = struct.pack(">BBHHHH", 3, 1, 0, 0, 64, 48)
    assert f.from_client(message + fbur) == fbur
    assert f.dropped == {name: 1}
    # The same, one byte at a time.
    g = connected()
    assert b"".join(g.from_client(message[i:i + 1]) for i in range(len(message))) + g.from_client(fbur) == fbur
    assert g.dropped == {name: 1}


@pytest.mark.parametrize("kind", [1, 7, 8, 9, 10, 11, 12, 13, 15, 20, 80, 127, 128, 249, 252, 254])
def test_unknown_message_types_close_the_session(kind: int) -> None:
    f = connected()
    with pytest.raises(RFBFilterError, match=f"the viewer sent RFB message type {kind}, which view-only "
                                             "does not know; closing"):
        f.from_client(bytes([kind]) + bytes(20))


def test_unknown_qemu_submessages_and_audio_operations_close() -> None:
    with pytest.raises(RFBFilterError, match="submessage type 2"):
        connected().from_client(b"\xff\x02\x00\x00")
    with pytest.raises(RFBFilterError, match="operation 3"):
        connected().from_client(b"\xff\x01\x00\x03")


def test_an_extended_clipboard_cut_text_closes() -> None:
    f = connected()
    with pytest.raises(RFBFilterError, match="Extended Clipboard"):
        f.from_client(struct.pack(">Bxxxi", 6, -8) + bytes(8))


def test_messages_before_a_refusal_were_forwarded_and_the_rest_is_not() -> None:
    f = connected()
    fbur = struct.pack(">BBHHHH", 3, 1, 0, 0, 64, 48)
    assert f.from_client(fbur) == fbur
    with pytest.raises(RFBFilterError):
        f.from_client(b"\x07" + fbur)


# ---------------------------------------------------------------------- SetEncodings


def test_set_encodings_loses_exactly_the_listed_pseudo_encodings() -> None:
    assert set(STRIPPED_ENCODINGS) == STRIPPED
    f = connected()
    sent = [16, -258, 1, -257, -259, 0, -305, -308, -309, -316, 0xC0A1E5CE, -223, -312, -313, -261, -307]
    out = f.from_client(set_encodings(sent))
    assert encodings_of(out) == [16, 1, 0, -223, -312, -313, -261, -307]
    assert f.stripped == {s32(e): 1 for e in sent if s32(e) in STRIPPED}
    assert f.passed["SetEncodings"] == 1


def test_set_encodings_without_stripped_entries_passes_unchanged() -> None:
    f = connected()
    message = set_encodings([7, 1, 16, 0, -239, -223, -224, -312, -313])
    assert f.from_client(message) == message
    assert f.from_client(set_encodings([])) == set_encodings([])
    assert not f.stripped


def test_set_encodings_of_only_stripped_entries_becomes_empty() -> None:
    assert connected().from_client(set_encodings([-258, -316])) == set_encodings([])


def test_set_encodings_up_to_the_cap_is_held_and_over_it_refused() -> None:
    largest = (MAX_BUFFERED - 4) // 4
    f = connected()
    message = set_encodings([-258] + [0] * (largest - 1))
    assert len(message) == MAX_BUFFERED
    out = b""
    for i in range(0, len(message), 1000):
        out += f.from_client(message[i:i + 1000])
        assert f.viewer_buffered <= MAX_BUFFERED
    assert encodings_of(out) == [0] * (largest - 1)
    g = connected()
    with pytest.raises(RFBFilterError, match=f"SetEncodings of {largest + 1} encodings"):
        g.from_client(struct.pack(">BxH", 2, largest + 1))  # refused from the header alone
    with pytest.raises(RFBFilterError, match="SetEncodings of 65535 encodings"):
        connected().from_client(b"\x02\x00\xff\xff")


# ---------------------------------------------------------------------- ClientCutText


def test_a_100_mb_cut_text_is_skipped_as_it_streams() -> None:
    f = connected()
    size = 100 * 1024 * 1024
    chunk = b"x" * 65536
    fbur = struct.pack(">BBHHHH", 3, 1, 0, 0, 64, 48)
    tracemalloc.start()
    try:
        started = time.perf_counter()
        assert f.from_client(struct.pack(">BxxxI", 6, size) + chunk[:100]) == b""
        sent = 100
        while sent + len(chunk) <= size:
            assert f.from_client(chunk) == b""
            sent += len(chunk)
            assert f.viewer_buffered == 0
        assert f.from_client(chunk[:size - sent] + fbur) == fbur
        elapsed = time.perf_counter() - started
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert f.dropped == {"ClientCutText": 1}
    assert peak < 256 * 1024, f"peak {peak} bytes while skipping 100 MB"
    assert elapsed < 20


# ====================================================================== hypothesis

_any_type = st.integers(0, 255)
#: The message names the filter counts, and their types.
KINDS = {"SetPixelFormat": 0, "SetEncodings": 2, "FramebufferUpdateRequest": 3, "KeyEvent": 4, "PointerEvent": 5,
         "ClientCutText": 6, "EnableContinuousUpdates": 150, "ClientFence": 248, "xvp": 250, "SetDesktopSize": 251,
         "gii": 253, "QEMUExtendedKeyEvent": 255, "QEMUAudio": 255}


@st.composite
def client_message(draw: st.DrawFn) -> tuple[bytes, bytes, str]:
    """A valid client message: ``(bytes, what the device must receive, name)``."""
    kind = draw(st.sampled_from(sorted(KINDS)))
    b = draw
    if kind == "SetPixelFormat":
        m = b"\x00" + b(st.binary(min_size=19, max_size=19))
        return m, m, kind
    if kind == "SetEncodings":
        encodings = b(st.lists(st.one_of(st.sampled_from(sorted(STRIPPED)),
                                         st.sampled_from([0, 1, 2, 5, 7, 16, 21, -223, -224, -239, -260,
                                                          -261, -307, -312, -313, -314, 0x574D5664]),
                                         st.integers(-(1 << 31), (1 << 31) - 1)), max_size=40))
        m = struct.pack(f">BBH{len(encodings)}i", 2, b(_any_type), len(encodings), *encodings)
        kept = [e for e in encodings if e not in STRIPPED]
        return m, (m if kept == encodings else set_encodings(kept)), kind
    if kind == "FramebufferUpdateRequest":
        m = b"\x03" + b(st.binary(min_size=9, max_size=9))
        return m, m, kind
    if kind == "EnableContinuousUpdates":
        m = b"\x96" + b(st.binary(min_size=9, max_size=9))
        return m, m, kind
    if kind == "ClientFence":
        payload = b(st.binary(max_size=64))
        m = b"\xf8" + b(st.binary(min_size=7, max_size=7)) + bytes([len(payload)]) + payload
        return m, m, kind
    if kind == "KeyEvent":
        return b"\x04" + b(st.binary(min_size=7, max_size=7)), b"", kind
    if kind == "PointerEvent":
        return b"\x05" + b(st.binary(min_size=5, max_size=5)), b"", kind
    if kind == "ClientCutText":
        text = b(st.binary(max_size=3000))
        return b"\x06" + b(st.binary(min_size=3, max_size=3)) + u32(len(text)) + text, b"", kind
    if kind == "xvp":
        return b"\xfa" + b(st.binary(min_size=3, max_size=3)), b"", kind
    if kind == "SetDesktopSize":
        screens = b(st.integers(0, 8))
        head = b"\xfb" + b(st.binary(min_size=5, max_size=5)) + bytes([screens]) + b(st.binary(min_size=1, max_size=1))
        return head + b(st.binary(min_size=16 * screens, max_size=16 * screens)), b"", kind
    if kind == "gii":
        sub = b(st.integers(0, 255))
        body = b(st.binary(max_size=300))
        length = struct.pack(">H" if sub & 0x80 else "<H", len(body))
        return bytes([253, sub]) + length + body, b"", kind
    if kind == "QEMUExtendedKeyEvent":
        return b"\xff\x00" + b(st.binary(min_size=10, max_size=10)), b"", kind
    operation = b(st.integers(0, 2))
    tail = b(st.binary(min_size=6, max_size=6)) if operation == 2 else b""
    return b"\xff\x01" + struct.pack(">H", operation) + tail, b"", "QEMUAudio"


DEVICE_VERSIONS = [(3, 3), (3, 5), (3, 7), (3, 8), (3, 889), (4, 1), (5, 0)]
OTHER_TYPES = [5, 6, 13, 16, 18, 19, 20, 22, 30, 113, 129, 130]


def version_bytes(major: int, minor: int) -> bytes:
    return b"RFB %03d.%03d\n" % (major, minor)


@dataclass
class Conversation:
    """A whole valid connection. ``handshake``: lock-step steps ``(side, input, expected
    output)`` up to ClientInit; then the free phase, where the two directions no longer
    depend on each other: the viewer's ClientInit and messages, the device's ServerInit
    and its messages (relayed untouched)."""

    minor: int
    security: int
    handshake: list[tuple[str, bytes, bytes]]
    client: list[tuple[bytes, bytes, str]]
    server: bytes
    names: list[str] = field(default_factory=list)


@st.composite
def conversations(draw: st.DrawFn, max_messages: int = 30) -> Conversation:
    minor = draw(st.sampled_from([3, 7, 8]))
    device = draw(st.sampled_from([v for v in DEVICE_VERSIONS if v >= (3, minor)]))
    steps = [("s", version_bytes(*device), version_bytes(*device)),
             ("c", version_bytes(3, minor), version_bytes(3, minor))]
    if minor == 3:
        security = draw(st.sampled_from([1, 2]))
        steps.append(("s", u32(security), u32(security)))
    else:
        allowed = draw(st.lists(st.sampled_from([1, 2]), min_size=1, max_size=3))
        offered = draw(st.permutations(allowed + draw(st.lists(st.sampled_from(OTHER_TYPES), max_size=4))))
        kept = [t for t in offered if t in (1, 2)]
        steps.append(("s", bytes([len(offered), *offered]), bytes([len(kept), *kept])))
        security = draw(st.sampled_from(kept))
        steps.append(("c", bytes([security]), bytes([security])))
    if security == 2:
        challenge = draw(st.binary(min_size=16, max_size=16))
        response = draw(st.binary(min_size=16, max_size=16))
        steps += [("s", challenge, challenge), ("c", response, response)]
    if security == 2 or minor == 8:
        steps.append(("s", OK, OK))
    shared = draw(st.integers(0, 255))
    messages = draw(st.lists(client_message(), max_size=max_messages))
    name = draw(st.binary(max_size=80))
    init = struct.pack(">HH", draw(st.integers(0, 65535)), draw(st.integers(0, 65535))) + \
        draw(st.binary(min_size=16, max_size=16)) + u32(len(name)) + name
    server = init + draw(st.binary(max_size=400))
    return Conversation(minor, security, steps, [(bytes([shared]), b"\x01", "ClientInit"), *messages], server)


def runs(steps: list[tuple[str, bytes, bytes]]) -> list[tuple[str, bytes]]:
    """Consecutive steps of one side joined: what one side may send in one go."""
    joined: list[tuple[str, bytes]] = []
    for side, data, _ in steps:
        if joined and joined[-1][0] == side:
            joined[-1] = (side, joined[-1][1] + data)
        else:
            joined.append((side, data))
    return joined


def cut(draw: st.DrawFn, data: bytes) -> list[bytes]:
    """``data`` split at random points (empty pieces included)."""
    points = sorted(draw(st.lists(st.integers(0, len(data)), max_size=8)))
    edges = [0, *points, len(data)]
    return [data[a:b] for a, b in zip(edges, edges[1:], strict=False)]


def run_conversation(conv: Conversation, draw: st.DrawFn | None = None) -> tuple[ViewOnlyFilter, bytes, bytes]:
    """Feed a conversation, chunked at random when ``draw`` is given; returns the filter,
    the bytes sent to the viewer and those sent to the device."""
    f = ViewOnlyFilter()
    to_viewer, to_device = bytearray(), bytearray()

    def feed(side: str, data: bytes) -> None:
        if side == "s":
            to_viewer.extend(f.from_server(data))
        else:
            to_device.extend(f.from_client(data))

    for side, data in runs(conv.handshake):
        for piece in (cut(draw, data) if draw else [data]):
            feed(side, piece)
    client = b"".join(m for m, _, _ in conv.client)
    if draw is None:
        feed("c", client)
        feed("s", conv.server)
    else:
        queues = [[("c", p) for p in cut(draw, client)], [("s", p) for p in cut(draw, conv.server)]]
        while queues[0] or queues[1]:
            pick = draw(st.integers(0, 1)) if queues[0] and queues[1] else (0 if queues[0] else 1)
            feed(*queues[pick].pop(0))
        assert f.viewer_buffered == 0 and f.device_buffered == 0
    return f, bytes(to_viewer), bytes(to_device)


def expected(conv: Conversation) -> tuple[bytes, bytes]:
    to_viewer = b"".join(out for side, _, out in conv.handshake if side == "s") + conv.server
    to_device = b"".join(out for side, _, out in conv.handshake if side == "c") + \
        b"".join(out for _, out, _ in conv.client)
    return to_viewer, to_device


@SETTINGS
@given(conversations(), st.data())
def test_property_any_chunking_gives_the_same_output(conv: Conversation, data: st.DataObject) -> None:
    _, whole_viewer, whole_device = run_conversation(conv)
    _, viewer, device = run_conversation(conv, data.draw)
    assert (viewer, device) == (whole_viewer, whole_device)
    assert (viewer, device) == expected(conv)


@SETTINGS
@given(conversations(max_messages=60), st.data())
def test_property_the_device_receives_only_whitelisted_messages(conv: Conversation, data: st.DataObject) -> None:
    f, _, device = run_conversation(conv, data.draw)
    client_init, messages = _rfb.split_device_bound(device, conv.minor, conv.security)
    assert client_init == b"\x01"
    for kind, message in messages:
        assert kind in WHITELIST
        if kind == 2:
            assert not STRIPPED & set(encodings_of(message))
    # Every message was counted under its name, as passed or as dropped.
    sent = collections.Counter(name for _, _, name in conv.client[1:])
    assert f.passed + f.dropped == sent
    assert sum(f.passed.values()) == len(messages)
    assert all(KINDS[name] in PASSED_MESSAGE_TYPES for name in f.passed)
    assert not any(KINDS[name] in PASSED_MESSAGE_TYPES for name in f.dropped)



def test_one_conversation_with_every_message_type() -> None:
    messages = [
        b"\x00\x00\x00\x00" + PIXEL_FORMAT,
        set_encodings([7, -258, 0xC0A1E5CE, -316, 0]),
        struct.pack(">BBHHHH", 3, 0, 0, 0, 64, 48),
        struct.pack(">BBxxI", 4, 1, 0xFF0D),
        struct.pack(">BBHH", 5, 1, 5, 5),
        struct.pack(">BxxxI", 6, 3) + b"abc",
        struct.pack(">BBHHHH", 150, 1, 0, 0, 64, 48),
        struct.pack(">BxxxIB", 248, 0x80000000, 2) + b"hi",
        struct.pack(">BxBB", 250, 1, 2),
        struct.pack(">BxHHBx", 251, 640, 480, 1) + bytes(16),
        struct.pack(">BBHH", 253, 0x81, 2, 1),
        struct.pack(">BBHII", 255, 0, 1, 0x61, 0x1E),
        struct.pack(">BBH", 255, 1, 0),
    ]
    f = connected()
    device = b"".join(f.from_client(m) for m in messages)
    assert [k for k, _ in split_client_messages(device)] == [0, 2, 3, 150, 248]
    assert encodings_of(split_client_messages(device)[1][1]) == [7, 0]
    assert f.dropped == {"KeyEvent": 1, "PointerEvent": 1, "ClientCutText": 1, "xvp": 1, "SetDesktopSize": 1,
                         "gii": 1, "QEMUExtendedKeyEvent": 1, "QEMUAudio": 1}


_fragments = st.one_of(
    st.binary(max_size=64),
    client_message().map(lambda m: m[0]),
    _any_type.map(lambda t: bytes([t])),
    st.sampled_from([b"\x02\x00\xff\xff", b"\x06\x00\x00\x00\xff\xff\xff\xff", b"\xf8\x00\x00\x00\x00\x00\x00\x00\xff",
                     b"\xfd\x80\xff\xff", b"\xfb\x00\x00\x00\x00\x00\xff\x00"]),
)


@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(["fresh", "after-handshake"]),
       st.lists(st.tuples(st.sampled_from("cs"), st.lists(_fragments, max_size=6).map(b"".join)), max_size=20))
def test_property_garbage_raises_only_rfbfiltererror_within_the_cap(start: str,
                                                                    steps: list[tuple[str, bytes]]) -> None:
    f = connected() if start == "after-handshake" else ViewOnlyFilter()
    to_device = b""
    for side, data in steps:
        try:
            out = f.from_client(data) if side == "c" else f.from_server(data)
        except RFBFilterError as e:
            assert str(e)
            continue
        finally:
            assert f.viewer_buffered <= MAX_BUFFERED
            assert f.device_buffered <= 256
        if side == "c":
            to_device += out
    if start == "after-handshake":
        # Whatever the viewer sent, the device got whole whitelisted messages only.
        for kind, message in split_client_messages(to_device):
            assert kind in WHITELIST
            if kind == 2:
                assert not STRIPPED & set(encodings_of(message))


# ====================================================================== known answers


def test_known_answer_tigervnc_112() -> None:
    items = _rfb.read_hex(_rfb.TIGERVNC_FIXTURE)
    assert _rfb.notes(_rfb.TIGERVNC_FIXTURE)["viewer"] == "TigerVNC Viewer 64-bit v1.12.0"
    client = b"".join(data for data, _ in items)
    f = ViewOnlyFilter()
    f.from_server(V38)
    device = f.from_client(client[:12])
    f.from_server(b"\x01\x01")
    device += f.from_client(client[12:13])
    f.from_server(OK)
    device += f.from_client(client[13:])
    assert f.viewer_shared_flag == 0  # TigerVNC asks for exclusive access by default (-Shared=0)
    client_init, messages = _rfb.split_device_bound(device, 8, 1)
    assert client_init == b"\x01"
    sent = encodings_of(next(d for d, label in items if label.startswith("SetEncodings")))
    assert len(sent) == 22
    # TigerVNC 1.12 offers three of the stripped pseudo-encodings.
    assert sorted(STRIPPED & set(sent)) == sorted([-308, -258, EXTENDED_CLIPBOARD])
    forwarded = encodings_of(messages[1][1])
    assert forwarded == [e for e in sent if e not in (-308, -258, EXTENDED_CLIPBOARD)]
    assert [k for k, _ in messages] == [0, 2, 3, 3, 248]
    assert f.dropped == {"PointerEvent": 3, "KeyEvent": 2}
    assert f.stripped == {-308: 1, -258: 1, EXTENDED_CLIPBOARD: 1}


def test_known_answer_novnc() -> None:
    assert _rfb.notes(_rfb.NOVNC_FIXTURE)["novnc"] == "1.7.0"
    variants = dict((label.split(":")[0], data) for data, label in _rfb.read_hex(_rfb.NOVNC_FIXTURE))
    assert set(variants) == {"without-h264", "with-h264"}
    for label, message in variants.items():
        sent = encodings_of(message)
        assert len(sent) == (25 if label == "with-h264" else 24)
        f = connected()
        out = encodings_of(f.from_client(message))
        # noVNC 1.7.0 offers five stripped ones: QEMU keys, ExtendedDesktopSize, xvp,
        # Extended Clipboard and ExtendedMouseButtons; QEMU LED state (-261) stays.
        assert f.stripped == {-258: 1, -308: 1, -309: 1, EXTENDED_CLIPBOARD: 1, -316: 1}
        assert out == [e for e in sent if e not in (-258, -308, -309, EXTENDED_CLIPBOARD, -316)]
        assert {-261, -312, -313, -223, -224, -307, -239} <= set(out)


@pytest.mark.integration
def test_a_live_tigervnc_viewer_matches_the_fixture_and_is_filtered(tmp_path: Path) -> None:
    for program in ("vncviewer", "Xvfb", "xdotool"):
        require_program(program)
    live = _rfb.capture_tigervnc(tmp_path)
    items = _rfb.label_client_stream(live)
    labels = [label for _, label in items]
    fixture = _rfb.read_hex(_rfb.TIGERVNC_FIXTURE)
    fence = labels.index("ClientFence")
    if _rfb.tigervnc_version() == _rfb.notes(_rfb.TIGERVNC_FIXTURE)["viewer"]:
        # Everything up to the fence is deterministic; the input events after it depend on xdotool.
        assert items[:fence + 1] == fixture[:fence + 1]
    assert "PointerEvent" in labels[fence:] and "KeyEvent" in labels[fence:]
    f = ViewOnlyFilter()
    f.from_server(V38)
    device = f.from_client(live[:12])
    f.from_server(b"\x01\x01")
    device += f.from_client(live[12:13])
    f.from_server(OK)
    device += f.from_client(live[13:])
    _, messages = _rfb.split_device_bound(device, 8, 1)
    assert {k for k, _ in messages} <= WHITELIST
    assert f.dropped["PointerEvent"] >= 1 and f.dropped["KeyEvent"] >= 2


@pytest.mark.integration
def test_the_installed_novnc_sends_what_the_fixture_holds(tmp_path: Path) -> None:
    from secshadow.errors import UsageError
    from secshadow.web.assets import find_novnc

    require_program("node")
    try:
        assets = find_novnc()
    except UsageError as e:
        if in_ci():
            pytest.fail(str(e))
        pytest.skip(str(e))
    fixture = {label.split(":")[0]: data for data, label in _rfb.read_hex(_rfb.NOVNC_FIXTURE)}
    for label, h264 in (("without-h264", False), ("with-h264", True)):
        live = _rfb.novnc_set_encodings(assets.root, tmp_path, h264)
        if assets.version == _rfb.notes(_rfb.NOVNC_FIXTURE)["novnc"]:
            assert live == fixture[label]
        out = connected().from_client(live)
        assert not STRIPPED & set(encodings_of(out))
        assert encodings_of(out) == [e for e in encodings_of(live) if e not in STRIPPED]
