"""External VNC viewers: their argv, and launching and reaping them.

Address notation (``docs/protocol.md`` section 4): the vncviewer family takes
``host::PORT`` (a TCP port; ``host:N`` would mean display N = port 5900+N);
URI viewers take ``vnc://host:PORT``. We never emit ``::1``.

Viewers are started with ``IReactorProcess.spawnProcess``: an argv list, never a
shell, and an explicit environment from which secshadow's own secrets are removed.
Their output goes to the log, never to the console's standard output.
"""

from __future__ import annotations

import os
import shlex
import shutil
import signal
import string
import sys
from dataclasses import dataclass
from typing import Callable, Mapping, Sequence

from twisted.internet.defer import Deferred, succeed
from twisted.internet.error import ProcessDone, ProcessExitedAlready, ProcessTerminated
from twisted.internet.interfaces import IDelayedCall, IReactorProcess, IReactorTime
from twisted.internet.protocol import ProcessProtocol
from twisted.logger import Logger
from twisted.python.failure import Failure

from secshadow.errors import UsageError, ViewerError

log = Logger()

#: Environment variables never passed to a viewer (they hold secrets).
SECRET_ENVIRONMENT = ("SECSHADOW_UMS_PASSWORD",)
#: Seconds between SIGTERM and SIGKILL when a session ends before its viewer.
TERMINATE_GRACE = 5.0


@dataclass(frozen=True)
class ViewerSpec:
    """A known viewer: ``executables`` tried in order on the PATH; ``build`` makes the
    argv tail from (host, port, view_only, title); ``platforms``: ``sys.platform``
    prefixes it exists on (empty: any)."""

    name: str
    executables: tuple[str, ...]
    build: Callable[[str, int, bool, str], list[str]]
    platforms: tuple[str, ...] = ()


def _tigervnc(host: str, port: int, view_only: bool, title: str) -> list[str]:
    # ReconnectOnError=0 / AlertOnFatalError=0: exit when the tunnel ends instead of
    # showing a dialog, so the session's end is the viewer's end.
    args = ["-ReconnectOnError=0", "-AlertOnFatalError=0"]
    if view_only:
        args.append("-ViewOnly")
    args.append(f"{host}::{port}")
    return args


def _realvnc(host: str, port: int, view_only: bool, title: str) -> list[str]:
    # A loopback tunnel always looks unencrypted to RealVNC: don't warn about it.
    args = ["-WarnUnencrypted=0"]
    if view_only:
        args += ["-SendKeyEvents=0", "-SendPointerEvents=0"]
    return [*args, f"{host}::{port}"]


def _vncviewer_family(view_only_flag: str) -> Callable[[str, int, bool, str], list[str]]:
    def build(host: str, port: int, view_only: bool, title: str) -> list[str]:
        return ([view_only_flag] if view_only else []) + [f"{host}::{port}"]
    return build


def _uri(prefix: Sequence[str] = (), title_flag: str | None = None) -> Callable[[str, int, bool, str], list[str]]:
    def build(host: str, port: int, view_only: bool, title: str) -> list[str]:
        args = list(prefix)
        if title_flag:
            args += [title_flag, title]
        return [*args, f"vnc://{host}:{port}"]
    return build


def _gvncviewer(host: str, port: int, view_only: bool, title: str) -> list[str]:
    # gvncviewer only understands host:N, display N = TCP port 5900 + N.
    if port < 5900:
        raise ViewerError(f"gvncviewer cannot reach port {port} (below 5900): listen on a port >= 5900")
    return [f"{host}:{port - 5900}"]


VIEWERS: dict[str, ViewerSpec] = {
    spec.name: spec
    for spec in (
        ViewerSpec("tigervnc", ("vncviewer", "xtigervncviewer"), _tigervnc),
        ViewerSpec("realvnc", ("vncviewer-realvnc", "realvnc-vncviewer"), _realvnc),
        ViewerSpec("tightvnc", ("xtightvncviewer",), _vncviewer_family("-viewonly")),
        ViewerSpec("ultravnc", ("vncviewer.exe",), _vncviewer_family("-viewonly"), ("win",)),
        ViewerSpec("vinagre", ("vinagre",), _vncviewer_family("--view-only")),
        ViewerSpec("remote-viewer", ("remote-viewer",), _uri(title_flag="--title")),
        ViewerSpec("remmina", ("remmina",), _uri(prefix=("-c",))),
        ViewerSpec("krdc", ("krdc",), _uri()),
        ViewerSpec("gvncviewer", ("gvncviewer",), _gvncviewer),
        ViewerSpec("screensharing", ("open",), _uri(), ("darwin",)),
    )
}

#: Order ``--viewer auto`` tries.
AUTO_ORDER = ("tigervnc", "realvnc", "tightvnc", "remote-viewer", "gvncviewer", "vinagre", "krdc",
              "remmina", "ultravnc", "screensharing")

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
        for _, field, spec, conversion in parsed:
            if field is None:
                continue
            if field not in _TEMPLATE_FIELDS or spec or conversion:
                raise UsageError(
                    f"--viewer-command: unknown placeholder {{{field}}}; "
                    f"use {', '.join('{' + f + '}' for f in sorted(_TEMPLATE_FIELDS))}"
                )
            used.add(field)
    if not used & {"port", "display"}:
        raise UsageError("--viewer-command must contain {port} or {display}")
    return tokens


