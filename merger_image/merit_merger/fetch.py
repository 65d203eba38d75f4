"""Getting a partition artifact (and the base) to a merger stage.

Staged (`fetch_partition`, every stage that needs local files, and the merge and verify
stages with MERITRUN_INPUTS=stage): in place from a local root, or its manifest first and then
exactly the files it lists, each checked against its sha256 while downloading. Streamed
(`open_partition`, `open_base`: the merge and verify stages by default): only the small files
are downloaded; the weight files are mounted (`remote`) and read from storage where they
lie, so the workdir never holds K copies of the model. Either way a contribution that cannot
be fetched is a refusal (ContributionRejected), never a crash of the stage.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

from meritrun.artifacts import MANIFEST_NAME, SIDE_FILES, FileEntry
from meritrun.errors import (
    ContributionRejected,
    IntegrityError,
    ObjectNotFound,
    SpecError,
    StorageError,
)
from meritrun.stages import MergeParams, SearchParams, VerifyParams
from meritrun.storage.base import join_key, validate_key

from .checks import load_partition
from .io import is_weight_file
from .remote import RemoteFile
from .sources import PartitionSource

Candidate = PartitionSource | ContributionRejected
Mounts = dict[Path, RemoteFile]


def open_stage_storage(params: MergeParams | SearchParams | VerifyParams):
    from meritrun.storage import open_storage

    return open_storage(params.storage.uri, endpoint=params.storage.endpoint,
                        region=params.storage.region,
                        access_key=os.environ.get("AWS_ACCESS_KEY_ID"),
                        secret_key=os.environ.get("AWS_SECRET_ACCESS_KEY"))


def local_root(storage) -> Path | None:
    """The directory of a local storage root (artifacts are read in place), else None."""
    from meritrun.storage import LocalStorage

    return storage.root if isinstance(storage, LocalStorage) else None


def fetch_partition(storage, name: str, prefix: str, dest: Path) -> tuple[Candidate, bool]:
    """(source or refusal, whether its files were sha256-verified while downloading)."""
    root = local_root(storage)
    try:
        if root is not None:
            return load_partition(root / prefix, name), False
        try:
            storage.get_file(f"{prefix}/{MANIFEST_NAME}", dest / MANIFEST_NAME)
        except ObjectNotFound as e:
            raise ContributionRejected(name, "missing-file", f"{MANIFEST_NAME}: {e}") from e
        source = load_partition(dest, name)
        try:
            storage.download_dir(prefix, dest, expected=source.manifest.files)
        except IntegrityError as e:
            raise ContributionRejected(name, "sha256", str(e)) from e
        except ObjectNotFound as e:
            raise ContributionRejected(name, "missing-file", str(e)) from e
        return source, True
    except ContributionRejected as rejection:
        return rejection, False


# --- reading from storage in place: small files downloaded, weight files mounted -----------

INPUTS_ENV = "MERITRUN_INPUTS"
INPUT_MODES = ("stream", "stage")


def inputs_mode() -> str:
    """`stream` (the default): weight files are read from storage where they lie, with
    ranged GETs; `stage`: every input is downloaded to the workdir first (a Job with a
    `template.workVolume` that prefers local copies sets MERITRUN_INPUTS=stage in
    template.env)."""
    mode = os.environ.get(INPUTS_ENV, "").strip().lower() or "stream"
    if mode not in INPUT_MODES:
        raise SpecError(f"{INPUTS_ENV}={mode!r}: must be one of {', '.join(INPUT_MODES)}",
                        path=f"template.env.{INPUTS_ENV}")
    return mode


def streams(rel: str) -> bool:
    """Read from storage in place: weight files (large). Everything else (manifest, configs,
    tokenizer, the shard index) is small and downloaded."""
    return is_weight_file(rel) and not rel.endswith(".json")


def mount_objects(storage, prefix: str, rels, dest: Path, *,
                  expected: Mapping[str, FileEntry] | None = None,
                  download: frozenset[str] = frozenset()) -> Mounts:
    """Download the small files among `rels` (under `prefix`; and those in `download`) to
    `dest` (sha256-checked when `expected` lists them) and return the mounts of the weight
    files (size and version pinned now)."""
    mounts: Mounts = {}
    for rel in rels:
        validate_key(rel)  # a hostile name must not reach outside dest
        key, entry = join_key(prefix, rel), (expected or {}).get(rel)
        if streams(rel) and rel not in download:
            v = storage.version(key)
            mounts[dest / rel] = RemoteFile(storage, key, v.bytes, v.tag)
        else:
            storage.get_file(key, dest / rel, sha256=entry.sha256 if entry else None,
                             size=entry.bytes if entry else None)
    return mounts


def open_partition(storage, name: str, prefix: str, dest: Path) -> tuple[Candidate, Mounts]:
    """(source or refusal, mounts of its weight files): its manifest and small files are
    downloaded (sha256-checked), its weight files are read from storage later, once to hash
    them (streamcheck) and once to merge. Nothing is mounted for a refusal."""
    try:
        try:
            storage.get_file(f"{prefix}/{MANIFEST_NAME}", dest / MANIFEST_NAME)
        except ObjectNotFound as e:
            raise ContributionRejected(name, "missing-file", f"{MANIFEST_NAME}: {e}") from e
        source = load_partition(dest, name)
        listed = source.manifest.files
        cut = len(prefix) + 1
        present = {k[cut:] for k in storage.list_keys(prefix) if k != prefix}
        missing = sorted(set(listed) - present)
        if missing:
            raise ContributionRejected(name, "missing-file", f"{missing[0]} is missing")
        extra = sorted(present - set(listed) - SIDE_FILES)
        if extra:
            raise ContributionRejected(name, "sha256", f"{extra[0]} is not in the manifest")
        # rank-1 second moments are vectors (sum of the dims, not the model's size), read
        # whole by the checks and again by the merge: a local copy is cheaper than 3 reads
        moments = source.manifest.second_moments
        small = frozenset({moments.file} if moments and moments.kind == "rank1" else ())
        try:
            return source, mount_objects(storage, prefix, sorted(listed), dest,
                                         expected=listed, download=small)
        except IntegrityError as e:
            raise ContributionRejected(name, "sha256", str(e)) from e
        except StorageError as e:
            raise ContributionRejected(name, "format", str(e)) from e
    except ContributionRejected as rejection:
        return rejection, {}


def open_base(uri: str, dest: Path, *, endpoint: str | None, region: str | None
              ) -> tuple[Path, Mounts]:
    """The base model dir: a local path as it is; from S3, its small files downloaded to
    `dest` and its weight files mounted."""
    from meritrun.storage import fetch_path, open_storage, split_uri

    root, key = split_uri(uri)
    if not root.startswith("s3://"):
        return fetch_path(uri, dest), {}
    storage = open_storage(root, endpoint=endpoint, region=region)
    cut = len(key) + 1 if key else 0
    rels = [k[cut:] for k in storage.list_keys(key) if k != key]
    if not rels:
        raise ObjectNotFound(f"nothing at {uri} (no objects under it)")
    target = dest / root.removeprefix("s3://") / key
    target.mkdir(parents=True, exist_ok=True)
    return target, mount_objects(storage, key, rels, target)
