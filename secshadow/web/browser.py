"""``--viewer browser``: open the page in the system's default browser without putting
the token on any command line (PROTOCOL.md section 5; the approach Jupyter uses).

Any local user can read another process's argv, so the URL (which holds the single-use
token) is written into a mode-0600 HTML file in a mode-0700 directory, and the browser is
asked to open *that file*: ``$BROWSER`` (a command, the file path appended), else
``xdg-open`` (Linux/BSD), ``open`` (macOS) or ``rundll32 url.dll,FileProtocolHandler``
(Windows). The file redirects to the URL. It is deleted when the session ends, or
:data:`FILE_LIFETIME` seconds after it was written (the token is dead by then anyway).

The opener (``xdg-open`` ...) exits as soon as it handed the file over, so the handle
does not end with it: :meth:`BrowserHandle.wait` fires only when the opener *failed*
(non-zero exit: the session then reports a viewer error), or after
:meth:`BrowserHandle.terminate`. The session ends when the tab closes its WebSocket.
A browser tab cannot be closed from outside, so ``terminate`` only removes the file.
"""

from __future__ import annotations

import html
import json
import os
import shlex
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable, Mapping

from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IDelayedCall
from twisted.logger import Logger

from secshadow.errors import ViewerError
from secshadow.observe import OneShot
from secshadow.viewers import TERMINATE_GRACE, ViewerProcess, launch

log = Logger()

#: Seconds the redirect file is kept at most (the token's lifetime plus slack).
FILE_LIFETIME = 90.0


def redirect_page(url: str) -> str:
    """The redirect file's HTML: a meta refresh and a script, both to ``url``."""
    quoted = html.escape(url, quote=True)
    # JSON inside <script>: no '<', '>' or '&' that could end the element.
    literal = json.dumps(url).replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")
    return ("<!DOCTYPE html><html><head><meta charset=\"utf-8\"><meta name=\"referrer\" content=\"no-referrer\">"
            f"<meta http-equiv=\"refresh\" content=\"0;url={quoted}\"><title>secshadow</title></head>"
            f"<body><script>window.location.replace({literal});</script>"
            f"<p><a href=\"{quoted}\">Open the device's screen</a></p></body></html>\n")


def write_redirect(url: str) -> Path:
    """Write :func:`redirect_page` to a new mode-0600 file in a new mode-0700 directory."""
    directory = Path(tempfile.mkdtemp(prefix="secshadow-browser-"))
    os.chmod(directory, 0o700)
    path = directory / "open.html"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(redirect_page(url))
    return path


def opener_argv(path: Path, environ: Mapping[str, str] | None = None, platform: str | None = None) -> list[str]:
    """The command that opens ``path`` in the default browser (never the URL itself).

    Raises :class:`ViewerError` when there is none (name ``$BROWSER`` then)."""
    env = os.environ if environ is None else environ
    plat = sys.platform if platform is None else platform
    if env.get("BROWSER"):
        command = shlex.split(env["BROWSER"].split(os.pathsep)[0])
        if command:
            return [*command, str(path)]
    if plat.startswith("win"):
        return ["rundll32", "url.dll,FileProtocolHandler", str(path)]
    if plat == "darwin":
        return ["open", str(path)]
    if shutil.which("xdg-open", path=env.get("PATH")) is None:
        raise ViewerError("cannot open a browser: xdg-open is not installed (Debian: xdg-utils); set $BROWSER, "
                          "or use --viewer none and open the url of the listening event yourself")
    return ["xdg-open", str(path)]


class BrowserHandle:
    """The browser as the session sees a viewer (:class:`secshadow.proxy.ViewerHandle`):
    ``name`` ``"browser"``, ``pid`` (the opener's), :meth:`wait`, :meth:`terminate`."""

    name = "browser"

    def __init__(self, opener: ViewerProcess, path: Path, clock: Any) -> None:
        self._opener = opener
        self.path = path
        self.pid = opener.pid
        self.exit_status: int | None = None
        self._ended: OneShot[int | None] = OneShot()
        self._cleanup: IDelayedCall | None = clock.callLater(FILE_LIFETIME, self._remove_file)
        opener.wait().addCallback(self._opener_exited)

    def _opener_exited(self, status: int | None) -> None:
        if status == 0:
            log.info("the browser was asked to open the viewer page")
            return
        log.warn("the browser opener {argv0} failed ({status})", argv0=self._opener.name, status=status)
        self._end(status if status is not None else -1)

    def _remove_file(self) -> None:
        if self._cleanup is not None and self._cleanup.active():
            self._cleanup.cancel()
        self._cleanup = None
        shutil.rmtree(self.path.parent, ignore_errors=True)

    @property
    def ended(self) -> bool:
        return self._ended.done

    def _end(self, status: int | None) -> None:
        if self.ended:
            return
        self.exit_status = status
        self._remove_file()
        self._ended.fire(status)

    def wait(self) -> Deferred[int | None]:
        """Fires with the opener's exit status if it failed, or ``None`` after :meth:`terminate`."""
        return self._ended.when_done()

    def terminate(self, grace: float = TERMINATE_GRACE) -> Deferred[None]:
        """Remove the redirect file and stop the opener if it still runs (the tab itself
        cannot be closed from here; it ends with the WebSocket)."""
        stopped = self._opener.terminate(grace) if not self._opener.ended else succeed(None)
        self._end(None)
        return stopped

    def __repr__(self) -> str:
        return f"<BrowserHandle pid={self.pid}>"


def open_browser(reactor: Any, url: str, *, environ: Mapping[str, str] | None = None,
                 platform: str | None = None) -> BrowserHandle:
    """Open ``url`` in the default browser through a 0600 redirect file; returns the
    :class:`BrowserHandle`. ``reactor``: IReactorProcess + IReactorTime. Raises
    :class:`ViewerError` when no opener can be started."""
    path = write_redirect(url)
    try:
        argv = opener_argv(path, environ, platform)
        process = launch(reactor, "browser", argv, env=dict(environ) if environ is not None else None)
    except ViewerError:
        shutil.rmtree(path.parent, ignore_errors=True)
        raise
    return BrowserHandle(process, path, reactor)


def browser_launcher(reactor: Any, endpoint: Any) -> Callable[[str, int], BrowserHandle]:
    """A ``ViewerLauncher`` (called with the listener's host and port) that opens the
    page of ``endpoint``'s current port (:class:`~secshadow.web.endpoint.WebViewerEndpoint`)."""

    def start(host: str, port: int) -> BrowserHandle:
        listening = getattr(endpoint, "port", None)
        if listening is None:
            raise ViewerError("the browser viewer has no page to open (the web endpoint is not listening)")
        return open_browser(reactor, listening.url)

    return start