def template_argv(template: str, host: str, port: int, title: str = "secshadow") -> list[str]:
    """argv from a validated template; each token is formatted separately (no shell)."""
    values = {"host": host, "port": str(port), "display": str(port - 5900), "title": title}
    return [token.format(**values) for token in validate_template(template)]


def find_executable(spec: ViewerSpec, path: str | None = None) -> str | None:
    """First of ``spec.executables`` found on ``path`` (default: ``$PATH``); ``None`` on
    a platform the viewer does not exist on."""
    if spec.platforms and not sys.platform.startswith(spec.platforms):
        return None
    for name in spec.executables:
        found = shutil.which(name, path=path)
        if found:
            return found
    return None


def resolve_viewer(name: str, path: str | None = None) -> ViewerSpec:
    """The spec for ``--viewer NAME`` (``auto`` picks the first installed).

    Raises :class:`UsageError` for an unknown name and :class:`ViewerError` when the
    viewer (or, for ``auto``, any viewer) is not installed.
    """
    if name == "auto":
        for candidate in AUTO_ORDER:
            spec = VIEWERS[candidate]
            if find_executable(spec, path):
                log.info("--viewer auto: using {viewer}", viewer=spec.name)
                return spec
        raise ViewerError(
            "no VNC viewer found on the PATH (tried: "
            + ", ".join(e for c in AUTO_ORDER for e in VIEWERS[c].executables)
            + "); install TigerVNC (Debian: tigervnc-viewer) or use --viewer none"
        )
    found_spec = VIEWERS.get(name)
    if found_spec is None:
        raise UsageError(f"unknown viewer {name!r}; known: auto, none, {', '.join(VIEWERS)}")
    spec = found_spec
    if find_executable(spec, path) is None:
        raise ViewerError(f"viewer {name!r} is not installed (looked for {', '.join(spec.executables)})")
    return spec


def viewer_argv(spec: ViewerSpec, host: str, port: int, view_only: bool = False,
                title: str = "secshadow", path: str | None = None) -> list[str]:
    """Full argv (executable path first) to start ``spec`` on the tunnel at host:port."""
    executable = find_executable(spec, path)
    if executable is None:
        raise ViewerError(f"viewer {spec.name!r} is not installed")
    return [executable, *spec.build(host, port, view_only, title)]


def viewer_environment(base: Mapping[str, str] | None = None) -> dict[str, str]:
    """The viewer's environment: ours, minus the variables that hold secrets."""
    env = dict(os.environ if base is None else base)
    for key in SECRET_ENVIRONMENT:
        env.pop(key, None)
    return env


class ViewerProcess(ProcessProtocol):
    """A launched viewer. :meth:`wait` fires with its exit status (``None`` if killed
    by a signal); :meth:`terminate` stops it (SIGTERM, SIGKILL after ``grace``
    seconds) and fires once it has been reaped."""

    def __init__(self, name: str, clock: IReactorTime) -> None:
        self.name = name
        self._clock = clock
        self.pid: int | None = None
        self.exit_status: int | None = None
        self.ended = False
        self._waiters: list[Deferred[int | None]] = []
        self._kill_call: IDelayedCall | None = None
        self.own_group = False

    def connectionMade(self) -> None:
        self.pid = self.transport.pid  # type: ignore[union-attr]
        self.transport.closeStdin()  # type: ignore[union-attr]

    def outReceived(self, data: bytes) -> None:
        for line in data.decode("utf-8", "replace").splitlines():
            if line.strip():
                log.info("[{viewer}] {line}", viewer=self.name, line=line)

    errReceived = outReceived

    def processExited(self, reason: Failure) -> None:
        # The viewer itself is gone. Close our ends of its pipes now: a child it left
        # behind may hold them open, and processEnded (our "reaped") waits for them.
        self.transport.loseConnection()  # type: ignore[union-attr]

    def processEnded(self, reason: Failure) -> None:
        self.ended = True
        if reason.check(ProcessDone):
            self.exit_status = 0
        elif reason.check(ProcessTerminated):
            self.exit_status = getattr(reason.value, "exitCode", None)
        if self._kill_call is not None and self._kill_call.active():
            self._kill_call.cancel()
        self._kill_call = None
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            waiter.callback(self.exit_status)

    def wait(self) -> Deferred[int | None]:
        if self.ended:
            return succeed(self.exit_status)
        waiter: Deferred[int | None] = Deferred()
        self._waiters.append(waiter)
        return waiter

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


def signal_name(status: int | None) -> str:
    """Readable exit status for messages."""
    if status is None:
        return "killed by a signal"
    if status < 0:
        return f"killed by {signal.Signals(-status).name}"
    return f"exit status {status}"
