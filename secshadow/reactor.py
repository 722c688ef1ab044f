"""The reactor a session needs, as a type: time (timers, durations) and TCP
(device connections and the viewer's listener go through endpoints, which use it).

Twisted's reactors and its test reactors (``MemoryReactorClock``) provide it; library
functions take it as a parameter (DESIGN.md: inject the reactor), only ``cli.py``
touches the global one.
"""

from __future__ import annotations

from typing import Any, Callable, Protocol

from twisted.internet.interfaces import IDelayedCall


class Clock(Protocol):
    """IReactorTime's part a timer needs, structurally (``task.Clock`` provides it)."""

    def seconds(self) -> float: ...

    def callLater(self, delay: float, callable: Callable[..., Any], *args: Any, **kw: Any) -> IDelayedCall: ...


class SessionReactor(Clock, Protocol):
    """IReactorTime plus IReactorTCP, structurally."""

    def connectTCP(self, host: str, port: int, factory: Any, timeout: float = ...,
                   bindAddress: Any = ...) -> Any: ...

    def listenTCP(self, port: int, factory: Any, backlog: int = ..., interface: str = ...) -> Any: ...
