"""View-only enforced by the proxy: a sans-IO filter of one RFB connection.

:class:`ViewOnlyFilter` sits between a viewer and the device's VNC server
(``docs/protocol.md`` section 7, PROTOCOL.md section 7). It is fed the bytes of both
directions as they arrive and returns the bytes to forward; it opens no socket, starts
no timer, and keeps at most :data:`MAX_BUFFERED` bytes per direction.

Device to viewer (:meth:`ViewOnlyFilter.from_server`), from the device's first byte:
the handshake of RFC 6143 section 7.1 is parsed, and only the security-type list is
rewritten: it keeps None (1) and VNC Authentication (2), because every other type
encrypts the stream or adds messages the filter could not follow (section 7.1.2). After
ServerInit (section 7.3.2) the bytes are returned unchanged, as the very object passed in.

Viewer to device (:meth:`ViewOnlyFilter.from_client`): the viewer's ProtocolVersion,
its security choice (checked against the filtered list), the VNC Authentication response
(section 7.2.2) and ClientInit (section 7.3.1, shared flag forced to 1 so a watching
viewer never disconnects the others); then message by message (section 7.5 and the
community RFB specification, github.com/rfbproto/rfbproto, for the extensions):

======  ========================  ==================================================
type    message                   view-only
======  ========================  ==================================================
0       SetPixelFormat            passed
2       SetEncodings              rewritten without :data:`STRIPPED_ENCODINGS`
3       FramebufferUpdateRequest  passed
4       KeyEvent                  dropped
5       PointerEvent              dropped
6       ClientCutText             dropped, its text skipped as it streams
150     EnableContinuousUpdates   passed
248     ClientFence               passed (payload at most 64 bytes)
250     xvp                       dropped
251     SetDesktopSize            dropped
253     gii                       dropped
255     QEMU (key event, audio)   dropped
other                             :class:`RFBFilterError`: the session closes
======  ========================  ==================================================

The device therefore only ever receives whole messages of the passed types, whatever
the viewer sends: the output is re-assembled from parsed messages, never copied from
an unparsed position. Anything the filter cannot parse or refuses raises
:class:`RFBFilterError`; the caller closes both connections.

Protocol versions (RFC 6143 section 7.1.1 and Appendix A): the viewer may answer 3.3,
3.7 or 3.8, never more than the device offered. 3.3: the device picks the security type
(one U32; 0 is a failure followed by a reason string). 3.7 and 3.8: a list and a
one-byte choice. SecurityResult follows VNC Authentication in every version but None
only in 3.8, and only 3.8 adds a reason string to a failed SecurityResult.

The handshake is lock-step: each side speaks only after the other's previous message.
Bytes that arrive before the filter can know how to read them (a viewer that sends its
security choice before the device's list) are refused, never guessed at.

Inside, :class:`ViewOnlyFilter` is the public face of two parts: ``_Handshake`` (both
sides up to ServerInit) and ``_ClientMessages`` (the viewer's messages after ClientInit).
"""

from __future__ import annotations

import collections
import enum
import struct
from dataclasses import dataclass

from secshadow.errors import ViewerError

#: Most bytes held per direction for a partial message (a SetEncodings of up to
#: 16 383 encodings fits; a longer one is refused). Dropped messages' bodies
#: (ClientCutText text, gii events, SetDesktopSize screens) are skipped, never held.
MAX_BUFFERED = 64 * 1024

#: Length of a ProtocolVersion message, RFC 6143 section 7.1.1.
VERSION_LENGTH = 12
_VERSION_SHAPE = b"RFB ddd.ddd\n"

SECURITY_NONE = 1
SECURITY_VNC_AUTH = 2
#: Security types kept in the device's list (RFC 6143 sections 7.2.1 and 7.2.2).
ALLOWED_SECURITY_TYPES = frozenset({SECURITY_NONE, SECURITY_VNC_AUTH})

#: Viewer versions the filter follows, as minor numbers of major version 3.
VIEWER_VERSIONS = (3, 7, 8)

#: Client message types that reach the device (SetEncodings rewritten).
PASSED_MESSAGE_TYPES = frozenset({0, 2, 3, 150, 248})

