"""`python -m merit_trainer.launch [torchrun options] -m merit_trainer.stage ...`: torchrun
that keeps the stage's verdict.

torchrun ends with exit code 1 whatever its ranks ended with, and its failure report pushes
the stage's `MERITRUN_ERROR` line out of the log tail a pod's termination message keeps. Then
a spec the image cannot serve (GPUs requested, no CUDA) or bad data would be retried as a
crash. This wrapper takes the same arguments as `torch.distributed.run`, refuses GPUs the
image cannot use before starting any rank, gives the ranks a directory to leave their exit
code and reason in (stage.py writes it), and when torchrun fails ends with the most decisive
rank's code and its error line last. No training logic lives here.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import tempfile
from pathlib import Path

from meritrun.errors import MeritRunError, error_line, exit_code_for, most_decisive

log = logging.getLogger("merit_trainer.launch")

EXITS_ENV = "MERITRUN_EXITS_DIR"  # where each rank leaves rank-<n>.json: {"code", "reason"}


def record_exit(code: int, reason: str) -> None:
    """A rank's verdict for the launcher (nothing when no launcher asked for it)."""
    where = os.environ.get(EXITS_ENV)
    if not where:
        return
    rank = os.environ.get("RANK", "0")
    try:
        (Path(where) / f"rank-{rank}.json").write_text(json.dumps({"code": code,
                                                                    "reason": reason}))
    except OSError as e:  # the exit code still says what happened, only less precisely
        log.warning("cannot record the exit verdict in %s: %s", where, e)


def gang_verdict(where: Path) -> tuple[int, str] | None:
    """(exit code, reason) of the most decisive rank that recorded one, or None."""
    verdicts = []
    for path in sorted(where.glob("rank-*.json")):
        try:
            verdicts.append(json.loads(path.read_text()))
        except (OSError, ValueError):
            continue
    code = most_decisive(int(v["code"]) for v in verdicts)
    if code is None:
        return None
    return code, next(v["reason"] for v in verdicts if int(v["code"]) == code)


def main(argv: list[str] | None = None) -> int:
    from torch.distributed.run import main as torchrun

    from .dist import choose_device

    argv = sys.argv[1:] if argv is None else argv
    try:
        choose_device(0)  # GPUs the image cannot use: say so once, before N ranks say it
    except MeritRunError as e:
        print(error_line(str(e)), file=sys.stderr, flush=True)
        return exit_code_for(e)
    with tempfile.TemporaryDirectory(prefix="meritrun-exits-") as where:
        os.environ[EXITS_ENV] = where  # the ranks inherit it
        try:
            torchrun(argv)
            return 0
        except (Exception, SystemExit) as e:  # ChildFailedError; torchrun already reported it
            verdict = gang_verdict(Path(where))
            if verdict is None:
                return e.code if isinstance(e, SystemExit) and isinstance(e.code, int) else 1
        finally:
            os.environ.pop(EXITS_ENV, None)
    code, reason = verdict
    print(error_line(reason), file=sys.stderr, flush=True)
    return code


if __name__ == "__main__":
    sys.exit(main())
