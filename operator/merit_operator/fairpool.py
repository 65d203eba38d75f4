"""A thread pool that serves its callers in turn: one task per caller at a time, round-robin.

The operator's Job creations share one pool. First come, first served, a run that starts
while others have hundreds of creations queued (their K partitions each) waits for all of
them before its first Job exists, and its next stage waits for that Job: started together,
the last runs finished seconds after the rest. Here each run has its own queue and the
threads take one task from each run with work in turn (the API server's priority and
fairness does the same per flow), so a run's one creation never waits behind another run's
backlog, and no run is starved.

What it does not do: limit a run's share beyond the turn (all threads may serve one run when
it alone has work), or order a run's own tasks other than first in, first out.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable, Hashable
from concurrent.futures import Future
from typing import Any

Task = tuple[Future[Any], Callable[..., Any], tuple[Any, ...], dict[str, Any]]


class FairPool:
    """`submit(key, fn, *args)`: a Future, run when `key`'s turn comes."""

    def __init__(self, threads: int, *, name: str = "fair") -> None:
        self._queues: dict[Hashable, deque[Task]] = {}
        self._turns: deque[Hashable] = deque()  # keys with queued tasks, next first
        self._ready = threading.Condition()
        self._closed = False
        self._threads = [threading.Thread(target=self._work, name=f"{name}_{i}", daemon=True)
                         for i in range(max(threads, 1))]
        for thread in self._threads:  # all running before the first task (no start-up wait)
            thread.start()

    def submit(self, key: Hashable, fn: Callable[..., Any], /, *args: Any,
               **kwargs: Any) -> Future[Any]:
        future: Future[Any] = Future()
        with self._ready:
            if self._closed:
                raise RuntimeError("cannot submit to a closed pool")
            queue = self._queues.get(key)
            if queue is None:
                queue = self._queues[key] = deque()
                self._turns.append(key)
            queue.append((future, fn, args, kwargs))
            self._ready.notify()
        return future

    def _next(self) -> Task | None:
        with self._ready:
            while not self._turns and not self._closed:
                self._ready.wait()
            if not self._turns:
                return None
            key = self._turns.popleft()
            queue = self._queues[key]
            task = queue.popleft()
            if queue:
                self._turns.append(key)  # its next task after every other key's
            else:
                del self._queues[key]
            return task

    def _work(self) -> None:
        while (task := self._next()) is not None:
            future, fn, args, kwargs = task
            if not future.set_running_or_notify_cancel():
                continue
            try:
                result = fn(*args, **kwargs)
            except BaseException as e:  # noqa: BLE001 - handed to the caller, as a pool does
                future.set_exception(e)
            else:
                future.set_result(result)

    def shutdown(self, *, cancel_futures: bool = False) -> None:
        """Take no more tasks; queued ones are cancelled (`cancel_futures`) or still run."""
        with self._ready:
            self._closed = True
            if cancel_futures:
                for queue in self._queues.values():
                    for future, *_ in queue:
                        future.cancel()
                self._queues.clear()
                self._turns.clear()
            self._ready.notify_all()
