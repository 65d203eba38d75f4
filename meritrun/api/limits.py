"""Upper bounds on every count and size in a MeritRun spec, and why each is where it is.

A bound here is a promise that the run's memory and time stay predictable whatever a user
types: without one, `mixtureSearch.grid: 1000000` built a million candidates and K = 4 with
grid 2000 exhausted memory before the first merge. The same numbers bound the CRD
(`maxItems`, `maxLength`), which also keeps the cost of its CEL rules within the API server's
budget. Each is far above what a real run needs.
"""

from __future__ import annotations

from math import comb

from ._base import INT64_MAX

# In the CRD this bound is `format: int64`, not a `maximum` (a float64 in the API server: 2^63-1
# would round past int64 and kube-apiserver refuses the whole CRD); meritrun.crd does that.
SEED_MAX = INT64_MAX  # partition k trains with seed + k: still inside torch's uint64 seeds
MAX_AXES = 6  # conflictPCA gives K = 2^axes: 64 partitions, 64 training Jobs
MAX_PARTITIONS = 2**MAX_AXES  # one Job each, one expert each held open by the merge
MAX_SOURCES = 256  # sources named in the spec; the plan and status list each of them
MAX_SITES = 64  # at most one partition set per site: no more sites than partitions
NAME_LEN = 63  # a DNS label: site names become label values and parts of object names
SOURCE_NAME_LEN = 128  # source names become storage key parts
URI_LEN = 4096
MAX_SEARCH_CANDIDATES = 1000  # each candidate is one full merge and one evaluation
MAX_GRID = 1000  # with K = 2 the lattice has grid - 1 points: the candidate bound again
MAX_CALIBRATION_SAMPLES = 100_000  # per source; their gradients are summed one at a time
MAX_STRIDE = 10_000
MAX_PROJECTION_DIM = 2**20  # one fp32 sketch of this size per source (4 MiB)
MAX_BATCH = 65_536  # examples per step (and per micro-batch) held in memory together
MAX_SEQ_LEN = 2**20  # tokens per example after truncation
MAX_EPOCHS = 1000.0
MAX_STEPS = 10**9
MAX_LORA_RANK = 4096
MAX_NODES = 256  # pods of one partition's gang: each holds a share of the model
MAX_SHARD_MB = 1_000_000  # 1 TB: a shard larger than any single file system wants
MAX_BACKOFF = 100  # retries per Job: each is a full stage run
MAX_DEADLINE_S = 10 * 365 * 24 * 3600  # ten years: past this a deadline means nothing


def lattice_candidates(grid: int, experts: int) -> int:
    """How many points the search's 1/grid lattice has for `experts` partitions (every
    weight at least 1/grid): compositions of grid into `experts` positive parts."""
    return comb(grid - 1, experts - 1) if experts >= 1 else 0


def most_lattice_candidates(grid: int, max_experts: int) -> int:
    """The lattice's size for the worst K the plan may come out with (K can shrink)."""
    return max(lattice_candidates(grid, k) for k in range(1, max_experts + 1))
