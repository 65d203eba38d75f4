"""The per-contribution checks: what one partition must pass on its own, before any merge.

Used by the merge's verification (`verification.verify_partitions`, with the streaming scan and
the outlier policy that need every partition) and by the verify stage on arrival (`verify`).
Each check raises ContributionRejected(partition, check, detail) naming the check.
"""

from __future__ import annotations

from pathlib import Path, PurePosixPath

from pydantic import ValidationError

from meritrun.artifacts import FORMAT_VERSION, MANIFEST_NAME, sha256_file
from meritrun.errors import ContributionRejected, StorageError
from meritrun.signing import verify_manifest_signature
from meritrun.stages import PartitionInput

from .io import ModelReader
from .lora import AdapterFormatError
from .methods import MergeMethod
from .moments import MomentReader, MomentsFormatError
from .sources import ExpertReader, PartitionSource

CHECKS = ("sha256", "missing-file", "format", "base-fingerprint", "tensor-name", "tensor-shape",
          "tensor-dtype", "non-finite", "tokens", "second-moments", "outlier-norm", "site",
          "signature")


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
    except (AdapterFormatError, StorageError, OSError, ValueError) as e:
        # A file that matches its hash can still be no safetensors at all: the site's fault.
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
    except (MomentsFormatError, StorageError) as e:
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
