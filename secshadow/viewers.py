"""External VNC viewers: the registry, detection, their argv, and launching and reaping them.

Address notation (``docs/protocol.md`` section 4): the vncviewer family takes
``host::PORT`` (a TCP port; ``host:N`` would mean display N = port 5900+N);
URI viewers take ``vnc://host:PORT``; gvncviewer only ``host:N``. We never emit ``::1``.

Each viewer has one :class:`Install` per platform family (Linux/X11, Windows, macOS):
where it is found (PATH names, then the usual install folders, as globs) and how its
argv is built, including view-only and full-screen flags. Detection takes a
:class:`System` so that Windows and macOS can be tested anywhere. ``docs/viewers.md``
holds the tables :func:`markdown_tables` generates (``python -m secshadow.viewers``).

Viewers are started with ``IReactorProcess.spawnProcess``: an argv list, never a
shell, and an explicit environment from which secshadow's own secrets are removed.
Their output goes to the log, never to the console's standard output.
"""

from __future__ import annotations

import glob as _glob
import ntpath
import os
import posixpath
import re
import shlex
import shutil
import signal
import string
import sys
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Mapping, Sequence

from twisted.internet.defer import Deferred, succeed
from twisted.internet.error import ProcessDone, ProcessExitedAlready, ProcessTerminated
from twisted.internet.interfaces import IDelayedCall, IReactorProcess, IReactorTime
from twisted.internet.protocol import ProcessProtocol
from twisted.logger import Logger
from twisted.python.failure import Failure

from secshadow.errors import UsageError, ViewerError
from secshadow.observe import OneShot

#: VNC display N is TCP port 5900 + N (``host:N``); not the device's TLS port, which
#: happens to be the same number (``options.DEFAULT_DEVICE_PORT``).
VNC_DISPLAY_BASE = 5900

log = Logger()

#: Environment variables never passed to a viewer (they hold secrets).
SECRET_ENVIRONMENT = ("SECSHADOW_UMS_PASSWORD",)
#: Seconds between SIGTERM and SIGKILL when a session ends before its viewer.
TERMINATE_GRACE = 5.0


# ------------------------------------------------------------------ platforms

#: Platform families the registry knows; :func:`platform_family` maps ``sys.platform``.
LINUX, WINDOWS, MACOS = "linux", "windows", "macos"
PLATFORM_LABELS = {LINUX: "Linux / BSD (X11)", WINDOWS: "Windows", MACOS: "macOS"}


def platform_family(sys_platform: str | None = None) -> str:
    """``linux`` (any Unix with X11: Linux, the BSDs, ...), ``windows`` or ``macos``."""
    value = sys.platform if sys_platform is None else sys_platform
    if value.startswith(("win", "cygwin", "msys")):
        return WINDOWS
    if value.startswith("darwin"):
        return MACOS
    return LINUX


def _is_executable(path: str) -> bool:
    if not os.path.isfile(path):
        return False
    return os.name == "nt" or os.access(path, os.X_OK)


@dataclass(frozen=True)
class System:
    """Where viewers are looked for. The defaults describe this machine; tests inject
    another platform, PATH, environment and filesystem (``glob`` lists the paths matching
    a pattern, ``is_executable`` checks one path, ``realpath`` resolves symlinks)."""

    platform: str = field(default_factory=lambda: sys.platform)
    path: str | None = None
    environ: Mapping[str, str] | None = None
    glob: Callable[[str], list[str]] = _glob.glob
    is_executable: Callable[[str], bool] = _is_executable
    realpath: Callable[[str], str] = os.path.realpath

    @property
    def family(self) -> str:
        return platform_family(self.platform)

    @property
    def pathmod(self) -> Any:
        return ntpath if self.family == WINDOWS else posixpath

    def env(self) -> Mapping[str, str]:
        return os.environ if self.environ is None else self.environ

    def search_path(self) -> list[str]:
        value = self.path if self.path is not None else self.env().get("PATH", os.defpath)
        separator = ";" if self.family == WINDOWS else ":"
        return [d for d in value.split(separator) if d]

    def expand(self, pattern: str) -> str:
        """``%ProgramFiles%``, ``%ProgramFiles(x86)%`` and a leading
        ``~`` in a location pattern, from the environment (glob-escaped)."""
        env = self.env()
        for name, default in _PATTERN_VARIABLES.items():
            token = f"%{name}%"
            if token in pattern:
                value = env.get(name) or default
                pattern = pattern.replace(token, _glob.escape(value))
        if pattern.startswith("~/"):
            home = env.get("HOME") or os.path.expanduser("~")
            pattern = _glob.escape(home) + pattern[1:]
        return pattern