#: Pseudo-encodings removed from SetEncodings, as the signed 32-bit numbers on the
#: wire: they unlock input messages or change message lengths (rfbproto, "Pseudo-encodings").
STRIPPED_ENCODINGS: dict[int, str] = {
    -257: "QEMU Pointer Motion Change",
    -258: "QEMU Extended Key Event",
    -259: "QEMU Audio",
    -305: "gii",
    -308: "ExtendedDesktopSize",
    -309: "xvp",
    -316: "ExtendedMouseButtons",
    0xC0A1E5CE - (1 << 32): "Extended Clipboard",  # 0xC0A1E5CE
}

#: Longest ClientFence payload (rfbproto, "ClientFence").
MAX_FENCE_PAYLOAD = 64


class RFBFilterError(ViewerError):
    """The view-only filter cannot parse the stream or refuses what it carries.

    The message says what was seen, e.g. "the viewer sent RFB message type 17, which
    view-only does not know; closing". It never quotes stream contents beyond numbers.
    """


class ViewerState(enum.Enum):
    """Where the viewer's stream is (``from_client``)."""

    VERSION = "protocol-version"
    AWAIT_SECURITY = "awaiting-device-security"
    SECURITY_CHOICE = "security-choice"
    VNC_RESPONSE = "vnc-auth-response"
    CLIENT_INIT = "client-init"
    MESSAGES = "messages"
    CLOSED = "closed"  # the device refused the connection: nothing more may come
    FAILED = "failed"  # the filter refused the stream


class DeviceState(enum.Enum):
    """Where the device's stream is (``from_server``)."""

    VERSION = "protocol-version"
    AWAIT_VIEWER_VERSION = "awaiting-viewer-version"
    SECURITY_TYPES = "security-types"  # 3.7/3.8: count, then the list
    SECURITY_TYPE = "security-type"  # 3.3: one U32
    AWAIT_CHOICE = "awaiting-viewer-choice"
    VNC_CHALLENGE = "vnc-auth-challenge"
    SECURITY_RESULT = "security-result"
    REASON_LENGTH = "failure-reason-length"
    REASON = "failure-reason"
    SERVER_INIT = "server-init"
    SERVER_NAME = "server-name"
    RELAY = "relay"
    CLOSED = "closed"
    FAILED = "failed"


class _Action(enum.Enum):
    FORWARD = "forward"
    REWRITE = "rewrite"
    DROP = "drop"


@dataclass(frozen=True)
class _Frame:
    """One client message: ``length`` bytes are read whole (at most MAX_BUFFERED);
    a dropped message's further ``skip`` bytes are discarded as they arrive."""

    name: str
    length: int
    action: _Action
    skip: int = 0


_FIXED: dict[int, _Frame] = {
    0: _Frame("SetPixelFormat", 20, _Action.FORWARD),
    3: _Frame("FramebufferUpdateRequest", 10, _Action.FORWARD),
    4: _Frame("KeyEvent", 8, _Action.DROP),
    5: _Frame("PointerEvent", 6, _Action.DROP),
    150: _Frame("EnableContinuousUpdates", 10, _Action.FORWARD),
    250: _Frame("xvp", 4, _Action.DROP),
}


#: Lengths of the viewer's handshake messages (RFC 6143 7.1.1, 7.1.2, 7.2.2, 7.3.1).
_VIEWER_ITEM_LENGTH = {
    ViewerState.VERSION: VERSION_LENGTH,
    ViewerState.SECURITY_CHOICE: 1,
    ViewerState.VNC_RESPONSE: 16,
    ViewerState.CLIENT_INIT: 1,
}


def _u16(buf: bytes | bytearray | memoryview, at: int) -> int:
    return int((buf[at] << 8) | buf[at + 1])


def _u32(buf: bytes | bytearray | memoryview, at: int) -> int:
    return int((buf[at] << 24) | (buf[at + 1] << 16) | (buf[at + 2] << 8) | buf[at + 3])


