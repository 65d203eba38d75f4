"""`meritrun contribute`: a pull site trains its partition on its own machines and uploads it.

One command for a laptop, a GPU box or a Job on the site's own cluster (trainer image). Only
outbound connections to the hub's object storage; only final weights leave (and, with
--hub-checkpoints, the checkpoints while training: for machines whose disk does not last).
Each step resumes when the same command runs again with the same --workdir:
  1. ticket: the hub's grant bundle (or a bare assignment, with S3 keys from the environment)
  2. data: each declared source needs examples in --data; other sources are reported, not
     trained on, and recorded (with the file's sha256) in the signed manifest
  3. base model: downloaded once into the workdir (or --base DIR)
  4. build: `train_partition` into a local staging root (checkpoints: resume), then sign
  5. upload: files (those already there are skipped), stale keys removed, manifest last
--sketch-only (a sketch assignment): steps 1-3, then gradient sketches of its sources.
Exit 0 on success; 2 with a last line `error: <reason>` for a MeritRunError; 1: bug.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import shutil
import sys
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from meritrun.access import open_as_site, read_granted_assignment
from meritrun.artifacts import MANIFEST_NAME, PartitionManifest, checkpoint_prefix, write_manifest
from meritrun.assignment import (
    ASSIGNMENT_FORMAT,
    GRANT_FORMAT,
    Assignment,
    SiteData,
    SiteGrant,
    assignment_bytes,
    check_site_data,
    parse_assignment,
    parse_grant,
)
from meritrun.clihelp import DefaultsHelpFormatter
from meritrun.conditions import from_rfc3339
from meritrun.data import group_by_source, iter_examples
from meritrun.errors import ExitCode, MeritRunError, SpecError, StageFailed
from meritrun.keys import site_signing_key
from meritrun.stages import StorageParams
from meritrun.storage import Storage, open_storage, split_uri

log = logging.getLogger("merit_trainer.contribute")
STATE_NAME = "contribution.json"


@dataclass(frozen=True)
class Ticket:
    assignment: Assignment
    storage: Storage  # the run's storage root, opened as the site
    grant: SiteGrant | None


def load_ticket(arg: str, *, now: datetime) -> Ticket:
    """The assignment and storage behind --assignment: a grant bundle, a file or a URI."""
    if arg.startswith("s3://"):
        root, key = split_uri(arg)
        text = open_storage(root).get_bytes(key)  # S3 keys and endpoint from the environment
    else:
        try:
            text = Path(arg).read_bytes()
        except OSError as e:
            raise SpecError(f"cannot read {arg}: {e.strerror}", path="--assignment") from e
    try:
        fmt = json.loads(text).get("format")
    except (ValueError, AttributeError) as e:
        raise SpecError(f"{arg} is not a JSON object", path="--assignment") from e
    if fmt == ASSIGNMENT_FORMAT:
        a = parse_assignment(text, where=arg)
        storage = open_storage(a.storage.uri, endpoint=a.storage.endpoint, region=a.storage.region)
        return Ticket(a, storage, None)
    if fmt != GRANT_FORMAT:
        raise SpecError(f"{arg} is neither a site grant ({GRANT_FORMAT}) nor an assignment "
                        f"({ASSIGNMENT_FORMAT})", path="--assignment")
    grant = parse_grant(text)
    a, storage = read_granted_assignment(grant, now=now)
    return Ticket(a, storage, grant)


def fetch_base(ticket: Ticket, workdir: Path, *, override: Path | None = None) -> Path:
    """A local copy of the base model (downloaded once, then reused on resume)."""
    if override is not None:
        if not override.is_dir():
            raise SpecError(f"--base {override} is not a directory", path="--base")
        return override
    uri = ticket.assignment.base_model
    if not uri.startswith("s3://"):
        path = Path(uri.removeprefix("file://"))
        if not path.is_dir():
            raise SpecError(f"base model {uri} is not reachable from this site; pass --base "
                            "DIR with a copy of it", path="--base")
        return path
    dest, done = workdir / "base", workdir / "base.complete"
    if not done.exists():
        root, key = split_uri(uri)
        storage = (open_as_site(ticket.grant, root) if ticket.grant else
                   open_storage(root, endpoint=ticket.assignment.storage.endpoint,
                                region=ticket.assignment.storage.region))
        log.info("downloading base model %s", uri)
        storage.download_dir(key, dest)
        done.touch()
    return dest


def _bar(total: int, desc: str):
    from tqdm.auto import tqdm

    forced = os.environ.get("MERITRUN_PROGRESS")
    disable = (forced == "0") if forced in ("0", "1") else not sys.stderr.isatty()
    return tqdm(total=total, desc=desc, unit="B", unit_scale=True, unit_divisor=1024,
                file=sys.stderr, disable=disable, dynamic_ncols=True)


def _digest(assignment: Assignment, data: SiteData) -> str:
    """What makes two builds the same build: the assignment and the exact data file."""
    return hashlib.sha256(assignment_bytes(assignment) + data.sha256.encode()).hexdigest()


def build_artifact(ticket: Ticket, data: SiteData, *, base_dir: Path, workdir: Path,
                   hub_checkpoints: bool = False) -> tuple[Path, PartitionManifest]:
    """Train (resuming from workdir checkpoints) into workdir/train/artifact; the manifest.

    With `hub_checkpoints` the checkpoints also go to the hub's storage (the grant covers the
    partition's checkpoint prefix), so a later attempt resumes on another machine too. A
    finished build is recorded in workdir/contribution.json, so a rerun after an interrupted
    upload goes straight to the upload.
    """
    a, state_path = ticket.assignment, workdir / STATE_NAME
    artifact_dir, digest = workdir / "train" / "artifact", _digest(ticket.assignment, data)
    if state_path.is_file():
        state = json.loads(state_path.read_text())
        manifest = PartitionManifest.model_validate(state["manifest"])
        present = all((artifact_dir / rel).is_file()
                      and (artifact_dir / rel).stat().st_size == entry.bytes
                      for rel, entry in manifest.files.items())
        if state.get("build") == digest and present:
            log.info("artifact already built in %s: skipping training", artifact_dir)
            return artifact_dir, manifest
    from .training import train_partition  # torch: only once the inputs are known to be good

    staging = workdir / "staging"  # train_partition publishes here; we upload ourselves
    params = a.train_params(data_uri=str(data.path), base_model=str(base_dir),
                            storage=StorageParams(uri=staging.as_uri()), output="artifact")
    if hub_checkpoints:
        params = params.model_copy(update={"checkpoints": checkpoint_prefix(
            a.run_id, a.partition or a.name)})
    manifest = train_partition(params, workdir=workdir / "train",
                               checkpoint_storage=ticket.storage)
    shutil.rmtree(staging, ignore_errors=True)
    (artifact_dir / MANIFEST_NAME).unlink(missing_ok=True)  # uploaded last, by us, signed
    site_data = {"examples": data.counts, "ignored": data.ignored, "data_sha256": data.sha256}
    manifest = PartitionManifest.model_validate(
        {**manifest.model_dump(mode="json"), "site_data": site_data})
    state_path.write_text(json.dumps({"build": digest,
                                      "manifest": manifest.model_dump(mode="json")}, indent=1))
    return artifact_dir, manifest


def verify_landed(storage: Storage, output: str, *, manifest: PartitionManifest) -> None:
    """Every file the manifest lists is in storage with its size (and sha256 when recorded)."""
    for rel, entry in manifest.files.items():
        info = storage.stat(f"{output}/{rel}")
        if info.bytes != entry.bytes or (info.sha256 and info.sha256 != entry.sha256):
            raise StageFailed(f"{storage.uri_for(output)}/{rel} does not match the manifest "
                              "after upload (was the local artifact changed?)")


def upload_artifact(storage: Storage, output: str, *, artifact_dir: Path,
                    manifest: PartitionManifest, workdir: Path) -> None:
    """Files first (resuming), stale keys removed, the manifest last: it means "complete"."""
    manifest_path = write_manifest(workdir, manifest)
    manifest_key = f"{output}/{MANIFEST_NAME}"
    if storage.exists(manifest_key) and storage.get_bytes(manifest_key) == \
            manifest_path.read_bytes():
        log.info("already published at %s", storage.uri_for(output))
        return
    storage.delete_prefix(manifest_key)  # an older manifest must not vouch for new files
    bar = _bar(sum(e.bytes for e in manifest.files.values()), f"upload {manifest.partition}")
    try:
        uploaded = storage.upload_dir(artifact_dir, output, progress=bar.update)
    finally:
        bar.close()
    for key in storage.list_keys(output):  # the merge refuses files nothing vouches for
        if key[len(output) + 1:] not in manifest.files:
            log.info("removing stale %s", key)
            storage.delete_prefix(key)
    verify_landed(storage, output, manifest=manifest)
    storage.put_file(manifest_key, manifest_path)
    log.info("published %d files to %s", len(uploaded), storage.uri_for(output))


def contribute_sketch(ticket: Ticket, data: SiteData, *, base_dir: Path, workdir: Path) -> str:
    """Gradient sketches of the site's sources (no weights, no data) to the output prefix."""
    from .profiling import profile_sketches, save_sketch_set

    a = ticket.assignment
    groups = group_by_source(iter_examples(data.path, source_field=a.source_field))
    sketches = profile_sketches(base_dir, {s: groups[s] for s in a.sources}, a.profiling,
                                max_seq_len=a.training.max_seq_len)  # count tokens as the hub does
    npy, meta = save_sketch_set(sketches, workdir / "sketch" / "sketch")
    # The run it is for: the hub takes only sketches that name its run's uid.
    meta.write_text(json.dumps({**json.loads(meta.read_text()), "run": a.run,
                                "run_uid": a.run_uid}, indent=2))
    ticket.storage.put_file(f"{a.output}/{npy.name}", npy)
    ticket.storage.put_file(f"{a.output}/{meta.name}", meta)  # last: marks the sketch complete
    return ticket.storage.uri_for(a.output)