_PATTERN_VARIABLES = {
    "ProgramFiles": r"C:\Program Files",
    "ProgramFiles(x86)": r"C:\Program Files (x86)",
}


def _version_key(path: str) -> list[tuple[int, int | str]]:
    """Natural sort key: 'TigerVNC Viewer 1.13.1' sorts after 'TigerVNC Viewer 1.9.0'."""
    return [(1, int(part)) if part.isdigit() else (0, part) for part in re.split(r"(\d+)", path)]


# ------------------------------------------------------------------ the registry


@dataclass(frozen=True)
class ViewerRequest:
    """What the viewer is asked to do: connect to host:port, perhaps view-only and full screen."""

    host: str
    port: int
    view_only: bool = False
    full_screen: bool = False
    title: str = "secshadow"


Builder = Callable[[ViewerRequest], list[str]]


@dataclass(frozen=True)
class Install:
    """One viewer on one platform family: how it is found and its argv after the executable.

    ``executables``: names looked up on the PATH, in order; ``locations``: absolute glob
    patterns of the usual install folders (``%ProgramFiles%``, ``~`` expand), tried after
    the PATH, newest version first; ``requires``: globs of which one must exist too (e.g.
    the app that ``open`` starts). ``view_only``/``full_screen``: whether the viewer has
    such a mode (the builder maps it to the viewer's own flags)."""

    platform: str
    build: Builder
    executables: tuple[str, ...] = ()
    locations: tuple[str, ...] = ()
    requires: tuple[str, ...] = ()
    view_only: bool = True
    full_screen: bool = True
    note: str = ""


@dataclass(frozen=True)
class ViewerSpec:
    """A known viewer (``--viewer NAME``): its ``installs``, one per platform family."""

    name: str
    label: str
    installs: tuple[Install, ...]

    def install_for(self, platform: str | None = None) -> Install | None:
        family = platform_family(platform)
        return next((i for i in self.installs if i.platform == family), None)

    @property
    def platforms(self) -> tuple[str, ...]:
        """The platform families this viewer exists on."""
        return tuple(i.platform for i in self.installs)

    @property
    def executables(self) -> tuple[str, ...]:
        """PATH names on this machine's platform (for messages)."""
        install = self.install_for()
        return install.executables if install else ()

    def build(self, host: str, port: int, view_only: bool = False, title: str = "secshadow") -> list[str]:
        """The argv tail on this machine's platform (the historic signature)."""
        install = self.install_for()
        if install is None:
            raise ViewerError(f"viewer {self.name!r} does not exist on {PLATFORM_LABELS[platform_family()]}")
        return install.build(ViewerRequest(host, port, view_only, False, title))


@dataclass(frozen=True)
class FoundViewer:
    """A viewer found on a system: the executable and the install it belongs to."""

    spec: ViewerSpec
    install: Install
    executable: str


def _address(request: ViewerRequest, separator: str) -> str:
    return f"{request.host}{separator}{request.port}"


def _uri(request: ViewerRequest) -> str:
    return f"vnc://{request.host}:{request.port}"


def _flags(request: ViewerRequest, view_only: Sequence[str] = (), full_screen: Sequence[str] = ()) -> list[str]:
    return [*(view_only if request.view_only else ()), *(full_screen if request.full_screen else ())]


