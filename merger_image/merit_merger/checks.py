"""The per-contribution checks: what one partition must pass on its own, before any merge.

Used by the merge's verification (`verification.verify_partitions`, with the streaming scan and
the outlier policy that need every partition) and by the verify stage on arrival (`verify`).
Each check raises ContributionRejected(partition, check, detail) naming the check.
"""

from __future__ import annotations

import hashlib
import math
import os
import stat
from pathlib import Path

from pydantic import ValidationError

from meritrun.artifacts import FORMAT_VERSION, MANIFEST_NAME, SIDE_FILES
from meritrun.errors import ContributionRejected, StorageError
from meritrun.signing import verify_manifest_signature
from meritrun.stages import PartitionInput

from .io import HeaderError, ModelReader, open_regular
from .lora import AdapterFormatError
from .methods import MergeMethod
from .moments import MomentReader, MomentsFormatError
from .remote import is_file, remote_file
from .sources import ExpertReader, PartitionSource

CHECKS = ("sha256", "missing-file", "format", "file-type", "plan", "base-fingerprint",
          "safetensors-header", "tensor-name", "tensor-shape", "tensor-dtype", "non-finite",
          "magnitude", "tokens", "second-moments", "outlier-norm", "site", "signature", "run")


def load_partition(artifact_dir: Path, name: str) -> PartitionSource:
    """The partition's source, from its manifest (refused: missing-file / format)."""
    path = Path(artifact_dir) / MANIFEST_NAME
    if os.path.islink(path) or os.path.islink(artifact_dir):
        raise ContributionRejected(name, "file-type", f"{MANIFEST_NAME} or its directory is a "
                                   "symbolic link")
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
    """For this run (its uid), trained at the expected site, and signed by its registered key
    (when either is set).

    A hub-trained partition has neither, so nothing is checked for it. A valid signature only
    vouches for the manifest it covers, so the signed run/partition/attempt must name this
    contribution: else a site's signed artifact could be replayed under another partition.
    """
    name, manifest = source.name, source.manifest
    if manifest is None:
        if expected.site or expected.public_key or expected.run_uid:
            raise ContributionRejected(name, "format", "no manifest to check run, site and "
                                       "signature")
        return
    if expected.run_uid is not None and manifest.run_uid != expected.run_uid:
        raise ContributionRejected(name, "run", f"the manifest is for run uid "
                                   f"{manifest.run_uid!r}, not this run's {expected.run_uid!r}")
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


def check_plan(source: PartitionSource, expected: PartitionInput) -> None:
    """The contribution is the one the plan asked for: its partition, attempt and sources,
    and no more supervised tokens than the plan's sources can give (`tokens`, the bound
    named). Only what `expected` states is checked (a bare CLI merge states nothing)."""
    name, manifest = source.name, source.manifest
    if manifest is None:
        return
    claims = {"partition": (manifest.partition, expected.name),
              "attempt": (manifest.attempt, expected.attempt),
              "sources": (sorted(manifest.sources),
                          None if expected.sources is None else sorted(expected.sources))}
    wrong = [f"{k} {got!r} (the plan has {want!r})" for k, (got, want) in claims.items()
             if want is not None and got != want]
    if wrong:
        raise ContributionRejected(name, "plan", "not the contribution the plan expects: "
                                   + ", ".join(wrong))
    bound = expected.token_bound()
    if bound is not None and source.tokens > bound:
        raise ContributionRejected(name, "tokens", f"claims {source.tokens} supervised tokens; "
                                   f"its sources give at most {bound} ({expected.source_tokens}"
                                   f" per epoch x {math.ceil(expected.epochs - 1e-9)} epochs)")


def check_files(source: PartitionSource, *, hashes: bool = True) -> None:
    """Every listed file a regular file with its size (and sha256); nothing else in the
    artifact: no unlisted file, no symlink, no device; the model dir and the second moments
    are listed (so every file read later is one the manifest vouches for)."""
    root, manifest, name = source.artifact_dir, source.manifest, source.name
    for rel in _tree(root, name):
        if rel not in SIDE_FILES and rel not in manifest.files:
            raise ContributionRejected(name, "sha256", f"{rel} is not in the manifest")
    for rel, entry in manifest.files.items():
        remote = remote_file(root / rel)
        if remote is not None:  # read from storage: listed there, sha256 checked streaming it
            if remote.size != entry.bytes:
                raise ContributionRejected(name, "sha256", f"{rel}: {remote.size} bytes, "
                                           f"manifest says {entry.bytes}")
            continue
        if not os.path.lexists(root / rel):
            raise ContributionRejected(name, "missing-file", f"{rel} is missing")
        try:
            fd = open_regular(root / rel)
        except StorageError as e:
            raise ContributionRejected(name, "file-type", f"{rel}: {e}") from e
        with os.fdopen(fd, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size != entry.bytes:
                raise ContributionRejected(name, "sha256", f"{rel}: {size} bytes, manifest "
                                           f"says {entry.bytes}")
            if hashes and _sha256(f) != entry.sha256:
                raise ContributionRejected(name, "sha256", f"{rel}: sha256 does not match")
    if not manifest.listed_under(manifest.model_dir):
        raise ContributionRejected(name, "missing-file", f"no file of {manifest.model_dir}/ "
                                   "is listed")
    moments = manifest.second_moments
    if moments is not None and moments.file not in manifest.files:
        raise ContributionRejected(name, "missing-file", f"second moments {moments.file} are "
                                   "not listed")


def _tree(root: Path, name: str) -> list[str]:
    """Relative paths of the regular files under root; a symlink or special file refuses."""
    found = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        for entry in [*dirnames, *filenames]:
            path = Path(dirpath) / entry
            mode = path.lstat().st_mode
            rel = path.relative_to(root).as_posix()
            if stat.S_ISLNK(mode):
                raise ContributionRejected(name, "file-type", f"{rel} is a symbolic link")
            if not (stat.S_ISDIR(mode) or stat.S_ISREG(mode)):
                raise ContributionRejected(name, "file-type", f"{rel} is not a regular file")
            if stat.S_ISREG(mode):
                found.append(rel)
    return sorted(found)


def _sha256(f) -> str:
    h = hashlib.sha256()
    while chunk := f.read(8 << 20):
        h.update(chunk)
    return h.hexdigest()


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
    except HeaderError as e:
        raise ContributionRejected(name, "safetensors-header", _where(source, e)) from e
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
    if source.moments is None or not is_file(source.moments) or (
            source.manifest is not None and declared is None):
        raise ContributionRejected(name, "second-moments", f"method {method.key} needs "
                                   "optimizer_v.safetensors; the partition has none")
    try:
        reader = MomentReader(source.moments)
    except HeaderError as e:
        raise ContributionRejected(name, "safetensors-header", _where(source, e)) from e
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


def _where(source: PartitionSource, error: HeaderError) -> str:
    """The bad file, relative to the artifact when it is inside it."""
    try:
        rel = error.path.relative_to(source.artifact_dir).as_posix()
    except (ValueError, TypeError):
        rel = error.path.name
    return f"{rel}: {error.problem}"
