"""Checks every contribution before it is merged; refuses with a named check, never skips.

A partition may come from a machine we do not control, so before merging we check, in order:
its manifest (`missing-file` if absent, `format` if unreadable or of an unknown version), the
site it claims (`site`) and its signature (`signature`) when the partition's expected site or
registered key is known (MergeParams.partitions; a hub-trained partition has neither),
every listed file's size and sha256 (`missing-file`, `sha256`; a file the manifest does not
list is refused as `sha256` too: nothing vouches for it), the base fingerprint
(`base-fingerprint`), the token count (`tokens`), tensor names, shapes and dtypes against the
base (`tensor-name`, `tensor-shape`, `tensor-dtype`; LoRA: targets exist with matching
shapes), second moments when the method needs them (`second-moments`; OTA refuses LoRA),
then one streaming pass over all tensors: NaN/Inf (`non-finite`) and the update norm
||theta_k - theta0||, from which the outlier policy flags (or refuses, `outlier-norm`)
partitions far from the median of the others. Refusals are ContributionRejected values
collected in a Verification; `require_quorum` decides whether the rest may be merged.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

import torch
from pydantic import ValidationError

from meritrun.artifacts import FORMAT_VERSION, MANIFEST_NAME, base_fingerprint, sha256_file
from meritrun.errors import ContributionRejected, StageFailed
from meritrun.signing import verify_manifest_signature
from meritrun.stages import PartitionInput

from .blocks import BlockLoader, block_rows
from .engine import DEFAULT_CHUNK_ELEMENTS
from .io import ModelReader
from .lora import AdapterFormatError
from .methods import MergeMethod
from .moments import MomentReader, MomentsFormatError
from .sources import ExpertReader, PartitionSource

log = logging.getLogger(__name__)

CHECKS = ("sha256", "missing-file", "format", "base-fingerprint", "tensor-name", "tensor-shape",
          "tensor-dtype", "non-finite", "tokens", "second-moments", "outlier-norm", "site",
          "signature")


class QuorumNotMet(StageFailed):
    """Too few partitions passed verification to merge (the stage exits 3)."""

    def __init__(self, message: str, refused: Sequence[ContributionRejected]) -> None:
        super().__init__(message)
        self.refused = list(refused)


@dataclass(frozen=True)
class OutlierFlag:
    partition: str
    norm: float
    median_others: float
    ratio: float
    refused: bool


@dataclass
class Verification:
    accepted: list[PartitionSource] = field(default_factory=list)
    refused: list[ContributionRejected] = field(default_factory=list)
    outliers: list[OutlierFlag] = field(default_factory=list)
    update_norms: dict[str, float] = field(default_factory=dict)
    tensor_norms: dict[str, dict[str, float]] = field(default_factory=dict)
    seconds: float = 0.0


def load_partition(artifact_dir: Path, name: str) -> PartitionSource:
    """The partition's source, from its manifest (refused: missing-file / format)."""
    path = Path(artifact_dir) / MANIFEST_NAME
    if not path.is_file():
        raise ContributionRejected(name, "missing-file", f"{MANIFEST_NAME} is missing")
    try:
        source = PartitionSource.from_artifact(Path(artifact_dir), name=name)
    except (ValidationError, ValueError, OSError) as e:
        raise ContributionRejected(name, "format", f"unreadable manifest: {e}") from e
    if source.manifest.format != FORMAT_VERSION:
        raise ContributionRejected(name, "format", f"manifest format {source.manifest.format!r}"
                                   f" is not the known {FORMAT_VERSION!r}")
    return source


