"""One family of errors for the whole project.

Only the operator translates these into kopf's PermanentError/TemporaryError; the CLI turns
them into a message and a non-zero exit. Everything else raises them `from` the cause.
"""

from __future__ import annotations

from collections.abc import Iterable
from enum import IntEnum

ERROR_MARKER = "MERITRUN_ERROR:"  # a stage's last stderr line: its one-line reason


class ExitCode(IntEnum):
    """How every stage process (trainer, merger, contribute) ends; backends read it back."""

    OK = 0
    INTERNAL = 1  # a bug (traceback logged): retried
    ERROR = 2  # a MeritRunError that another attempt may not meet (storage, network): retried
    QUORUM = 3  # the merge found too few trustworthy contributions: a verdict on the inputs
    PERMANENT = 4  # deterministic (invalid params, bad data, a missing file): never retried
    INVALID_SPEC = 5  # the spec asks for what the stage cannot do: InvalidSpec on the run


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


class WorkdirError(MeritRunError):
    """A local workdir holds another run (or another spec), or another runner is using it."""


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


PERMANENT_ERRORS: tuple[type[MeritRunError], ...] = (SpecError, DataError, ObjectNotFound)


def exit_code_for(error: BaseException) -> ExitCode:
    """The exit code a stage ends with for `error`: INVALID_SPEC for a SpecError naming a
    spec field (`spec.…`: only a changed spec can help), PERMANENT when retrying cannot help."""
    if isinstance(error, SpecError) and error.path.startswith("spec."):
        return ExitCode.INVALID_SPEC
    if isinstance(error, PERMANENT_ERRORS):
        return ExitCode.PERMANENT
    return ExitCode.ERROR if isinstance(error, MeritRunError) else ExitCode.INTERNAL


def most_decisive(codes: Iterable[int | None]) -> int | None:
    """Of a gang's exit codes, the one that decides a retry: a spec verdict outranks a
    permanent one, which outranks any other failure, which outranks success (None: none)."""
    rank = {ExitCode.INVALID_SPEC: 3, ExitCode.PERMANENT: 2, ExitCode.OK: 0}
    return max((c for c in codes if c is not None), key=lambda c: rank.get(c, 1), default=None)


def error_line(reason: str) -> str:
    """The marker line a stage prints last (one line, whatever the reason held)."""
    return f"{ERROR_MARKER} {' '.join(reason.split())}"


def find_error_line(lines: Iterable[str], *, limit: int = 500) -> str | None:
    """The reason of the last marker line among `lines` (a log, a termination message)."""
    found = None
    for line in lines:
        if line.startswith(ERROR_MARKER):
            found = line[len(ERROR_MARKER):].strip()[:limit]
    return found