def _tigervnc(r: ViewerRequest) -> list[str]:
    # ReconnectOnError=0 / AlertOnFatalError=0: exit when the tunnel ends instead of
    # showing a dialog, so the session's end is the viewer's end.
    return ["-ReconnectOnError=0", "-AlertOnFatalError=0", *_flags(r, ["-ViewOnly"], ["-FullScreen"]),
            _address(r, "::")]


def _realvnc(r: ViewerRequest) -> list[str]:
    # A loopback tunnel always looks unencrypted to RealVNC: don't warn about it.
    return ["-WarnUnencrypted=0", *_flags(r, ["-SendKeyEvents=0", "-SendPointerEvents=0"], ["-FullScreen=1"]),
            _address(r, "::")]


def _classic(r: ViewerRequest) -> list[str]:
    # xtightvncviewer and UltraVNC's vncviewer.exe: the classic ORL-style flags.
    return [*_flags(r, ["-viewonly"], ["-fullscreen"]), _address(r, "::")]


def _tvnviewer(r: ViewerRequest) -> list[str]:
    # TightVNC 2.x for Windows: name=value options.
    return [f"-host={r.host}", f"-port={r.port}", *_flags(r, ["-viewonly=yes"], ["-fullscreen=yes"])]


def _remote_viewer(r: ViewerRequest) -> list[str]:
    return ["--title", r.title, *_flags(r, (), ["--full-screen"]), _uri(r)]


def _remmina(r: ViewerRequest) -> list[str]:
    return [*_flags(r, (), ["--enable-fullscreen"]), "-c", _uri(r)]


def _krdc(r: ViewerRequest) -> list[str]:
    return [*_flags(r, (), ["--fullscreen"]), _uri(r)]


def _vinagre(r: ViewerRequest) -> list[str]:
    # Vinagre 3.22 has no view-only flag; it reads host::port like the vncviewer family.
    return [*_flags(r, (), ["--fullscreen"]), _address(r, "::")]


def _gvncviewer(r: ViewerRequest) -> list[str]:
    # gvncviewer only understands host:N, display N = TCP port 5900 + N.
    if r.port < VNC_DISPLAY_BASE:
        raise ViewerError(f"gvncviewer cannot reach port {r.port} (below {VNC_DISPLAY_BASE}): "
                          f"listen on a port >= {VNC_DISPLAY_BASE}")
    return [f"{r.host}:{r.port - VNC_DISPLAY_BASE}"]


def _screensharing(r: ViewerRequest) -> list[str]:
    # open -W waits until Screen Sharing quits (so its end ends the session); -n starts a
    # new instance; -a makes sure it is Screen Sharing and not another vnc:// handler.
    return ["-W", "-n", "-a", "Screen Sharing", _uri(r)]


_MAC_APPS = ("/Applications", "~/Applications")

