"""The trainer image's entry point: `python -m merit_trainer.stage {train,profile} --params P`.

This is the process boundary between a backend (a local process or a Kubernetes Job) and the
training code: it reads the stage parameters, runs the stage, and turns the outcome into an exit
status plus a last stderr line `MERITRUN_ERROR: <reason>` that the backend copies into the
MeritRun's status. Exit codes are `meritrun.errors.ExitCode`: 4 permanent (bad params, bad
data, a missing file: the pipeline does not retry), 2 another MeritRunError (storage, network),
1 a bug (the traceback is logged). No training logic lives here.
"""

from __future__ import annotations

import argparse
import faulthandler
import logging
import os
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import NoReturn

from pydantic import BaseModel, ValidationError

from meritrun.errors import ERROR_MARKER, ExitCode, MeritRunError, SpecError, exit_code_for
from meritrun.stages import PARAMS_ENV, ProfileParams, TrainParams

from .launch import record_exit

log = logging.getLogger("merit_trainer.stage")  # not __name__: that is "__main__" under -m

ERROR_PREFIX = ERROR_MARKER + " "
EXIT_ERROR, EXIT_INTERNAL = ExitCode.PERMANENT, ExitCode.INTERNAL  # usage errors: permanent


def read_params(path: Path, model: type[BaseModel]) -> BaseModel:
    """Stage parameters from JSON; a missing or invalid file is a SpecError naming it."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as e:
        raise SpecError(f"cannot read {path}: {e.strerror}", path="--params") from e
    try:
        return model.model_validate_json(text)
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "(root)"
        raise SpecError(f"{path}: {where}: {first['msg']} ({e.error_count()} error(s))",
                        path="--params") from e


def run_train(params_path: Path, workdir: Path) -> None:
    params = read_params(params_path, TrainParams)
    from .training import train_partition  # torch-heavy: bad params fail before importing it

    manifest = train_partition(params, workdir=workdir)
    log.info("trained %s: %d supervised tokens", manifest.partition, manifest.tokens.supervised)


def run_profile(params_path: Path, workdir: Path) -> None:
    params = read_params(params_path, ProfileParams)
    from .profiling import run_profile_stage  # another module; torch-heavy, import late

    run_profile_stage(params, workdir=workdir)


STAGES: dict[str, Callable[[Path, Path], None]] = {"train": run_train, "profile": run_profile}


class _Parser(argparse.ArgumentParser):
    """argparse that also ends a usage error with the MERITRUN_ERROR line backends look for."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.print_usage(sys.stderr)
        self.exit(EXIT_ERROR, f"{ERROR_PREFIX}{self.prog}: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="python -m merit_trainer.stage",
                     description="Run one MeritRun trainer stage.")
    sub = parser.add_subparsers(dest="stage", required=True)
    for name in STAGES:
        cmd = sub.add_parser(name, help=f"run the {name} stage")
        from_env = os.environ.get(PARAMS_ENV)
        cmd.add_argument("--params", type=Path, required=not from_env, default=from_env,
                         help=f"stage parameters (JSON); default ${PARAMS_ENV}")
        cmd.add_argument("--workdir", type=Path, default=None,
                         help="scratch and checkpoint directory, kept for resume "
                              "(default: $MERITRUN_WORKDIR, else a temporary directory)")
    return parser


def _configure_logging() -> None:
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if os.environ.get("MERITRUN_PROGRESS") != "1":
        try:  # transformers' own bars would flood a Job's log with carriage returns
            from transformers.utils import logging as hf_logging

            hf_logging.disable_progress_bar()
        except ImportError:
            pass


def _fail(reason: str, code: int) -> int:
    sys.stderr.flush()
    print(ERROR_PREFIX + " ".join(reason.split()), file=sys.stderr, flush=True)
    record_exit(code, reason)  # under merit_trainer.launch: torchrun itself would say 1
    return code


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _configure_logging()
    if in_gang():
        faulthandler.enable()  # a fatal signal in a rank prints every thread's Python stack
    workdir = args.workdir or os.environ.get("MERITRUN_WORKDIR")
    try:
        if workdir:
            STAGES[args.stage](args.params, Path(workdir))
        elif in_gang():  # each rank would get its own tmp
            raise SpecError("the ranks of a torchrun gang need one shared work directory",
                            path="--workdir")
        else:
            with tempfile.TemporaryDirectory(prefix=f"meritrun-{args.stage}-") as tmp:
                STAGES[args.stage](args.params, Path(tmp))
    except MeritRunError as e:
        log.error("%s stage failed: %s", args.stage, e)
        return _fail(str(e), exit_code_for(e))
    except Exception as e:  # process boundary: report any bug instead of dying silently
        log.exception("%s stage crashed", args.stage)
        return _fail(f"internal error: {type(e).__name__}: {e}", EXIT_INTERNAL)
    log.info("%s stage succeeded", args.stage)
    return 0


def in_gang() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def exit_process(code: int) -> NoReturn:
    """Exit with `code`; a rank of a torchrun gang that succeeded skips the interpreter's
    teardown.

    By then the rank has left its process group and has nothing left to do, but Python's
    teardown still destroys torch's C++ objects while gloo's threads may see a peer that has
    already gone: once in a CI run, rank 1 died there with SIGABRT ("terminate called without
    an active exception") after rank 0 had published, and torchrun failed a gang whose work
    was done. Logs are flushed first; nothing else is left to write. A failed rank ends as
    any process does: it fails either way, and its later exit keeps the peer that died first
    the one the Job controller names.
    """
    if code != 0 or not in_gang():
        sys.exit(code)
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    exit_process(main())
