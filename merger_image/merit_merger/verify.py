"""The hub's verdict on one contribution when it arrives (stage `verify`), before it counts.

A pull site trains on machines the hub does not control. Checking its artifact on arrival,
not only at the merge, lets a refusal reach the site while it can still re-submit (as the
next attempt), and keeps a bad artifact from holding a place in the quorum. The checks are
the merge's own per-contribution checks (verification.verify_partitions on this one
partition: manifest, sha256 of every file, base fingerprint, tokens, tensor names, shapes and
dtypes, LoRA, second moments for OTA, finite values) plus the site binding and the signature
(checks.check_identity, against this attempt).

Streamed (the default), the contribution's weight files are read once, sequentially: the
pass that hashes each file checks its stored values too (NaN/Inf, magnitude, second
moments); a LoRA adapter's A and B are checked, the full weights they make only at the merge.

Not here: the outlier-norm check. It compares a partition's update norm with the other
partitions', which have not all arrived yet, so it stays in the merge.

A refusal is a result, not a failure: the verdict (`{output}/verdict.json`, a
meritrun.stages.Verdict) is written and the stage exits 0 either way. Only failing to decide
(storage unreachable, base model missing, a malformed registered key, a bug) is an error.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

from pydantic import ValidationError

from meritrun.artifacts import MANIFEST_NAME, VERDICT_NAME, read_manifest, sha256_file
from meritrun.errors import ContributionRejected
from meritrun.stages import PartitionInput, Verdict, VerifyParams

from .fetch import (
    fetch_partition,
    inputs_mode,
    local_root,
    open_base,
    open_partition,
    open_stage_storage,
)
from .job import Candidate, MergeSettings, settings_from_spec
from .methods import get_method
from .remote import mounted
from .sources import PartitionSource
from .verification import verify_partitions

log = logging.getLogger(__name__)


def manifest_digest(artifact_dir: Path) -> str | None:
    """sha256 of the manifest bytes on disk (None when there is none)."""
    path = Path(artifact_dir) / MANIFEST_NAME
    return sha256_file(path) if path.is_file() else None


def verify_contribution(
    candidate: Candidate, *, base_dir: Path, expected: PartitionInput, settings: MergeSettings,
    run: str, attempt: int, hashes_verified: bool = False, manifest_sha256: str | None = None,
    streamed: bool = False,
) -> Verdict:
    """The verdict on one fetched contribution; a refusal from fetching it passes through.

    `hashes_verified`: its files were sha256-checked while downloading (sizes are still
    checked). `manifest_sha256` is recorded in the verdict: which manifest was judged.
    """
    def verdict(refusal: ContributionRejected | None = None) -> Verdict:
        return Verdict(partition=expected.name, attempt=attempt, accepted=refusal is None,
                       run_uid=expected.run_uid,
                       check=refusal.check if refusal else None,
                       detail=refusal.detail if refusal else None,
                       manifest_sha256=manifest_sha256, token_bound=expected.token_bound())

    if isinstance(candidate, ContributionRejected):
        return verdict(candidate)
    result = verify_partitions(
        [candidate], base_dir=base_dir, method=get_method(settings.method),
        outlier_factor=settings.outlier_factor,
        refuse_outliers=False,  # relative to the other partitions: the merge decides that
        hashes_verified={candidate.name} if hashes_verified else (),
        strict_dtype=settings.strict_dtype,
        # site, signature, and the signed run/partition/attempt: checked first, as in a merge
        expected={candidate.name: expected.model_copy(update={"attempt": attempt})}, run=run,
        streamed=streamed)
    return verdict(result.refused[0] if result.refused else None)


def _unchanged(candidate: Candidate, artifact_dir: Path) -> Candidate:
    """Refuse a manifest that changed after it was read: the verdict must name what it judged.

    (Downloading the prefix fetches manifest.json a second time; the grant is revoked before
    verification, so this only catches a site racing its own revocation.)
    """
    if not isinstance(candidate, PartitionSource):
        return candidate
    try:
        same = read_manifest(artifact_dir) == candidate.manifest
    except (OSError, ValidationError, ValueError):
        same = False
    if same:
        return candidate
    return ContributionRejected(candidate.name, "sha256",
                                f"{MANIFEST_NAME} changed while the artifact was fetched")


def run_verify_stage(params: VerifyParams, *, workdir: Path) -> Verdict:
    """Fetch (or mount) the base and the contribution, judge it, write
    `{output}/verdict.json`. Streamed (the default, see fetch.inputs_mode), every weight file
    is read once: the sequential pass that hashes it also checks its values; the update norm
    is not judged here (see the module docstring)."""
    from meritrun.storage import fetch_path

    storage, workdir, part = open_stage_storage(params), Path(workdir), params.partition
    where = {"endpoint": params.storage.endpoint, "region": params.storage.region}
    streamed = inputs_mode() == "stream"
    # The base first: if it (or the storage) is unreachable there is nothing to decide.
    if streamed:
        base_dir, mounts = open_base(params.base_model, workdir / "cache", **where)
    else:
        base_dir, mounts = fetch_path(params.base_model, workdir / "cache", **where), {}
    dest = workdir / "partitions" / part.name
    shutil.rmtree(dest, ignore_errors=True)  # a stale file from a reused workdir is no refusal
    if streamed:
        candidate, more = open_partition(storage, part.name, part.prefix, dest)
        mounts |= more
        checked, artifact_dir = isinstance(candidate, PartitionSource), dest
    else:
        candidate, checked = fetch_partition(storage, part.name, part.prefix, dest)
        root = local_root(storage)
        artifact_dir = root / part.prefix if root is not None else dest
        candidate = _unchanged(candidate, artifact_dir)
    with mounted(mounts):
        verdict = verify_contribution(
            candidate, base_dir=base_dir, expected=part,
            settings=settings_from_spec(params.merge, device="cpu"),  # the verify Job: no GPU
            run=params.run, attempt=params.attempt, hashes_verified=checked,
            manifest_sha256=manifest_digest(artifact_dir), streamed=streamed)
    storage.put_bytes(f"{params.output}/{VERDICT_NAME}",
                      verdict.model_dump_json(indent=2).encode())
    if verdict.accepted:
        log.info("verdict: partition %s attempt %d accepted (manifest sha256 %s)",
                 part.name, params.attempt, verdict.manifest_sha256)
    else:
        log.warning("verdict: partition %s attempt %d refused (%s): %s",
                    part.name, params.attempt, verdict.check, verdict.detail)
    return verdict