VIEWERS: dict[str, ViewerSpec] = {
    spec.name: spec
    for spec in (
        ViewerSpec("tigervnc", "TigerVNC", (
            Install(LINUX, _tigervnc, ("xtigervncviewer", "vncviewer")),
            Install(WINDOWS, _tigervnc, (), (
                r"%ProgramFiles%\TigerVNC\vncviewer.exe", r"%ProgramFiles(x86)%\TigerVNC\vncviewer.exe")),
            Install(MACOS, _tigervnc, ("vncviewer",), tuple(
                f"{apps}/TigerVNC Viewer*.app/Contents/MacOS/TigerVNC Viewer" for apps in _MAC_APPS)),
        )),
        ViewerSpec("realvnc", "RealVNC Viewer", (
            Install(LINUX, _realvnc, ("vncviewer-realvnc", "realvnc-vncviewer"), (
                "/opt/RealVNC/VNC Viewer/vncviewer",)),
            Install(WINDOWS, _realvnc, (), (
                r"%ProgramFiles%\RealVNC\VNC Viewer\vncviewer.exe",
                r"%ProgramFiles(x86)%\RealVNC\VNC Viewer\vncviewer.exe")),
            Install(MACOS, _realvnc, (), tuple(
                f"{apps}/VNC Viewer.app/Contents/MacOS/vncviewer" for apps in _MAC_APPS)),
        )),
        ViewerSpec("tightvnc", "TightVNC", (
            Install(LINUX, _classic, ("xtightvncviewer",)),
            Install(WINDOWS, _tvnviewer, ("tvnviewer.exe",), (
                r"%ProgramFiles%\TightVNC\tvnviewer.exe", r"%ProgramFiles(x86)%\TightVNC\tvnviewer.exe")),
        )),
        ViewerSpec("ultravnc", "UltraVNC Viewer", (
            Install(WINDOWS, _classic, (), (
                r"%ProgramFiles%\uvnc bvba\UltraVNC\vncviewer.exe",
                r"%ProgramFiles(x86)%\uvnc bvba\UltraVNC\vncviewer.exe",
                r"%ProgramFiles%\UltraVNC\vncviewer.exe",
                r"%ProgramFiles(x86)%\UltraVNC\vncviewer.exe")),
        )),
        ViewerSpec("remote-viewer", "remote-viewer (virt-viewer)", (
            Install(LINUX, _remote_viewer, ("remote-viewer",), view_only=False),
            Install(WINDOWS, _remote_viewer, ("remote-viewer.exe",), (
                r"%ProgramFiles%\VirtViewer v*\bin\remote-viewer.exe",), view_only=False),
            Install(MACOS, _remote_viewer, ("remote-viewer",), view_only=False),
        )),
        ViewerSpec("remmina", "Remmina", (
            Install(LINUX, _remmina, ("remmina",), view_only=False),
        )),
        ViewerSpec("gvncviewer", "gvncviewer (GTK-VNC)", (
            Install(LINUX, _gvncviewer, ("gvncviewer",), view_only=False, full_screen=False),
        )),
        ViewerSpec("vinagre", "Vinagre", (
            Install(LINUX, _vinagre, ("vinagre",), view_only=False),
        )),
        ViewerSpec("krdc", "KRDC", (
            Install(LINUX, _krdc, ("krdc",), view_only=False),
        )),
        ViewerSpec("screensharing", "macOS Screen Sharing", (
            Install(MACOS, _screensharing, (), ("/usr/bin/open",), requires=(
                "/System/Library/CoreServices/Applications/Screen Sharing.app",
                "/System/Applications/Utilities/Screen Sharing.app",
            ), view_only=False, full_screen=False,
                note="`open -W` ends when Screen Sharing quits; terminating it does not close Screen Sharing"),
        )),
    )
}

#: Order ``--viewer auto`` tries (each only on the platforms it exists on).
AUTO_ORDER = ("tigervnc", "realvnc", "tightvnc", "ultravnc", "remote-viewer", "gvncviewer", "vinagre", "krdc",
              "remmina", "screensharing")

#: What to install when ``--viewer auto`` finds nothing, per platform family.
INSTALL_HINTS = {
    LINUX: "install TigerVNC (Debian: tigervnc-viewer)",
    WINDOWS: "install TigerVNC, TightVNC, UltraVNC or RealVNC Viewer",
    MACOS: "install TigerVNC Viewer or enable Screen Sharing",
}

_TEMPLATE_FIELDS = {"host", "port", "display", "title"}