def check_identity(source: PartitionSource, expected: PartitionInput, *, run: str | None = None,
                   attempt: int | None = None) -> None:
    """Trained at the expected site, and signed by its registered key (when either is set).

    A hub-trained partition has neither, so nothing is checked for it. A valid signature only
    vouches for the manifest it covers, so the signed run/partition/attempt must name this
    contribution: else a site's signed artifact could be replayed under another partition.
    """
    name, manifest = source.name, source.manifest
    if manifest is None:
        if expected.site or expected.public_key:
            raise ContributionRejected(name, "format", "no manifest to check site and signature")
        return
    if expected.site and manifest.site != expected.site:
        raise ContributionRejected(name, "site", f"the manifest says site {manifest.site!r}; "
                                   f"the partition is assigned to site {expected.site!r}")
    if not expected.public_key:
        return
    try:
        verify_manifest_signature(manifest, expected.public_key)
    except ContributionRejected as e:  # named after the manifest's claim: use ours
        raise ContributionRejected(name, e.check, e.detail) from e
    claims = {"run": (manifest.run, run), "partition": (manifest.partition, expected.name),
              "attempt": (manifest.attempt, attempt)}
    wrong = [f"{k} {got!r} (expected {want!r})" for k, (got, want) in claims.items()
             if want is not None and got != want]
    if wrong:
        raise ContributionRejected(name, "signature", "the signed manifest is for another "
                                   "contribution: " + ", ".join(wrong))


def check_files(source: PartitionSource, *, hashes: bool = True) -> None:
    """Every listed file present with its size (and sha256); no unlisted file."""
    root, files = source.artifact_dir, source.manifest.files
    for rel, entry in files.items():
        parts = PurePosixPath(rel).parts
        if PurePosixPath(rel).is_absolute() or ".." in parts:
            raise ContributionRejected(source.name, "format", f"file path {rel!r} escapes")
        path = root / rel
        if not path.is_file():
            raise ContributionRejected(source.name, "missing-file", f"{rel} is missing")
        if path.stat().st_size != entry.bytes:
            raise ContributionRejected(source.name, "sha256", f"{rel}: {path.stat().st_size} "
                                       f"bytes, manifest says {entry.bytes}")
        if hashes and sha256_file(path) != entry.sha256:
            raise ContributionRejected(source.name, "sha256", f"{rel}: sha256 does not match")
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        rel = path.relative_to(root).as_posix()
        if rel != MANIFEST_NAME and rel not in files:
            raise ContributionRejected(source.name, "sha256", f"{rel} is not in the manifest")


def check_static(source: PartitionSource, base: ModelReader, base_fp: str,
                 method: MergeMethod, *, strict_dtype: bool = False) -> None:
    """Fingerprint, tokens, tensors against the base, second moments (raises the refusal)."""
    name, manifest = source.name, source.manifest
    if manifest is not None and manifest.base != base_fp:
        raise ContributionRejected(name, "base-fingerprint",
                                   f"trained from {manifest.base}, the base is {base_fp}")
    if source.tokens <= 0:
        raise ContributionRejected(name, "tokens", "supervised token count must be positive")
    try:
        expert = ExpertReader(source, base)
    except (AdapterFormatError, OSError, ValueError) as e:
        raise ContributionRejected(name, "format", f"cannot read {source.model_dir}: {e}") from e
    try:
        if expert.lora is not None:
            _check_lora(name, expert, base)
        else:
            _check_full(name, expert.model, base, strict_dtype=strict_dtype)
    finally:
        expert.close()
    if method.needs_moments:
        _check_moments(source, base, method)


def _check_full(name: str, model: ModelReader, base: ModelReader, *, strict_dtype: bool) -> None:
    missing, extra = set(base.names) - set(model.names), set(model.names) - set(base.names)
    if missing or extra:
        raise ContributionRejected(name, "tensor-name", f"missing {sorted(missing)[:3]}, "
                                   f"unexpected {sorted(extra)[:3]}")
    for t in base.names:
        want, got = base.meta(t), model.meta(t)
        if got.shape != want.shape:
            raise ContributionRejected(name, "tensor-shape", f"{t}: {got.shape} != {want.shape}")
        # fp32 experts of a bf16 base are normal (training upcasts); the merge computes in fp32
        same_kind = got.dtype.is_floating_point and want.dtype.is_floating_point
        if got.dtype != want.dtype and (strict_dtype or not same_kind):
            raise ContributionRejected(name, "tensor-dtype", f"{t}: {got.dtype} != {want.dtype}")