def contribute(args: argparse.Namespace) -> str:
    """Run the steps; return a one-paragraph summary for the terminal."""
    from meritrun.signing import sign_manifest

    ticket = load_ticket(args.assignment, now=datetime.now(timezone.utc))
    a = ticket.assignment
    if args.sketch_only != (a.kind == "sketch"):
        raise SpecError(f"this is a {a.kind} assignment; --sketch-only goes with sketch "
                        "assignments only", path="--sketch-only")
    if a.deadline and datetime.now(timezone.utc) > from_rfc3339(a.deadline):
        log.warning("the hub stopped waiting at %s: this contribution will not be merged",
                    a.deadline)
    key = None if args.sketch_only else site_signing_key(args.key, site=a.site,
                                                         registered=a.public_key)
    data = check_site_data(Path(args.data).resolve(), a.sources, source_field=a.source_field)
    workdir = Path(args.workdir or Path("meritrun-contribute") / f"{a.run}-{a.name}-a{a.attempt}")
    workdir = workdir.resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    base_dir = fetch_base(ticket, workdir, override=args.base)
    if args.sketch_only:
        where = contribute_sketch(ticket, data, base_dir=base_dir, workdir=workdir)
        return f"sketches of {', '.join(a.sources)} uploaded to {where}"
    artifact_dir, manifest = build_artifact(ticket, data, base_dir=base_dir, workdir=workdir,
                                            hub_checkpoints=args.hub_checkpoints)
    if key is not None:
        manifest = sign_manifest(manifest, key)
    upload_artifact(ticket.storage, a.output, artifact_dir=artifact_dir, manifest=manifest,
                    workdir=workdir)
    lines = [f"contributed partition {a.partition} (attempt {a.attempt}) of run {a.run} as "
             f"site {a.site}: {manifest.tokens.supervised} supervised tokens, "
             f"{'signed' if manifest.signature else 'unsigned'}",
             f"artifact: {ticket.storage.uri_for(a.output)}"]
    if data.ignored:
        lines.append("not trained on (undeclared): " + ", ".join(
            f"{s} ({n} examples)" for s, n in data.ignored.items()))
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(formatter_class=DefaultsHelpFormatter, prog="meritrun contribute",
                                description="Train and upload this site's part of a MeritRun.")
    p.add_argument("--assignment", required=True,
                   help="the grant file the hub issued (or an assignment file / s3:// URI)")
    p.add_argument("--data", required=True, help="this site's JSONL with the declared sources")
    p.add_argument("--workdir", type=Path, default=None,
                   help="checkpoints and artifact, kept for resume (default: "
                        "./meritrun-contribute/<run>-<partition>-a<attempt>)")
    p.add_argument("--key", type=Path, default=None, help="ed25519 private key to sign with")
    p.add_argument("--base", type=Path, default=None, help="a local copy of the base model")
    p.add_argument("--hub-checkpoints", action="store_true",
                   help="also keep checkpoints (weights and optimizer state, no data) in the "
                        "hub's storage, so another attempt resumes on a fresh machine")
    p.add_argument("--sketch-only", action="store_true",
                   help="upload only gradient sketches of the sources (a sketch assignment)")
    return p


def _configure_logging() -> None:
    root = logging.getLogger()
    if not root.handlers:
        logging.basicConfig(stream=sys.stderr,
                            format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if root.getEffectiveLevel() > logging.INFO:  # `meritrun` defaults to WARNING
        root.setLevel(logging.INFO)
    if os.environ.get("MERITRUN_PROGRESS") != "1":  # transformers' bars flood a Job's log
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # read at its import


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _configure_logging()
    try:
        summary = contribute(args)
    except MeritRunError as e:  # a person reads this: one line, no stage-backend marker
        print("error: " + " ".join(str(e).split()), file=sys.stderr, flush=True)
        return ExitCode.ERROR
    except KeyboardInterrupt:
        print("interrupted: run the same command again to resume", file=sys.stderr)
        return 130
    except Exception as e:  # process boundary: report any bug instead of dying silently
        log.exception("contribute crashed")
        print(f"internal error: {type(e).__name__}: {e}", file=sys.stderr)
        return ExitCode.INTERNAL
    print(summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