def validate_template(template: str) -> list[str]:
    """Split a ``--viewer-command`` template into argv tokens and check its placeholders.

    Placeholders: ``{host}``, ``{port}``, ``{display}`` (port - 5900), ``{title}``.
    Raises :class:`UsageError` for unbalanced quotes, unknown or malformed placeholders,
    or a template that never mentions ``{port}`` or ``{display}`` (the viewer could not
    find the tunnel).
    """
    try:
        tokens = shlex.split(template)
    except ValueError as e:
        raise UsageError(f"--viewer-command: {e}") from None
    if not tokens:
        raise UsageError("--viewer-command is empty")
    used: set[str] = set()
    for token in tokens:
        try:
            parsed = list(string.Formatter().parse(token))
        except ValueError as e:
            raise UsageError(f"--viewer-command: malformed placeholder in {token!r}: {e}") from None
        for _, field_name, spec, conversion in parsed:
            if field_name is None:
                continue
            if field_name not in _TEMPLATE_FIELDS or spec or conversion:
                raise UsageError(
                    f"--viewer-command: unknown placeholder {{{field_name}}}; "
                    f"use {', '.join('{' + f + '}' for f in sorted(_TEMPLATE_FIELDS))}"
                )
            used.add(field_name)
    if not used & {"port", "display"}:
        raise UsageError("--viewer-command must contain {port} or {display}")
    return tokens


def template_argv(template: str, host: str, port: int, title: str = "secshadow") -> list[str]:
    """argv from a validated template; each token is formatted separately (no shell)."""
    _check_host(host)
    values = {"host": host, "port": str(port), "display": str(port - VNC_DISPLAY_BASE), "title": title}
    return [token.format(**values) for token in validate_template(template)]


def _check_host(host: str) -> None:
    if ":" in host or not host:
        # host::port and host:N cannot carry an IPv6 address; '::1' would be misread.
        raise ViewerError(f"viewers need an IPv4 address or a name for the tunnel, not {host!r}")


# ------------------------------------------------------------------ detection


def _system(path: str | None, system: System | None) -> System:
    base = system or System()
    return base if path is None else replace(base, path=path)


def _claimed_by_another(spec: ViewerSpec, family: str, name: str) -> bool:
    """``name`` is another viewer's PATH name on this platform (e.g. Debian's
    ``vncviewer`` alternative pointing at ``xtightvncviewer``)."""
    for other in VIEWERS.values():
        if other is spec:
            continue
        for candidate in other.installs:
            if candidate.platform == family and name in candidate.executables:
                return True
    return False


def locate(spec: ViewerSpec, path: str | None = None, system: System | None = None) -> FoundViewer | None:
    """Find ``spec`` on ``system`` (default: this machine): its PATH names first, then the
    usual install folders (newest version first). ``None`` when it is not installed or
    does not exist on the platform."""
    sysm = _system(path, system)
    family = sysm.family
    install = next((i for i in spec.installs if i.platform == family), None)
    if install is None:
        return None
    if install.requires and not any(sysm.glob(sysm.expand(p)) for p in install.requires):
        return None
    for name in install.executables:
        for directory in sysm.search_path():
            candidate = sysm.pathmod.join(directory, name)
            if not sysm.is_executable(candidate):
                continue
            target = sysm.pathmod.basename(sysm.realpath(candidate))
            if target != name and _claimed_by_another(spec, family, target):
                log.debug("{path} is {target}, not {viewer}", path=candidate, target=target, viewer=spec.name)
                continue
            return FoundViewer(spec, install, candidate)
    for pattern in install.locations:
        for candidate in sorted(sysm.glob(sysm.expand(pattern)), key=_version_key, reverse=True):
            if sysm.is_executable(candidate):
                return FoundViewer(spec, install, candidate)
    return None


def find_executable(spec: ViewerSpec, path: str | None = None, system: System | None = None) -> str | None:
    """The executable of ``spec`` (see :func:`locate`); ``None`` when not installed."""
    found = locate(spec, path, system)
    return found.executable if found else None


def _looked_for(spec: ViewerSpec, family: str) -> str:
    install = next((i for i in spec.installs if i.platform == family), None)
    if install is None:
        return "nothing"
    return ", ".join([*install.executables, *install.locations]) or "nothing"


