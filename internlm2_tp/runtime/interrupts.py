"""Ctrl-C and SIGTERM for the driver: stop promptly, but never half-way through writing.

While the job runs, SIGINT raises KeyboardInterrupt and SIGTERM raises `Terminated`, as usual,
except inside a `critical()` section (adding a row to a shard, writing a shard): there the
signal is remembered and raised when the section ends. So a shard is either written and its rows
dropped from the buffer, or neither, and the `finally` that flushes the buffer never writes a row
twice.

Raised from a signal handler, the exception can surface somewhere else: inside Ray's Cython
calls it comes out as `SystemError(...)` chained to it, and a broad `except Exception` around
a Ray call may take that for a failed group. So the signal is also remembered (`received`), and
`check()` re-raises it at the driver's safe points: a Ctrl-C is never swallowed or mislabelled.
"""
from __future__ import annotations

import contextlib
import signal
import threading
from typing import Any, Iterator


class Terminated(BaseException):
    """SIGTERM (e.g. `ray job stop`, a scheduler's preemption): treated like Ctrl-C."""


def interrupt_in(e: BaseException) -> BaseException | None:
    """The KeyboardInterrupt / Terminated that `e` is, or was raised from (cause or context)."""
    seen: set[int] = set()
    cur: BaseException | None = e
    while cur is not None and id(cur) not in seen:
        if isinstance(cur, (KeyboardInterrupt, Terminated)):
            return cur
        seen.add(id(cur))
        cur = cur.__cause__ or cur.__context__
    return None


class InterruptGuard:
    def __init__(self) -> None:
        self.depth = 0
        self.pending: int | None = None
        self.received: int | None = None
        self._old: dict[int, Any] = {}

    def __enter__(self) -> InterruptGuard:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)
        self._old.clear()

    def _handle(self, signum: int, frame: Any) -> None:
        self.received = signum
        if self.depth:
            self.pending = signum
            return
        self._raise(signum)

    @staticmethod
    def _raise(signum: int) -> None:
        if signum == signal.SIGTERM:
            raise Terminated("SIGTERM")
        raise KeyboardInterrupt

    def check(self) -> None:
        """Raise the interrupt received during this run, if any (whatever it turned into)."""
        if self.received is not None:
            self._raise(self.received)

    @contextlib.contextmanager
    def critical(self, reraise: bool = True) -> Iterator[None]:
        """Defer SIGINT/SIGTERM until the block ends; `reraise=False` when already unwinding."""
        self.depth += 1
        try:
            yield
        finally:
            self.depth -= 1
        if self.depth == 0 and self.pending is not None and reraise:
            signum, self.pending = self.pending, None
            self._raise(signum)