def _client_frame(buf: bytes | bytearray | memoryview) -> _Frame | int:
    """The frame of the client message starting at ``buf[0]``, or the number of bytes
    needed before it can be known (always more than ``len(buf)``, never more than the
    message). Raises :class:`RFBFilterError` for what view-only refuses."""
    kind = buf[0]
    fixed = _FIXED.get(kind)
    if fixed is not None:
        return fixed
    have = len(buf)
    if kind == 2:  # SetEncodings: U8 type, pad, U16 count, count x S32 (RFC 6143 7.5.2)
        if have < 4:
            return 4
        length = 4 + 4 * _u16(buf, 2)
        if length > MAX_BUFFERED:
            raise RFBFilterError(
                f"the viewer sent a SetEncodings of {_u16(buf, 2)} encodings ({length} bytes), more than "
                f"view-only holds ({MAX_BUFFERED} bytes); closing")
        return _Frame("SetEncodings", length, _Action.REWRITE)
    if kind == 6:  # ClientCutText: U8 type, 3 pad, U32 length, text (RFC 6143 7.5.6)
        if have < 8:
            return 8
        length = _u32(buf, 4)
        if length & 0x80000000:
            raise RFBFilterError(
                "the viewer sent an Extended Clipboard message (negative ClientCutText length), "
                "although view-only removed that extension; closing")
        return _Frame("ClientCutText", 8, _Action.DROP, skip=length)
    if kind == 248:  # ClientFence: U8 type, 3 pad, U32 flags, U8 length, payload
        if have < 9:
            return 9
        if buf[8] > MAX_FENCE_PAYLOAD:
            raise RFBFilterError(
                f"the viewer sent a ClientFence with a {buf[8]}-byte payload (at most "
                f"{MAX_FENCE_PAYLOAD} allowed); closing")
        return _Frame("ClientFence", 9 + buf[8], _Action.FORWARD)
    if kind == 251:  # SetDesktopSize: U8, pad, U16 w, U16 h, U8 screens, pad, screens x 16
        if have < 8:
            return 8
        return _Frame("SetDesktopSize", 8, _Action.DROP, skip=16 * buf[6])
    if kind == 253:  # gii: U8, U8 endian-and-sub-type, EU16 length, length bytes
        if have < 4:
            return 4
        big_endian = bool(buf[1] & 0x80)
        length = (buf[2] << 8 | buf[3]) if big_endian else (buf[3] << 8 | buf[2])
        return _Frame("gii", 4, _Action.DROP, skip=length)
    if kind == 255:  # QEMU: U8, U8 submessage-type, ...
        if have < 2:
            return 2
        if buf[1] == 0:  # Extended Key Event: U16 down, U32 keysym, U32 keycode
            return _Frame("QEMUExtendedKeyEvent", 12, _Action.DROP)
        if buf[1] == 1:  # Audio: U16 operation; 2 = set format (U8, U8, U32)
            if have < 4:
                return 4
            operation = _u16(buf, 2)
            if operation in (0, 1):
                return _Frame("QEMUAudio", 4, _Action.DROP)
            if operation == 2:
                return _Frame("QEMUAudio", 10, _Action.DROP)
            raise RFBFilterError(
                f"the viewer sent a QEMU audio message with operation {operation}, which view-only "
                "does not know; closing")
        raise RFBFilterError(
            f"the viewer sent a QEMU message of submessage type {buf[1]}, which view-only does not "
            "know; closing")
    raise RFBFilterError(f"the viewer sent RFB message type {kind}, which view-only does not know; closing")


def _check_version_prefix(buf: bytes | bytearray, who: str) -> None:
    for i, byte in enumerate(buf[:VERSION_LENGTH]):
        expected = _VERSION_SHAPE[i]
        ok = (0x30 <= byte <= 0x39) if expected == ord("d") else byte == expected
        if not ok:
            raise RFBFilterError(
                f"the {who} sent something other than an RFB ProtocolVersion (mismatch at byte {i}); closing")


def _version(item: bytes) -> tuple[int, int]:
    return int(item[4:7]), int(item[8:11])


def strip_encodings(message: bytes | bytearray | memoryview) -> tuple[bytes, list[int]]:
    """A whole SetEncodings message without :data:`STRIPPED_ENCODINGS`, and the stripped
    numbers in order. The message is returned unchanged (as bytes) when nothing is stripped."""
    count = _u16(message, 2)
    encodings = struct.unpack_from(f">{count}i", message, 4)
    kept = [e for e in encodings if e not in STRIPPED_ENCODINGS]
    stripped = [e for e in encodings if e in STRIPPED_ENCODINGS]
    if not stripped:
        return bytes(message), []
    return struct.pack(f">BxH{len(kept)}i", 2, len(kept), *kept), stripped