def _check_lora(name: str, expert: ExpertReader, base: ModelReader) -> None:
    lora = expert.lora
    for t in [*lora.targets, *lora.replacements]:
        if t not in base:
            raise ContributionRejected(name, "tensor-name", f"adapter targets {t}, not in base")
        if not base.meta(t).dtype.is_floating_point:
            raise ContributionRejected(name, "tensor-dtype", f"{t}: base tensor is not float")
    for t, target in lora.targets.items():
        try:
            shape = lora.delta_shape(target)
        except AdapterFormatError as e:
            raise ContributionRejected(name, "tensor-shape", str(e)) from e
        if shape != base.meta(t).shape:
            raise ContributionRejected(name, "tensor-shape",
                                       f"{t}: LoRA delta {shape} != base {base.meta(t).shape}")
    for t, key in lora.replacements.items():
        if lora.reader.meta(key).shape != base.meta(t).shape:
            raise ContributionRejected(name, "tensor-shape", f"{t}: saved copy has shape "
                                       f"{lora.reader.meta(key).shape}")


def _check_moments(source: PartitionSource, base: ModelReader, method: MergeMethod) -> None:
    name = source.name
    declared = source.manifest.second_moments if source.manifest is not None else None
    if source.weights == "lora":
        raise ContributionRejected(name, "second-moments", f"method {method.key} needs the "
                                   "second moments of full weights; this is a LoRA adapter")
    if source.moments is None or not source.moments.is_file() or (
            source.manifest is not None and declared is None):
        raise ContributionRejected(name, "second-moments", f"method {method.key} needs "
                                   "optimizer_v.safetensors; the partition has none")
    try:
        reader = MomentReader(source.moments)
    except MomentsFormatError as e:
        raise ContributionRejected(name, "second-moments", str(e)) from e
    try:
        if declared is not None and reader.kind != declared.kind:
            raise MomentsFormatError(f"file kind {reader.kind} != manifest {declared.kind}")
        for t in base.names:
            if base.meta(t).dtype.is_floating_point:
                reader.check(t, base.meta(t).shape)
    except MomentsFormatError as e:
        raise ContributionRejected(name, "second-moments", str(e)) from e
    finally:
        reader.close()


def scan_tensors(sources: Sequence[PartitionSource], base: ModelReader, *, moments: bool,
                 chunk_elements: int = DEFAULT_CHUNK_ELEMENTS
                 ) -> tuple[dict[str, dict[str, float]], list[ContributionRejected]]:
    """One streaming pass: NaN/Inf in weights (and stored second moments), update norms."""
    experts = [ExpertReader(s, base) for s in sources]
    readers = [MomentReader(s.moments) for s in sources] if moments else None
    if readers is not None and all(r.kind == "rank1" for r in readers):
        for r in readers:  # rank-1 factors were checked whole in check_static
            r.close()
        readers = None
    loader = BlockLoader(base, experts, readers, need_base=True)
    names = [s.name for s in sources]
    refused: dict[str, ContributionRejected] = {}
    sq: dict[str, dict[str, float]] = {}
    items = [(m.name, r) for m in map(base.meta, base.names) if m.dtype.is_floating_point
             for r in block_rows(m, chunk_elements, elementwise=True)]
    try:
        for block in loader.blocks(items, torch.device("cpu")):
            name = block.name
            for i, p in enumerate(names):
                if p in refused:
                    continue
                theta = block.experts[i]
                if not bool(torch.isfinite(theta).all()):
                    refused[p] = ContributionRejected(p, "non-finite", f"NaN/Inf in {name}")
                    continue
                v = block.moments[i] if block.moments is not None else None
                if v is not None and not bool((torch.isfinite(v) & (v >= 0)).all()):
                    refused[p] = ContributionRejected(p, "second-moments",
                                                      f"{name}: negative or non-finite moments")
                    continue
                d = (theta - block.base).reshape(-1)
                per = sq.setdefault(name, {})
                per[p] = per.get(p, 0.0) + float(torch.dot(d, d))
    finally:
        loader.close()
    norms = {t: {p: math.sqrt(v) for p, v in per.items() if p not in refused}
             for t, per in sq.items()}
    return norms, list(refused.values())


