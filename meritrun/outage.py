"""Riding out a short outage in the local runner: a round that cannot observe is retried later.

Storage (or anything else a round observes) that is briefly unreachable raises TransientError
after its own bounded retries (meritrun.storage.policies). The operator turns that into
kopf's TemporaryError; the local runner uses an `Outage`: it says so once, waits with a
doubling delay and tries the round again, so running stages keep running. Only an outage
longer than `limit_s` stops the runner, with a message saying how to resume.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from .errors import TransientError

log = logging.getLogger(__name__)


class Outage:
    """Tracks one outage: when it began, the next delay; `clear()` once a round gets through."""

    def __init__(self, *, limit_s: float = 600.0, first_delay_s: float = 0.5,
                 max_delay_s: float = 8.0, clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], None] = time.sleep) -> None:
        self.limit_s, self.first_delay_s, self.max_delay_s = limit_s, first_delay_s, max_delay_s
        self.clock, self.sleep = clock, sleep
        self.since: float | None = None
        self.delay_s = first_delay_s

    def wait(self, error: TransientError) -> None:
        """Wait before the next try; raise TransientError once the outage outlasts limit_s."""
        now = self.clock()
        if self.since is None:
            self.since = now
            log.warning("%s; running stages go on, retrying the round (up to %.0f s)",
                        error, self.limit_s)
        elif now - self.since > self.limit_s:
            raise TransientError(f"still failing after {now - self.since:.0f} s: {error}; run "
                                 "the same command again to resume") from error
        self.sleep(self.delay_s)
        self.delay_s = min(self.max_delay_s, 2 * self.delay_s)

    def clear(self) -> None:
        if self.since is not None:
            log.warning("reachable again after %.1f s", self.clock() - self.since)
        self.since, self.delay_s = None, self.first_delay_s