class _Handshake:
    """Both directions of the handshake, up to ServerInit (RFC 6143 sections 7.1 to 7.3).

    The two sides speak in lock step, so one object holds both states: each side's
    message decides how the other's next one is read. :meth:`device_bytes` and
    :meth:`viewer_bytes` raise :class:`RFBFilterError`; the caller (:class:`ViewOnlyFilter`)
    then calls :meth:`fail`.
    """

    def __init__(self) -> None:
        self.viewer = ViewerState.VERSION
        self.device = DeviceState.VERSION
        self.viewer_shared_flag: int | None = None
        self.framebuffer_size: tuple[int, int] | None = None
        self.minor: int | None = None  # the protocol in use: 3.<minor>
        self.security: int | None = None
        self._device_version: tuple[int, int] | None = None
        self._offered: tuple[int, ...] = ()
        self.vbuf = bytearray()  # a partial viewer handshake message
        self.dbuf = bytearray()  # a partial device handshake message
        self._dleft = 0  # device bytes still to pass in REASON / SERVER_NAME

    def fail(self) -> None:
        self.viewer = ViewerState.FAILED
        self.device = DeviceState.FAILED
        self.vbuf.clear()
        self.dbuf.clear()
        self._dleft = 0

    # ------------------------------------------------------------------ device
    def device_bytes(self, data: bytes) -> bytes:
        """The device's bytes in, the bytes for the viewer out; after ServerInit the
        rest of ``data`` is copied unchanged."""
        out = bytearray()
        pos, end = 0, len(data)
        while pos < end:
            state = self.device
            if state is DeviceState.RELAY:
                out += data[pos:]
                break
            if state is DeviceState.REASON or state is DeviceState.SERVER_NAME:
                take = min(self._dleft, end - pos)
                out += data[pos:pos + take]
                pos += take
                self._dleft -= take
                if self._dleft == 0:
                    self._device_streamed(state)
                continue
            if state is DeviceState.AWAIT_VIEWER_VERSION:
                raise RFBFilterError(
                    f"the device sent {end - pos} byte(s) before the viewer's ProtocolVersion; closing")
            if state is DeviceState.AWAIT_CHOICE:
                raise RFBFilterError(
                    f"the device sent {end - pos} byte(s) before the viewer chose a security type; closing")
            if state is DeviceState.CLOSED:
                raise RFBFilterError(
                    f"the device sent {end - pos} byte(s) after it refused the connection; closing")
            need = self._device_need()
            take = min(need - len(self.dbuf), end - pos)
            self.dbuf += data[pos:pos + take]
            pos += take
            if state is DeviceState.VERSION:
                _check_version_prefix(self.dbuf, "device")
            if len(self.dbuf) < self._device_need():
                continue
            item = bytes(self.dbuf)
            self.dbuf.clear()
            out += self._device_item(state, item)
        return bytes(out)

    def _device_need(self) -> int:
        state = self.device
        if state is DeviceState.VERSION:
            return VERSION_LENGTH
        if state is DeviceState.SECURITY_TYPES:
            return 1 + self.dbuf[0] if self.dbuf else 1
        if state is DeviceState.VNC_CHALLENGE:
            return 16
        if state is DeviceState.SERVER_INIT:
            return 24
        return 4  # SECURITY_TYPE, SECURITY_RESULT, REASON_LENGTH: one U32

    def _device_item(self, state: DeviceState, item: bytes) -> bytes:
        if state is DeviceState.VERSION:
            major, minor = _version(item)
            if (major, minor) < (3, 3):
                raise RFBFilterError(f"the device offers RFB {major}.{minor}, older than 3.3; closing")
            self._device_version = (major, minor)
            self.device = DeviceState.AWAIT_VIEWER_VERSION
            return item
        if state is DeviceState.SECURITY_TYPES:
            if item[0] == 0:  # the device refuses: a reason string follows
                self.device = DeviceState.REASON_LENGTH
                self._viewer_closed()
                return item
            offered = list(item[1:])
            kept = tuple(t for t in offered if t in ALLOWED_SECURITY_TYPES)
            if not kept:
                raise RFBFilterError(
                    f"the device offers only security types {offered}; view-only can follow None (1) "
                    "and VNC Authentication (2) only; closing")
            self._offered = kept
            self.device = DeviceState.AWAIT_CHOICE
            self.viewer = ViewerState.SECURITY_CHOICE
            return bytes([len(kept), *kept])
        if state is DeviceState.SECURITY_TYPE:  # RFB 3.3: the device decides
            chosen = _u32(item, 0)
            if chosen == 0:
                self.device = DeviceState.REASON_LENGTH
                self._viewer_closed()
            elif chosen in ALLOWED_SECURITY_TYPES:
                self.security = chosen
                if chosen == SECURITY_NONE:
                    self.device, self.viewer = DeviceState.SERVER_INIT, ViewerState.CLIENT_INIT
                else:
                    self.device, self.viewer = DeviceState.VNC_CHALLENGE, ViewerState.VNC_RESPONSE
            else:
                raise RFBFilterError(
                    f"the device chose security type {chosen} (RFB 3.3); view-only can follow None (1) "
                    "and VNC Authentication (2) only; closing")
            return item
        if state is DeviceState.VNC_CHALLENGE:
            self.device = DeviceState.SECURITY_RESULT
            return item
        if state is DeviceState.SECURITY_RESULT:
            if _u32(item, 0) == 0:
                self.device = DeviceState.SERVER_INIT
            else:
                # 3.8 adds a reason string (RFC 6143 7.1.3); 3.3 and 3.7 just close.
                self.device = DeviceState.REASON_LENGTH if self.minor == 8 else DeviceState.CLOSED
                self._viewer_closed()
            return item
        if state is DeviceState.REASON_LENGTH:
            self._dleft = _u32(item, 0)
            self.device = DeviceState.REASON if self._dleft else DeviceState.CLOSED
            return item
        if state is DeviceState.SERVER_INIT:
            self.framebuffer_size = (_u16(item, 0), _u16(item, 2))
            self._dleft = _u32(item, 20)
            self.device = DeviceState.SERVER_NAME if self._dleft else DeviceState.RELAY
            return item
        raise AssertionError(f"no device item in state {state}")  # pragma: no cover

    def _device_streamed(self, state: DeviceState) -> None:
        self.device = DeviceState.CLOSED if state is DeviceState.REASON else DeviceState.RELAY

    def _viewer_closed(self) -> None:
        if self.viewer is not ViewerState.FAILED:
            self.viewer = ViewerState.CLOSED

    # ------------------------------------------------------------------ viewer
    def viewer_bytes(self, view: memoryview, out: bytearray) -> int:
        """Parse the viewer's handshake messages from ``view``, appending what the device
        gets to ``out``; returns the position where the viewer's messages start (after
        ClientInit), or ``len(view)``."""
        pos, end = 0, len(view)
        while pos < end:
            state = self.viewer
            if state is ViewerState.MESSAGES:
                break
            if state is ViewerState.VERSION and self._device_version is None:
                raise RFBFilterError(
                    f"the viewer sent {end - pos} byte(s) before the device's ProtocolVersion; closing")
            if state is ViewerState.AWAIT_SECURITY:
                raise RFBFilterError(
                    f"the viewer sent {end - pos} byte(s) before the device's security types; closing")
            if state is ViewerState.CLOSED:
                raise RFBFilterError(
                    f"the viewer sent {end - pos} byte(s) after the device refused the connection; closing")
            need = _VIEWER_ITEM_LENGTH[state]
            take = min(need - len(self.vbuf), end - pos)
            self.vbuf += view[pos:pos + take]
            pos += take
            if state is ViewerState.VERSION:
                _check_version_prefix(self.vbuf, "viewer")
            if len(self.vbuf) < need:
                break
            item = bytes(self.vbuf)
            self.vbuf.clear()
            out += self._viewer_item(state, item)
        return pos

    def _viewer_item(self, state: ViewerState, item: bytes) -> bytes:
        if state is ViewerState.VERSION:
            major, minor = _version(item)
            assert self._device_version is not None
            if major != 3 or minor not in VIEWER_VERSIONS:
                raise RFBFilterError(
                    f"the viewer asked for RFB {major}.{minor}; view-only follows 3.3, 3.7 and 3.8; closing")
            if (major, minor) > self._device_version:
                device = "{}.{}".format(*self._device_version)
                raise RFBFilterError(
                    f"the viewer asked for RFB 3.{minor}, newer than the device's {device}; closing")
            self.minor = minor
            self.viewer = ViewerState.AWAIT_SECURITY
            self.device = DeviceState.SECURITY_TYPE if minor == 3 else DeviceState.SECURITY_TYPES
            return item
        if state is ViewerState.SECURITY_CHOICE:
            chosen = item[0]
            if chosen not in self._offered:
                raise RFBFilterError(
                    f"the viewer chose security type {chosen}, which view-only did not offer "
                    f"(offered {list(self._offered)}); closing")
            self.security = chosen
            if chosen == SECURITY_VNC_AUTH:
                self.viewer, self.device = ViewerState.VNC_RESPONSE, DeviceState.VNC_CHALLENGE
            else:  # None: a SecurityResult in 3.8 only (RFC 6143 7.2.1)
                self.viewer = ViewerState.CLIENT_INIT
                self.device = DeviceState.SECURITY_RESULT if self.minor == 8 else DeviceState.SERVER_INIT
            return item
        if state is ViewerState.VNC_RESPONSE:
            self.viewer = ViewerState.CLIENT_INIT
            return item
        if state is ViewerState.CLIENT_INIT:
            self.viewer_shared_flag = item[0]
            self.viewer = ViewerState.MESSAGES
            return b"\x01"
        raise AssertionError(f"no viewer item in state {state}")  # pragma: no cover


