"""A trial worker's reports to Ray Train, handed over from a thread of their own.

`ray.train.report` blocks until Train's controller has collected the previous report: the
worker has a one-slot queue, emptied once per controller poll. A loop that reported inline
waited for that poll at every epoch, and a short poll interval (what kept that wait small)
made the controller, the worker and Train's synchronisation actor wake many times a second,
CPU a small machine's training threads then lost.

Here the loop hands each epoch's row to a `Reporter` and goes on. While a report is still
waiting to be collected, new rows gather in the loop and travel together in the next report:
the latest epoch's row, with the rows before it under `EARLIER` (`pack`). Train's controller
callback unpacks them in order (`unpack`), so every epoch still reaches Tune once, however short
the epochs and however long the poll. No torch here: the controller imports this module too.
"""

from __future__ import annotations

import queue
import threading
from typing import Any, Callable

EARLIER = "earlier_epochs"  # in a report: the rows of the epochs before its own, oldest first


def pack(rows: list[dict]) -> dict:
    """One report's metrics for `rows` (oldest first): the last row, carrying the others."""
    if not rows:
        raise ValueError("a report needs at least one epoch row")
    return {**rows[-1], EARLIER: [dict(r) for r in rows[:-1]]}


def unpack(metrics: dict) -> list[dict]:
    """The epoch rows one report carries, oldest first (a report without `EARLIER`: itself)."""
    metrics = dict(metrics)
    earlier = metrics.pop(EARLIER, None) or []
    return [*earlier, metrics]


class Reporter:
    """Calls `report(metrics, **kwargs)` (ray.train.report) from a daemon thread, one report at
    a time. `idle()` says whether the last one has been collected; `send` hands over the next
    without waiting; `wait` blocks until it is collected. An error raised by a report is raised
    again by the next `send`, `wait` or `close` of the loop's thread. `after(rows)` runs in the
    thread once a report's rows are collected (the worker's wall-time ledger)."""

    def __init__(self, report: Callable[..., Any], after: Callable[[list[dict]], None] | None = None):
        self._report, self._after = report, after
        self._jobs: queue.Queue = queue.Queue()
        self._done = threading.Event()
        self._done.set()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="raysweep-report", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                return
            rows, kwargs = job
            try:
                self._report(pack(rows), **kwargs)
                if self._after is not None:
                    self._after(rows)
            except BaseException as err:  # handed to the loop's thread
                self._error = err
            finally:
                self._done.set()

    def _raise(self) -> None:
        if self._error is not None:
            err, self._error = self._error, None
            raise err

    def idle(self) -> bool:
        return self._done.is_set()

    def send(self, rows: list[dict], **kwargs) -> None:
        """Hand over `rows` (oldest first) as one report; waits first if one is still out."""
        self.wait()
        self._done.clear()
        self._jobs.put((list(rows), kwargs))

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the report handed over last is collected (False: `timeout` passed)."""
        done = self._done.wait(timeout)
        self._raise()
        return done

    def close(self, timeout: float | None = None) -> bool:
        """Wait for the last report, then end the thread."""
        try:
            return self.wait(timeout)
        finally:
            self._jobs.put(None)