def resolve_viewer(name: str, path: str | None = None, system: System | None = None,
                   view_only: bool = False) -> ViewerSpec:
    """The spec for ``--viewer NAME`` (``auto`` picks the first installed, and with
    ``view_only`` preferably one that has a view-only mode of its own).

    Raises :class:`UsageError` for an unknown name and :class:`ViewerError` when the
    viewer (or, for ``auto``, any viewer) is not installed. A viewer without a
    view-only mode is fine with ``view_only``: the proxy enforces it (rfbfilter.py).
    """
    sysm = _system(path, system)
    family = sysm.family
    if name == "auto":
        skipped: list[str] = []
        for candidate in AUTO_ORDER:
            found = locate(VIEWERS[candidate], system=sysm)
            if found is None:
                continue
            if view_only and not found.install.view_only:
                skipped.append(candidate)
                continue
            log.info("--viewer auto: using {viewer} ({executable})", viewer=found.spec.name,
                     executable=found.executable)
            return found.spec
        tried = ", ".join(c for c in AUTO_ORDER if VIEWERS[c].install_for(sysm.platform))
        if skipped:
            log.info("--viewer auto: using {viewer}, which has no view-only mode of its own; the proxy "
                     "enforces view-only", viewer=skipped[0])
            return VIEWERS[skipped[0]]
        raise ViewerError(f"no VNC viewer found (tried: {tried}); {INSTALL_HINTS[family]} or use --viewer none")
    spec = VIEWERS.get(name)
    if spec is None:
        raise UsageError(f"unknown viewer {name!r}; known: auto, none, {', '.join(VIEWERS)}")
    install = spec.install_for(sysm.platform)
    if install is None:
        raise ViewerError(f"viewer {name!r} does not exist on {PLATFORM_LABELS[family]} "
                          f"(only {', '.join(PLATFORM_LABELS[p] for p in spec.platforms)})")
    if locate(spec, system=sysm) is None:
        raise ViewerError(f"viewer {name!r} is not installed (looked for {_looked_for(spec, family)})")
    return spec


def viewer_argv(spec: ViewerSpec, host: str, port: int, view_only: bool = False,
                title: str = "secshadow", path: str | None = None, *, full_screen: bool = False,
                system: System | None = None) -> list[str]:
    """Full argv (executable path first) to start ``spec`` on the tunnel at host:port.

    ``view_only`` adds the viewer's own view-only flag where it has one (the proxy
    enforces view-only either way); ``full_screen`` where the viewer has no such flag
    is logged and ignored."""
    _check_host(host)
    found = locate(spec, path, system)
    if found is None:
        raise ViewerError(f"viewer {spec.name!r} is not installed")
    return [found.executable, *install_argv(found.install, spec, host, port, view_only=view_only,
                                            full_screen=full_screen, title=title)]


def install_argv(install: Install, spec: ViewerSpec, host: str, port: int, *, view_only: bool = False,
                 full_screen: bool = False, title: str = "secshadow") -> list[str]:
    """The argv tail of one install (no detection: what the docs table shows)."""
    _check_host(host)
    if view_only and not install.view_only:
        view_only = False  # the proxy's filter enforces it; this viewer has no flag to add
    if full_screen and not install.full_screen:
        log.warn("viewer {viewer} has no full-screen flag; starting it windowed", viewer=spec.name)
        full_screen = False
    return install.build(ViewerRequest(host, port, view_only, full_screen, title))


# ------------------------------------------------------------------ documentation


def _show(argv: Sequence[str]) -> str:
    return " ".join(f'"{a}"' if (" " in a or not a) else a for a in argv)