class _ClientMessages:
    """The viewer's messages after ClientInit (RFC 6143 section 7.5): whole messages of
    the passed types are appended to the output (SetEncodings rewritten), dropped ones
    are counted and their bodies skipped as they stream. A partial message is held in
    :attr:`buffer` (never more than :data:`MAX_BUFFERED` bytes)."""

    def __init__(self) -> None:
        self.dropped: collections.Counter[str] = collections.Counter()
        self.passed: collections.Counter[str] = collections.Counter()
        self.stripped: collections.Counter[int] = collections.Counter()
        self.buffer = bytearray()
        self.skip = 0  # viewer bytes still to drop (a dropped message's body)

    def reset(self) -> None:
        self.buffer.clear()
        self.skip = 0

    def feed(self, view: memoryview, pos: int, out: bytearray) -> None:
        """Parse ``view[pos:]`` to its end, appending what the device gets to ``out``."""
        end = len(view)
        while True:
            if self.skip:
                take = min(self.skip, end - pos)
                pos += take
                self.skip -= take
                if self.skip:
                    return
            if pos >= end:
                return
            pos = self._messages(view, pos, out)

    def _messages(self, view: memoryview, pos: int, out: bytearray) -> int:
        """Parse client messages from ``view[pos:]``; returns the new position. Stops at
        the end of the data or when a dropped message's body starts (:attr:`skip`)."""
        end = len(view)
        while pos < end and not self.skip:
            if self.buffer:  # complete the partial message held from earlier calls
                frame = _client_frame(self.buffer)
                while isinstance(frame, int):
                    take = min(frame - len(self.buffer), end - pos)
                    self.buffer += view[pos:pos + take]
                    pos += take
                    if len(self.buffer) < frame:
                        return pos
                    frame = _client_frame(self.buffer)
                take = min(frame.length - len(self.buffer), end - pos)
                self.buffer += view[pos:pos + take]
                pos += take
                if len(self.buffer) < frame.length:
                    return pos
                self._apply(frame, self.buffer, out)
                self.buffer.clear()
                continue
            rest = view[pos:]
            frame = _client_frame(rest)
            if isinstance(frame, int) or frame.length > len(rest):
                self.buffer += rest  # shorter than the message, hence within MAX_BUFFERED
                return end
            self._apply(frame, rest[:frame.length], out)
            pos += frame.length
        return pos

    def _apply(self, frame: _Frame, message: bytes | bytearray | memoryview, out: bytearray) -> None:
        if frame.action is _Action.DROP:
            self.dropped[frame.name] += 1
            self.skip = frame.skip
            return
        self.passed[frame.name] += 1
        if frame.action is _Action.REWRITE:
            rewritten, stripped = strip_encodings(message)
            self.stripped.update(stripped)
            out += rewritten
        else:
            out += message


