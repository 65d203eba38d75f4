"""Checks every contribution before it is merged; refuses with a named check, never skips.

The per-partition checks live in `checks` (shared with the verify stage); this module adds the
streaming scan and the outlier policy, which need all partitions, and the quorum.

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
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from meritrun.errors import ContributionRejected, StageFailed
from meritrun.pipeline import quorum as quorum_rule
from meritrun.stages import PartitionInput

from . import valuescan
from .checks import check_files, check_identity, check_plan, check_static
from .engine import DEFAULT_CHUNK_ELEMENTS
from .io import ModelReader, block_rows
from .methods import MergeMethod, Rank1Moment
from .moments import MomentReader
from .sources import ExpertReader, PartitionSource
from .streamcheck import check_stream, model_fingerprint

if TYPE_CHECKING:
    import torch

    from .blocks import Block

log = logging.getLogger(__name__)

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


class NormScan:
    """Per block of a pass over base + experts: the theta checks (NaN/Inf, magnitude, stored
    second moments) and each expert's squared update norm per tensor.

    The verification scan calls it on every block; a streamed merge hands it to the merge
    pass instead (`merge_models(observe=...)`), where a refusal stops the merge at once
    (raised) so the job can merge the others. The torch pass calls it on its blocks; the
    fused pass judges its units itself (`fusedscan`, by the same rule) and hands over the
    judgments (`judged`), in unit order.
    """

    def __init__(self, names: Sequence[str], *, raise_refusals: bool = False) -> None:
        self.names, self.raise_refusals = list(names), raise_refusals
        self.refused: dict[str, ContributionRejected] = {}
        self.sq: dict[str, dict[str, float]] = {}

    def __call__(self, block: Block) -> None:
        if block.raw is not None or block.base is None:
            return
        base = _flat(block.base)
        judgments: list[tuple[tuple[str, str] | None, float] | None] = []
        for i, p in enumerate(self.names):
            if p in self.refused:
                judgments.append(None)
                continue
            v = block.moments[i] if block.moments is not None else None
            stored = None if v is None or isinstance(v, Rank1Moment) else _flat(v)
            judgments.append(valuescan.judge_block(block.name, base, _flat(block.experts[i]),
                                                   stored))
        self.judged(block.name, judgments)

    def judged(self, tensor: str,
               judgments: Sequence[tuple[tuple[str, str] | None, float] | None]) -> None:
        """One block's (or fused unit's) judgment per partition, in `names` order: (problem
        or None, its squared update norm); None: not judged."""
        for p, judgment in zip(self.names, judgments, strict=True):
            if p in self.refused or judgment is None:
                continue
            problem, sq = judgment
            if problem is not None:
                self.refused[p] = ContributionRejected(p, *problem)
                if self.raise_refusals:
                    raise self.refused[p]
                continue
            per = self.sq.setdefault(tensor, {})
            per[p] = per.get(p, 0.0) + sq

    def norms(self) -> dict[str, dict[str, float]]:
        return {t: {p: math.sqrt(v) for p, v in per.items() if p not in self.refused}
                for t, per in self.sq.items()}


def _flat(t: torch.Tensor) -> np.ndarray:
    """A torch block as a flat fp32 array for `valuescan.judge_block` (the same sums, bit for
    bit, as the numpy scan's: a streamed merge's report equals a staged one's)."""
    return t.detach().float().cpu().reshape(-1).numpy()


def scan_tensors(sources: Sequence[PartitionSource], base: ModelReader, *, moments: bool,
                 chunk_elements: int = DEFAULT_CHUNK_ELEMENTS, threads: int | None = None
                 ) -> tuple[dict[str, dict[str, float]], list[ContributionRejected]]:
    """One streaming pass: NaN/Inf in weights (and stored second moments), update norms;
    with numpy (`valuescan`) where it covers the inputs, else on torch blocks."""
    experts = [ExpertReader(s, base) for s in sources]
    readers = [MomentReader(s.moments) for s in sources] if moments else None
    if readers is not None and all(r.kind == "rank1" for r in readers):
        for r in readers:  # rank-1 factors were checked whole in check_static
            r.close()
        readers = None
    names = [s.name for s in sources]
    try:
        if valuescan.scannable(base, [e.model for e in experts], readers):
            return valuescan.scan(names, base, [e.model for e in experts], readers,
                                  chunk_elements=chunk_elements, threads=threads)
        return _scan_blocks(names, base, experts, readers, chunk_elements=chunk_elements)
    finally:
        for reader in [base, *experts, *(readers or [])]:
            reader.close()


def _scan_blocks(names: list[str], base: ModelReader, experts: list[ExpertReader],
                 readers: list[MomentReader] | None, *, chunk_elements: int
                 ) -> tuple[dict[str, dict[str, float]], list[ContributionRejected]]:
    """`scan_tensors` on torch blocks (LoRA partitions, fp8 weights)."""
    import torch

    from .blocks import BlockLoader

    loader = BlockLoader(base, experts, readers, need_base=True)
    scan = NormScan(names)
    items = [(m.name, r) for m in map(base.meta, base.names) if m.dtype.is_floating_point
             for r in block_rows(m, chunk_elements, elementwise=True)]
    for block in loader.blocks(items, torch.device("cpu")):
        scan(block)
    return scan.norms(), list(scan.refused.values())


def judge_norms(result: Verification, norms: dict[str, dict[str, float]], factor: float, *,
                refuse: bool) -> list[ContributionRejected]:
    """Record the norms and outlier flags of the accepted partitions; the outlier refusals."""
    names = [s.name for s in result.accepted]
    result.tensor_norms = norms
    result.update_norms = {p: math.sqrt(sum(per.get(p, 0.0) ** 2 for per in norms.values()))
                           for p in names}
    result.outliers = flag_outliers(result.update_norms, factor, refuse=refuse)
    refusals = []
    for flag in result.outliers:
        log.warning("partition %s: update norm %.4g is %.2fx the median of the others",
                    flag.partition, flag.norm, flag.ratio)
        if refuse:
            refusals.append(ContributionRejected(
                flag.partition, "outlier-norm", f"update norm {flag.norm:.4g} is "
                f"{flag.ratio:.3g}x the median {flag.median_others:.4g} of the others"))
    return refusals


def median_of_others(norm: float, others: Sequence[float]) -> float:
    """The median of the other partitions' norms; with an even count, the middle value nearer
    to `norm` (so with K = 3 one outlier cannot make the two normal partitions look like
    outliers by dragging the mean of their two 'others' up)."""
    ranked = sorted(others)
    mid = len(ranked) // 2
    if len(ranked) % 2:
        return ranked[mid]
    return min(ranked[mid - 1], ranked[mid], key=lambda v: abs(_log(v) - _log(norm)))


def _log(value: float) -> float:
    """log that takes 0 and inf (norms are finite and >= 0, but a rule must not crash)."""
    return math.log(min(max(value, 1e-300), 1e300))


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
    streamed: bool = False, threads: int | None = None,
) -> Verification:
    """Run every check; the result lists accepted and refused partitions and outliers.

    `hashes_verified` names partitions whose files were sha256-checked on download (their
    sizes are still checked here; hashing them again would read every byte twice).
    `expected` (partition -> its PartitionInput) adds the site and signature checks, and
    `run` the run a signed manifest must name.
    `streamed`: each file is read once, front to back (`streamcheck`: sha256 and stored
    values) instead of hashed and then scanned; the update norms and outlier flags are left
    to the merge pass (`NormScan`, `judge_norms`), so a merge reads each input twice at most.
    `threads`: of the scan (default one per core).
    """
    started, result = time.monotonic(), Verification()
    base_fp = model_fingerprint(Path(base_dir))
    survivors = []
    with ModelReader(Path(base_dir)) as base:
        for source in sources:
            try:
                if (want := (expected or {}).get(source.name)) is not None:
                    check_identity(source, want, run=run, attempt=want.attempt)
                    check_plan(source, want)
                hashed = source.name in hashes_verified
                if source.manifest is not None:
                    check_files(source, hashes=not (hashed or streamed))
                check_static(source, base, base_fp, method, strict_dtype=strict_dtype)
                if streamed and source.manifest is not None:
                    check_stream(source, every_file=not hashed)
                survivors.append(source)
            except ContributionRejected as rejection:
                result.refused.append(rejection)
        norms, scan_refused = {}, []
        if not streamed:
            norms, scan_refused = scan_tensors(survivors, base, moments=method.needs_moments,
                                               chunk_elements=chunk_elements, threads=threads)
    result.refused += scan_refused
    bad = {r.partition for r in scan_refused}
    result.accepted = [s for s in survivors if s.name not in bad]
    if not streamed:
        result.refused += judge_norms(result, norms, outlier_factor, refuse=refuse_outliers)
    refused = {r.partition for r in result.refused}
    result.accepted = [s for s in result.accepted if s.name not in refused]
    result.seconds = round(time.monotonic() - started, 3)
    return result


def require_quorum(accepted: int, total: int, quorum: float,
                   refused: Sequence[ContributionRejected], *, needed: int | None = None) -> None:
    """Raise QuorumNotMet unless `needed` (default: the core's rule over `total`) passed.

    The pipeline passes the plan's numbers (MergeParams.planned and .required), so partitions
    that failed before the merge count as missing here too.
    """
    needed = needed or quorum_rule.required(total, quorum)
    if total <= 0 or accepted < needed:
        reasons = "; ".join(f"{r.partition}: {r.check}" for r in refused) or "none"
        raise QuorumNotMet(f"quorum not met: {accepted}/{total} partitions passed verification, "
                           f"{needed} needed (quorum {quorum:.0%}; refused: {reasons})", refused)