def median_of_others(norm: float, others: Sequence[float]) -> float:
    """The median of the other partitions' norms; with an even count, the middle value nearer
    to `norm` (so with K = 3 one outlier cannot make the two normal partitions look like
    outliers by dragging the mean of their two 'others' up)."""
    ranked = sorted(others)
    mid = len(ranked) // 2
    if len(ranked) % 2:
        return ranked[mid]
    return min(ranked[mid - 1], ranked[mid], key=lambda v: abs(math.log((v or 1e-300) /
                                                                       (norm or 1e-300))))


def flag_outliers(norms: dict[str, float], factor: float, *, refuse: bool) -> list[OutlierFlag]:
    """Partitions whose update norm is > factor x, or < 1/factor x, the median of the others."""
    flags = []
    for p, n in norms.items():
        others = [v for q, v in norms.items() if q != p]
        if not others:
            continue
        med = median_of_others(n, others)
        ratio = n / med if med > 0 else (math.inf if n > 0 else 1.0)
        if ratio > factor or ratio < 1 / factor:
            flags.append(OutlierFlag(p, n, med, ratio, refuse))
    return flags


def verify_partitions(
    sources: Sequence[PartitionSource], *, base_dir: Path, method: MergeMethod,
    outlier_factor: float = 5.0, refuse_outliers: bool = False,
    hashes_verified: Collection[str] = (),
    strict_dtype: bool = False, chunk_elements: int = DEFAULT_CHUNK_ELEMENTS,
    expected: Mapping[str, PartitionInput] | None = None, run: str | None = None,
) -> Verification:
    """Run every check; the result lists accepted and refused partitions and outliers.

    `hashes_verified` names partitions whose files were sha256-checked on download (their
    sizes are still checked here; hashing them again would read every byte twice).
    `expected` (partition -> its PartitionInput) adds the site and signature checks, and
    `run` the run a signed manifest must name.
    """
    started, result = time.monotonic(), Verification()
    base_fp = base_fingerprint(Path(base_dir))
    survivors = []
    with ModelReader(Path(base_dir)) as base:
        for source in sources:
            try:
                if (want := (expected or {}).get(source.name)) is not None:
                    check_identity(source, want, run=run)
                if source.manifest is not None:
                    check_files(source, hashes=source.name not in hashes_verified)
                check_static(source, base, base_fp, method, strict_dtype=strict_dtype)
                survivors.append(source)
            except ContributionRejected as rejection:
                result.refused.append(rejection)
        norms, scan_refused = scan_tensors(survivors, base, moments=method.needs_moments,
                                           chunk_elements=chunk_elements)
    result.refused += scan_refused
    bad = {r.partition for r in scan_refused}
    survivors = [s for s in survivors if s.name not in bad]
    result.tensor_norms = norms
    result.update_norms = {s.name: math.sqrt(sum(per.get(s.name, 0.0) ** 2
                                                 for per in norms.values())) for s in survivors}
    result.outliers = flag_outliers(result.update_norms, outlier_factor, refuse=refuse_outliers)
    for flag in result.outliers:
        log.warning("partition %s: update norm %.4g is %.2fx the median of the others",
                    flag.partition, flag.norm, flag.ratio)
        if refuse_outliers:
            result.refused.append(ContributionRejected(
                flag.partition, "outlier-norm", f"update norm {flag.norm:.4g} is "
                f"{flag.ratio:.3g}x the median {flag.median_others:.4g} of the others"))
    refused = {r.partition for r in result.refused}
    result.accepted = [s for s in survivors if s.name not in refused]
    result.seconds = round(time.monotonic() - started, 3)
    return result


def require_quorum(accepted: int, total: int, quorum: float,
                   refused: Sequence[ContributionRejected]) -> None:
    """Raise QuorumNotMet unless accepted / total >= quorum (and at least one is accepted)."""
    if total <= 0 or accepted == 0 or accepted / total < quorum - 1e-12:
        reasons = "; ".join(f"{r.partition}: {r.check}" for r in refused) or "none"
        raise QuorumNotMet(f"quorum not met: {accepted}/{total} partitions passed verification, "
                           f"{quorum:.0%} needed (refused: {reasons})", refused)