class ViewOnlyFilter:
    """One RFB connection's view-only filter (see the module docstring).

    Feed :meth:`from_server` the device's bytes from its first byte, and
    :meth:`from_client` the viewer's; each returns the bytes to forward (possibly
    empty). After the first :class:`RFBFilterError` every call raises again.

    Counters: :attr:`dropped` (messages dropped, by name, e.g. ``"KeyEvent"``),
    :attr:`passed` (messages forwarded, by name), :attr:`stripped` (pseudo-encodings
    removed from SetEncodings, by number). :attr:`viewer_shared_flag`: the shared flag
    the viewer sent in ClientInit (``None`` before it); the device always gets 1.

    The work is shared by two parts: the handshake of both sides up to ServerInit, and
    the viewer's messages after ClientInit.
    """

    def __init__(self) -> None:
        self._handshake = _Handshake()
        self._messages = _ClientMessages()
        self.dropped = self._messages.dropped
        self.passed = self._messages.passed
        self.stripped = self._messages.stripped

    # ------------------------------------------------------------------ info
    @property
    def viewer_shared_flag(self) -> int | None:
        """The shared flag the viewer sent in ClientInit (``None`` before it)."""
        return self._handshake.viewer_shared_flag

    @property
    def framebuffer_size(self) -> tuple[int, int] | None:
        """``(width, height)`` from ServerInit, once seen."""
        return self._handshake.framebuffer_size

    @property
    def state(self) -> str:
        """For logs and debugging, e.g. ``"viewer messages, device relay"``."""
        text = f"viewer {self._handshake.viewer.value}, device {self._handshake.device.value}"
        if self._messages.skip:
            text += f" (dropping {self._messages.skip} more viewer bytes)"
        return text

    @property
    def rfb_version(self) -> str | None:
        """The protocol version in use (``"3.8"``), once the viewer chose it."""
        minor = self._handshake.minor
        return None if minor is None else f"3.{minor}"

    @property
    def security_type(self) -> int | None:
        """1 (None) or 2 (VNC Authentication), once known."""
        return self._handshake.security

    @property
    def viewer_buffered(self) -> int:
        """Viewer bytes held for a partial message; never more than :data:`MAX_BUFFERED`."""
        return len(self._handshake.vbuf) + len(self._messages.buffer)

    @property
    def device_buffered(self) -> int:
        """Device bytes held for a partial handshake message (at most 256)."""
        return len(self._handshake.dbuf)

    # ------------------------------------------------------------------ streams
    def from_server(self, data: bytes) -> bytes:
        """Device-to-viewer bytes in, the bytes to send the viewer out.

        Rewrites only the security-type list; after ServerInit returns ``data`` itself.
        Raises :class:`RFBFilterError` on a malformed or refused handshake.
        """
        if self._handshake.device is DeviceState.RELAY:
            return data
        self._usable()
        try:
            return self._handshake.device_bytes(data)
        except RFBFilterError:
            self._fail()
            raise

    def from_client(self, data: bytes) -> bytes:
        """Viewer-to-device bytes in, the bytes to send the device out.

        Passes the handshake (shared flag forced to 1) and, after ClientInit, only the
        message types in :data:`PASSED_MESSAGE_TYPES` (SetEncodings rewritten). Raises
        :class:`RFBFilterError` on anything it cannot parse or refuses.
        """
        self._usable()
        try:
            out = bytearray()
            view = memoryview(data)
            pos = 0
            if self._handshake.viewer is not ViewerState.MESSAGES:
                pos = self._handshake.viewer_bytes(view, out)
            if self._handshake.viewer is ViewerState.MESSAGES:
                self._messages.feed(view, pos, out)
            return bytes(out)
        except RFBFilterError:
            self._fail()
            raise

    # ------------------------------------------------------------------ failure
    def _usable(self) -> None:
        if self._handshake.viewer is ViewerState.FAILED:
            raise RFBFilterError("the view-only filter already refused this connection")

    def _fail(self) -> None:
        self._handshake.fail()
        self._messages.reset()