def markdown_tables() -> str:
    """The argv table and the detection table of ``docs/viewers.md``, from the registry."""
    port = 45678
    host = "127.0.0.1"

    def placeholders(text: str) -> str:
        return text.replace(str(port - 5900), "N").replace(str(port), "PORT")

    argv_rows = ["| viewer | platform | argv after the executable | `--view-only` adds | full screen adds |",
                 "|---|---|---|---|---|"]
    found_rows = ["| viewer | platform | PATH names, in order | then the usual install folders |",
                  "|---|---|---|---|"]
    for spec in VIEWERS.values():
        for install in spec.installs:
            base = install.build(ViewerRequest(host, port, title="TITLE"))
            vo = install.build(ViewerRequest(host, port, view_only=True, title="TITLE"))
            fs = install.build(ViewerRequest(host, port, full_screen=True, title="TITLE"))
            vo_add = _show([a for a in vo if a not in base]) if install.view_only else ""
            fs_add = _show([a for a in fs if a not in base]) if install.full_screen else ""
            argv_rows.append(
                f"| `{spec.name}` | {PLATFORM_LABELS[install.platform]} | `{placeholders(_show(base))}` | "
                + (f"`{vo_add}`" if vo_add else "— (the proxy's filter only)") + " | "
                + (f"`{fs_add}`" if fs_add else "— (ignored)") + " |")
            names = ", ".join(f"`{n}`" for n in install.executables) or "—"
            places = "<br>".join(f"`{p}`" for p in install.locations) or "—"
            if install.requires:
                places += "<br>and one of " + ", ".join(f"`{p}`" for p in install.requires)
            if install.note:
                places += f"<br>({install.note})"
            found_rows.append(f"| `{spec.name}` | {PLATFORM_LABELS[install.platform]} | {names} | {places} |")
    return "\n".join(argv_rows) + "\n\n" + "\n".join(found_rows) + "\n"


def viewer_environment(base: Mapping[str, str] | None = None) -> dict[str, str]:
    """The viewer's environment: ours, minus the variables that hold secrets."""
    env = dict(os.environ if base is None else base)
    for key in SECRET_ENVIRONMENT:
        env.pop(key, None)
    return env


class _LineLogger:
    """Logs a viewer's output line by line: a read may end mid-line, so the tail waits
    for its newline (bounded: a line longer than MAX_LINE is logged in pieces)."""

    MAX_LINE = 4096

    def __init__(self, viewer: str) -> None:
        self._viewer = viewer
        self._partial = b""

    def feed(self, data: bytes) -> None:
        *lines, self._partial = (self._partial + data).split(b"\n")
        while len(self._partial) > self.MAX_LINE:
            lines.append(self._partial[:self.MAX_LINE])
            self._partial = self._partial[self.MAX_LINE:]
        for line in lines:
            self._log(line)

    def flush(self) -> None:
        partial, self._partial = self._partial, b""
        self._log(partial)

    def _log(self, raw: bytes) -> None:
        line = raw.decode("utf-8", "replace").rstrip("\r")
        if line.strip():
            log.info("[{viewer}] {line}", viewer=self._viewer, line=line)


class ViewerProcess(ProcessProtocol):
    """A launched viewer. :meth:`wait` fires with its exit status (``None`` if killed
    by a signal); :meth:`terminate` stops it (SIGTERM, SIGKILL after ``grace``
    seconds) and fires once it has been reaped."""

    def __init__(self, name: str, clock: IReactorTime) -> None:
        self.name = name
        self._clock = clock
        self.pid: int | None = None
        self.exit_status: int | None = None
        self._ended: OneShot[int | None] = OneShot()
        self._output = _LineLogger(name)
        self._kill_call: IDelayedCall | None = None
        self.own_group = False

    def connectionMade(self) -> None:
        self.pid = self.transport.pid  # type: ignore[union-attr]
        self.transport.closeStdin()  # type: ignore[union-attr]

    @property
    def ended(self) -> bool:
        return self._ended.done

    def outReceived(self, data: bytes) -> None:
        self._output.feed(data)

    errReceived = outReceived

    def processExited(self, reason: Failure) -> None:
        # The viewer itself is gone. Close our ends of its pipes now: a child it left
        # behind may hold them open, and processEnded (our "reaped") waits for them.
        self.transport.loseConnection()  # type: ignore[union-attr]

    def processEnded(self, reason: Failure) -> None:
        self._output.flush()
        if reason.check(ProcessDone):
            self.exit_status = 0
        elif reason.check(ProcessTerminated):
            self.exit_status = getattr(reason.value, "exitCode", None)
        if self._kill_call is not None and self._kill_call.active():
            self._kill_call.cancel()
        self._kill_call = None
        self._ended.fire(self.exit_status)

    def wait(self) -> Deferred[int | None]:
        """A Deferred firing with the exit status once the viewer has been reaped."""
        return self._ended.when_done()

    def terminate(self, grace: float = TERMINATE_GRACE) -> Deferred[None]:
        if self.ended:
            return succeed(None)
        done = self.wait()
        self._signal("TERM")
        if self._kill_call is None:
            self._kill_call = self._clock.callLater(grace, self._signal, "KILL")
        return done.addCallback(lambda _: None)

    def _signal(self, name: str) -> None:
        try:
            self.transport.signalProcess(name)  # type: ignore[union-attr]
        except ProcessExitedAlready:
            pass
        if self.own_group and self.pid is not None:
            # The viewer leads its own process group (setsid): signal the rest of the
            # group too, so helpers it forked do not outlive the session. (Right after
            # launch the group may not exist yet; the direct signal above covers that.)
            try:
                os.killpg(self.pid, getattr(signal, f"SIG{name}"))
            except (ProcessLookupError, PermissionError):
                pass


