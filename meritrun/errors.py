"""One family of errors for the whole project.

Only the operator translates these into kopf's PermanentError/TemporaryError; the CLI turns
them into a message and a non-zero exit. Everything else raises them `from` the cause.
"""

from __future__ import annotations


class MeritRunError(Exception):
    """Base of every error MeritRun raises on purpose."""


class SpecError(MeritRunError):
    """A MeritRun spec (or a CLI argument standing in for one) is invalid.

    `path` names the field, e.g. ``spec.training.learningRate``.
    """

    def __init__(self, message: str, *, path: str = "spec") -> None:
        super().__init__(f"{path}: {message}")
        self.path = path
        self.reason = message


class DataError(MeritRunError):
    """An input data file is malformed; the message names the file and line."""


class StorageError(MeritRunError):
    """Object storage refused or failed an operation that retrying will not fix."""


class ObjectNotFound(StorageError):
    """A key (or a bucket) does not exist."""


class IntegrityError(StorageError):
    """A downloaded object does not match its recorded sha256 or size."""


class TransientError(MeritRunError):
    """A failure that may go away by itself (network, throttling): retry with backoff."""


class ContributionRejected(MeritRunError):
    """A partition artifact failed verification and must not be merged.

    `partition` and `check` say which contribution and which check refused it.
    """

    def __init__(self, partition: str, check: str, detail: str) -> None:
        super().__init__(f"partition {partition!r} refused by check {check!r}: {detail}")
        self.partition = partition
        self.check = check
        self.detail = detail


class StageFailed(MeritRunError):
    """A pipeline stage (profile, train, merge) could not complete."""
