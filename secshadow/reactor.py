"""The reactor a session needs, as a type: time (timers, durations) and TCP
(device connections and the viewer's listener go through endpoints, which use it).

Twisted's reactors and its test reactors (``MemoryReactorClock``) provide it; library
functions take it as a parameter (DESIGN.md: inject the reactor), only ``cli.py``
touches the global one.
"""

from __future__ import annotations

from typing import Any, Callable, Protocol

from twisted.internet.interfaces import IDelayedCall
from twisted.internet.protocol import Factory


class Clock(Protocol):
    """IReactorTime's part a timer needs, structurally (``task.Clock`` provides it)."""

    def seconds(self) -> float: ...

    def callLater(self, delay: float, callable: Callable[..., Any], *args: Any, **kw: Any) -> IDelayedCall: ...


class SessionReactor(Clock, Protocol):
    """IReactorTime plus IReactorTCP, structurally."""

    def connectTCP(self, host: str, port: int, factory: Any, timeout: float = ...,
                   bindAddress: Any = ...) -> Any: ...

    def listenTCP(self, port: int, factory: Any, backlog: int = ..., interface: str = ...) -> Any: ...


def quiet_factory(build: Callable[[], Any]) -> Factory:
    """``Factory.forProtocol(build)`` that logs nothing when it starts and stops.

    A noisy factory logs "Starting factory <factory>" for every connection, and until a
    program begins logging, Twisted keeps its last 64 Ki log events in memory, each
    holding that factory and through ``build`` the whole session: a library user that
    never began logging kept about 26 KiB per finished session (``bench_sessions.py``).
    """
    factory = Factory.forProtocol(build)
    factory.noisy = False
    return factory
