"""Fetching a partition artifact for a merger stage: the one `fetch_partition`.

Every merger stage (merge, verify, search) and the merge CLI get a partition the same way: in
place from a local root, or its manifest first and then exactly the files it lists, each
checked against its sha256 while downloading. A contribution that cannot be fetched is a
refusal (ContributionRejected), never a crash of the stage.
"""

from __future__ import annotations

import os
from pathlib import Path

from meritrun.artifacts import MANIFEST_NAME
from meritrun.errors import ContributionRejected, IntegrityError, ObjectNotFound
from meritrun.stages import MergeParams, SearchParams, VerifyParams

from .checks import load_partition
from .sources import PartitionSource

Candidate = PartitionSource | ContributionRejected


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
