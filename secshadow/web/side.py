"""The browser as a session's viewer side, for the CLI, control mode and embedders.

:func:`browser_side` builds what ``--web`` and ``--viewer browser`` need: the viewer
endpoint (:class:`~secshadow.web.endpoint.WebViewerEndpoint`, one HTTP site with a
single-use token) and, when a browser is to be opened, its launcher (a mode-0600
redirect file, never the token on a command line). Imported only when asked for, so
the CLI's start stays light.
"""

from __future__ import annotations

from typing import Any, Iterable

from secshadow.options import SessionOptions
from secshadow.web.assets import find_novnc
from secshadow.web.browser import BrowserHandle, browser_launcher
from secshadow.web.endpoint import WebViewerEndpoint


def browser_side(reactor: Any, options: SessionOptions, *, open_browser: bool, novnc: str | None = None,
                 frame_ancestors: str | None = None, origins: Iterable[str] = ()
                 ) -> tuple[WebViewerEndpoint, Any]:
    """(endpoint, launcher or ``None``) for one browser session listening on
    ``options.listen``. Raises :class:`~secshadow.errors.UsageError` when noVNC is
    missing (the message says how to install it) or the listen string is bad."""
    endpoint = WebViewerEndpoint(reactor, options.listen, assets=find_novnc(novnc), view_only=options.view_only,
                                 frame_ancestors=frame_ancestors, origins=tuple(origins))
    launcher = browser_launcher(reactor, endpoint) if open_browser else None
    return endpoint, launcher


__all__ = ["BrowserHandle", "browser_side"]
