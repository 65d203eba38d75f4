"""Entry point of the merger image: `python -m merit_merger.stage merge|search|verify --params P`.

`merge` reads MergeParams, reads the base and every partition artifact from storage (by
default where they lie, with ranged GETs, each file sha256-verified in one sequential pass
before the merge pass reads it again; with MERITRUN_INPUTS=stage downloaded to the workdir
first, verified on the way: see fetch. A corrupt or missing file is a refusal of that
partition, not a crash), runs the merge job (verify, quorum, merge, report; with a
held-out file, the scores of base, partitions and merged model) in the workdir and
uploads `{output}/model/`, the plot and recipe, and `{output}/merge_report.json`
LAST (its presence means the merge is complete). When the quorum is not met only the report
is uploaded. `search` hands SearchParams to the mixture search (merit_merger.search).
`verify` judges one arriving contribution (merit_merger.verify) and writes its verdict; a
refusal is a verdict, so it exits 0 too.

Exit codes are `meritrun.errors.ExitCode`: 0 success; 1 a bug (traceback logged); 2 an error
another attempt may not meet; 3 quorum not met after refusals; 4 permanent (bad params, bad
data, a missing file: not retried). Every failure ends with `MERITRUN_ERROR: <reason>`.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
from pathlib import Path

from pydantic import ValidationError

from meritrun.errors import (
    ExitCode,
    MeritRunError,
    SpecError,
    error_line,
    exit_code_for,
)
from meritrun.stages import MergeParams, SearchParams, VerifyParams, stages_of

from .fetch import fetch_partition, inputs_mode, open_base, open_partition, open_stage_storage
from .job import run_merge_job, settings_from_spec
from .remote import mounted
from .report import REPORT_NAME
from .sources import PartitionSource
from .verification import QuorumNotMet
from .verify import run_verify_stage

log = logging.getLogger(__name__)

EXIT_ERROR, EXIT_MERITRUN, EXIT_QUORUM = ExitCode.INTERNAL, ExitCode.ERROR, ExitCode.QUORUM


def stamp_report(path: Path, params: MergeParams) -> None:
    """Name the run in merge_report.json: the hub ignores a report of another run uid."""
    report = json.loads(path.read_text())
    report.update(run=params.run, run_uid=params.run_uid)
    path.write_text(json.dumps(report, indent=1))


def run_merge_stage(params: MergeParams, *, workdir: Path) -> dict:
    """Fetch (or mount), merge, upload; returns the report (raises QuorumNotMet after
    uploading it)."""
    from meritrun.storage import fetch_path

    storage, workdir = open_stage_storage(params), Path(workdir)
    where = {"endpoint": params.storage.endpoint, "region": params.storage.region}
    # scoring base and partitions on a held-out file loads them with transformers, from files
    streamed = inputs_mode() == "stream" and not params.held_out
    # as the trainer: the backend shares cores. The scan and the merge take the count; torch,
    # imported only where it is needed, is told up front where it surely is (scores)
    threads = int(os.environ["MERITRUN_TORCH_THREADS"]) if os.environ.get(
        "MERITRUN_TORCH_THREADS") else None
    if threads and params.held_out:
        import torch

        torch.set_num_threads(threads)
    mounts: dict = {}
    if streamed:
        base_dir, mounts = open_base(params.base_model, workdir / "cache", **where)
    else:
        base_dir = fetch_path(params.base_model, workdir / "cache", **where)
    candidates, verified, locations = [], set(), {}
    for part in params.partitions:
        dest = workdir / "partitions" / part.name
        if streamed:
            candidate, more = open_partition(storage, part.name, part.prefix, dest)
            mounts |= more
            checked = isinstance(candidate, PartitionSource)  # its small files, downloading
        else:
            candidate, checked = fetch_partition(storage, part.name, part.prefix, dest)
        candidates.append(candidate)
        if checked:
            verified.add(part.name)
        locations[part.name] = storage.uri_for(f"{part.prefix}/model")
    held_out = (fetch_path(params.held_out, workdir / "data", **where)
                if params.held_out else None)
    out_dir = workdir / "merged"
    storage.delete_prefix(f"{params.output}/{REPORT_NAME}")  # a stale report must not vouch
    try:
        with mounted(mounts):
            outcome = run_merge_job(
                base_dir=base_dir, candidates=candidates,
                settings=settings_from_spec(params.merge, planned=params.planned,
                                            required=params.required, threads=threads),
                out_dir=out_dir, base_uri=params.base_model, locations=locations,
                hashes_verified=frozenset(verified),
                expected={part.name: part for part in params.partitions}, run=params.run,
                held_out=held_out, streamed=streamed)
    except QuorumNotMet:
        if (out_dir / REPORT_NAME).is_file():
            stamp_report(out_dir / REPORT_NAME, params)
            storage.put_file(f"{params.output}/{REPORT_NAME}", out_dir / REPORT_NAME)
        raise
    storage.upload_dir(outcome.model_dir, f"{params.output}/model", skip_existing=False)
    for path in outcome.extra_files:
        storage.put_file(f"{params.output}/{path.name}", path)
    stamp_report(outcome.report_path, params)
    storage.put_file(f"{params.output}/{REPORT_NAME}", outcome.report_path)
    log.info("merged model at %s", storage.uri_for(f"{params.output}/model"))
    return outcome.report


def run_search(params: SearchParams, *, workdir: Path) -> dict:
    try:
        from .search import run_search_stage
    except ImportError:  # the search engineer's entry point may live in cli_search
        from .cli_search import run_search_stage
    return run_search_stage(params, workdir=workdir)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m merit_merger.stage")
    sub = parser.add_subparsers(dest="stage", required=True)
    for stage in ("merge", "search", "verify"):
        p = sub.add_parser(stage)
        p.add_argument("--params", required=True, type=Path, help="stage params JSON")
        p.add_argument("--workdir", type=Path, help="scratch dir (default: a temp dir)")
    return parser


STAGE_PARAMS = stages_of("merger")


def _load(stage: str, path: Path) -> MergeParams | SearchParams | VerifyParams:
    model = STAGE_PARAMS[stage]
    try:
        return model.model_validate_json(Path(path).read_text())
    except (OSError, ValidationError) as e:
        raise SpecError(f"bad {stage} params {path}: {e}", path="params") from e


def _fail(code: int, reason: str) -> int:
    print(error_line(reason), file=sys.stderr, flush=True)
    return code


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        params = _load(args.stage, args.params)
        with tempfile.TemporaryDirectory(prefix=f"meritrun-{args.stage}-") as tmp:
            workdir = args.workdir or Path(tmp)
            if args.stage == "merge":
                run_merge_stage(params, workdir=workdir)
            elif args.stage == "verify":
                run_verify_stage(params, workdir=workdir)
            else:
                run_search(params, workdir=workdir)
        return 0
    except QuorumNotMet as e:
        log.error("%s", e)
        return _fail(EXIT_QUORUM, str(e))
    except MeritRunError as e:
        log.error("%s", e)
        return _fail(exit_code_for(e), str(e))
    except Exception as e:  # noqa: BLE001 - the process boundary: log the traceback, exit 1
        log.exception("%s stage failed", args.stage)
        return _fail(EXIT_ERROR, f"{type(e).__name__}: {e}")


if __name__ == "__main__":
    sys.exit(main())
