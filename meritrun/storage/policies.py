"""How hard S3 transfers try: retry and multipart settings, as small frozen values.

Kept apart so callers (the CLI, the operator's settings, tests) can build them without
importing the S3 client.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

MiB = 1 << 20


@dataclass(frozen=True)
class RetryPolicy:
    """attempts: tries in all (1 = no retry); delays double from base_delay_s up to max.

    deadline_s bounds one call's whole retrying, timeouts included: no retry starts past it.
    With the S3 client's socket timeouts (connect_timeout_s, read_timeout_s: the longest wait
    for the next bytes, not for a whole transfer) a hung server gives up in about
    deadline_s + read_timeout_s, while a server down for a few seconds (a restart) is
    outlasted: the delays 0.2, 0.4, 0.8, 1.6, 3.2 s add up to about 6 s.
    """

    attempts: int = 8
    base_delay_s: float = 0.2
    max_delay_s: float = 5.0
    deadline_s: float = 20.0
    connect_timeout_s: float = 3.0
    read_timeout_s: float = 10.0

    def __post_init__(self) -> None:
        if self.attempts < 1 or self.base_delay_s < 0 or self.max_delay_s < 0:
            raise ValueError("attempts must be >= 1 and delays >= 0")
        if not (self.deadline_s > 0 and self.connect_timeout_s > 0 and self.read_timeout_s > 0):
            raise ValueError("deadline_s and the timeouts must be > 0")

    def delay_s(self, attempt: int) -> float:
        return min(self.max_delay_s, self.base_delay_s * 2 ** (attempt - 1)) * random.uniform(
            0.5, 1.0
        )


@dataclass(frozen=True)
class MultipartPolicy:
    """Files over threshold_bytes go up in part_bytes parts (S3 allows 5 MiB to 5 GiB)."""

    threshold_bytes: int = 64 * MiB
    part_bytes: int = 16 * MiB
    parallel: int = 3

    def __post_init__(self) -> None:
        if not 5 * MiB <= self.part_bytes <= 5 * 1024 * MiB:
            raise ValueError("part_bytes must be between 5 MiB and 5 GiB")
        if self.threshold_bytes > 5 * 1024 * MiB:
            raise ValueError("threshold_bytes must be at most 5 GiB (the single-PUT limit)")

    def part_size_for(self, size: int) -> int:
        """minio uploads in one PUT when the part size covers the whole file."""
        return self.part_bytes if size > self.threshold_bytes else max(size, 5 * MiB)