def launch(reactor: IReactorProcess, name: str, argv: Sequence[str],
           env: Mapping[str, str] | None = None) -> ViewerProcess:
    """Spawn ``argv`` as viewer ``name``; raises :class:`ViewerError` if it cannot start."""
    process = ViewerProcess(name, reactor)  # type: ignore[arg-type]
    executable = argv[0]
    if os.sep not in executable:
        found = shutil.which(executable)
        if found is None:
            raise ViewerError(f"cannot start the viewer: {executable!r} not found on the PATH")
        executable = found
    elif not (os.path.isfile(executable) and os.access(executable, os.X_OK)):
        raise ViewerError(f"cannot start the viewer: {executable!r} is not an executable file")
    command = [executable, *argv[1:]]
    setsid = shutil.which("setsid")
    if setsid is not None:
        # setsid(1) makes the viewer a process-group leader and execs it under the same
        # pid, so terminate() can reach whatever the viewer forks.
        command = [setsid, *command]
        process.own_group = True
    try:
        reactor.spawnProcess(process, command[0], command, env=viewer_environment(env))
    except OSError as e:
        raise ViewerError(f"cannot start the viewer {executable!r}: {e.strerror}") from None
    log.debug("started viewer {viewer} (pid {pid}): {argv}", viewer=name, pid=process.pid, argv=" ".join(argv))
    return process


def make_launcher(reactor: IReactorProcess, viewer: str, *, command: str | None = None, view_only: bool = False,
                  full_screen: bool = False, title: Callable[[], str] = lambda: "secshadow",
                  ) -> Callable[[str, int], ViewerProcess] | None:
    """The one launcher factory (CLI and control mode): ``command`` (a template with
    ``{host}`` ``{port}`` ``{display}`` ``{title}``) or a known ``viewer`` name
    (``auto`` detects; ``none`` gives ``None``). Resolves and validates now, so a
    missing viewer fails before a one-time password is spent; raises
    :class:`UsageError` / :class:`ViewerError`. The result is called with the
    listener's (host, port) and returns the launched :class:`ViewerProcess`."""
    if command is not None:
        validate_template(command)
        return lambda host, port: launch(reactor, "custom", template_argv(command, host, port, title()))
    if viewer == "none":
        return None
    spec = resolve_viewer(viewer, view_only=view_only)
    return lambda host, port: launch(reactor, spec.name, viewer_argv(
        spec, host, port, view_only=view_only, full_screen=full_screen, title=title()))


def signal_name(status: int | None) -> str:
    """Readable exit status for messages."""
    if status is None:
        return "killed by a signal"
    if status < 0:
        return f"killed by {signal.Signals(-status).name}"
    return f"exit status {status}"


if __name__ == "__main__":  # pragma: no cover - regenerates the tables of docs/viewers.md
    sys.stdout.write(markdown_tables())
