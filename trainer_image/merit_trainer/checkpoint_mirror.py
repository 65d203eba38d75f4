"""Checkpoints kept in the run's storage as well, for attempts that start on an empty disk.

On Kubernetes without `template.workVolume` the work directory is an emptyDir that dies with
the pod, and the ranks of a multi-node gang do not even share one; only storage outlives the
attempt. So when the stage parameters name a checkpoint prefix (`TrainParams.checkpoints`,
`runs/<run>/<uid>/partitions/<p>/checkpoints`, set by the pipeline when no work volume is
set), every checkpoint the work directory gets is also uploaded to
`<prefix>/<identity>/step-<n>/`: each rank sends the shard files it wrote itself, then rank 0
sends the DCP metadata and `meta.json` last. `meta.json` is the completion marker: a step
without it is ignored, a marker is deleted before the files it vouches for are replaced or
removed, so a crash mid-upload or mid-delete never leaves a step that looks complete. Resume
downloads the newest complete step once per node (checkpoint.py decides between it and the
work directory's own). Publishing the artifact removes the partition's whole prefix.
It does not write the local checkpoint (checkpoint.py does).
"""

from __future__ import annotations

import json
import logging
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

from meritrun.stages import TrainParams
from meritrun.storage import Storage, open_storage

from .dist import Dist, all_gather, barrier, node_leader_first

log = logging.getLogger(__name__)

META_NAME = "meta.json"  # the completion marker (checkpoint.py writes the same file locally)
_STEP = re.compile(r"^step-(\d+)$")
_RANK_FILE = re.compile(r"^__(\d+)_")  # torch.distributed.checkpoint names shards __<rank>_<i>


@dataclass(frozen=True)
class CheckpointMirror:
    """The storage copy of one training's checkpoints (`prefix`: the partition's, `identity`:
    this very configuration's, as checkpoint.checkpoint_identity hashes it)."""

    storage: Storage
    prefix: str
    identity: str

    @property
    def root(self) -> str:
        return f"{self.prefix}/{self.identity[:32]}"

    def step_key(self, step: int) -> str:
        return f"{self.root}/step-{step:08d}"

    def upload(self, step_dir: Path, *, step: int, meta: dict, dist: Dist) -> None:
        """Send one saved step (collective: every rank calls it after `dcp.save`)."""
        key = self.step_key(step)
        if dist.main:  # a marker from an earlier try must not vouch for files being replaced
            self.storage.delete_prefix(f"{key}/{META_NAME}")
        barrier(dist)
        for path in sorted(Path(step_dir).iterdir()):
            if path.is_file() and path.name != META_NAME and _owner(path.name) == dist.rank:
                self.storage.put_file(f"{key}/{path.name}", path)
        barrier(dist)
        if dist.main:
            self.storage.put_bytes(f"{key}/{META_NAME}", json.dumps(meta).encode())
            for old in self._step_prefixes():
                if old != key:
                    self._drop(old)
        log.info("checkpoint at step %d kept in %s", step, self.storage.uri_for(key))

    def complete_steps(self, dist: Dist) -> list[int]:
        """Steps whose marker names this identity (rank 0 looks; every rank gets the answer)."""
        found: list[int] | None = None
        if dist.main:
            found = []
            for key in self.storage.list_keys(self.root):
                step_dir, _, name = key.rpartition("/")
                match = _STEP.match(step_dir.rpartition("/")[2])
                if name == META_NAME and match and self._marker_matches(key):
                    found.append(int(match.group(1)))
        return sorted(all_gather(dist, found)[0] or [])

    def download(self, step: int, dest_root: Path, *, dist: Dist) -> Path:
        """The step's files in a local directory, fetched once per node (collective)."""
        node = dist.rank // dist.local_world

        def fetch() -> Path:
            dest = Path(dest_root) / f"node-{node}" / f"step-{step:08d}"
            shutil.rmtree(dest, ignore_errors=True)
            log.info("downloading checkpoint %s", self.storage.uri_for(self.step_key(step)))
            return self.storage.download_dir(self.step_key(step), dest)

        found = node_leader_first(dist, fetch)
        barrier(dist)
        return found

    def remove_all(self, dist: Dist) -> None:
        """After publishing: every checkpoint of this partition, markers first (rank 0)."""
        if dist.main:
            self._drop(self.prefix)

    def _marker_matches(self, key: str) -> bool:
        try:
            return json.loads(self.storage.get_bytes(key)).get("identity") == self.identity
        except (ValueError, AttributeError):
            log.warning("ignoring unreadable checkpoint marker %s", self.storage.uri_for(key))
            return False

    def _step_prefixes(self) -> set[str]:
        return {key.rsplit("/", 1)[0] for key in self.storage.list_keys(self.root)
                if _STEP.match(key.rsplit("/", 2)[-2])}

    def _drop(self, prefix: str) -> None:
        for key in self.storage.list_keys(prefix):
            if key.endswith(f"/{META_NAME}"):
                self.storage.delete_prefix(key)
        self.storage.delete_prefix(prefix)


def _owner(name: str) -> int:
    """The rank that uploads a checkpoint file: the one that wrote it, rank 0 for the rest."""
    match = _RANK_FILE.match(name)
    return int(match.group(1)) if match else 0


def open_mirror(params: TrainParams, *, identity: str,
                storage: Storage | None = None) -> CheckpointMirror | None:
    """The mirror the parameters ask for (None: the work directory alone keeps checkpoints).
    `storage` overrides the run's storage (a pull site writes through its grant)."""
    if params.checkpoints is None:
        return None
    if storage is None:
        storage = open_storage(params.storage.uri, endpoint=params.storage.endpoint,
                               region=params.storage.region)
    return CheckpointMirror(storage, params.checkpoints, identity)
