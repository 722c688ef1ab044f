"""One mechanism for "tell me when this has ended": a one-shot observer.

A connection's end, a viewer's exit, a snapshot's completion: each fires exactly
once, and callers may ask before or after it happened. :class:`OneShot` gives every
caller its own Deferred (so one caller's callbacks never change another's result),
fires them all with the one result, and answers late callers at once.
"""

from __future__ import annotations

from typing import Generic, TypeVar

from twisted.internet.defer import Deferred, succeed

T = TypeVar("T")


class OneShot(Generic[T]):
    """Fires every waiter once with one result.

    :meth:`when_done` returns a new Deferred firing with the result (at once when it is
    already known); :meth:`fire` sets the result; a second :meth:`fire` is ignored.
    """

    def __init__(self) -> None:
        self._waiters: list[Deferred[T]] = []
        self._done = False
        self._result: T | None = None

    @property
    def done(self) -> bool:
        """Whether :meth:`fire` was called."""
        return self._done

    def when_done(self) -> Deferred[T]:
        """A Deferred of its own for this caller, firing with the result."""
        if self._done:
            return succeed(self._result)  # type: ignore[arg-type]
        waiter: Deferred[T] = Deferred()
        self._waiters.append(waiter)
        return waiter

    def fire(self, result: T) -> None:
        """Set the result and fire every waiter; later calls do nothing."""
        if self._done:
            return
        self._done, self._result = True, result
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            waiter.callback(result)
