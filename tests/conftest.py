"""Session-wide test setup: offline Hugging Face, shared fixtures from tests/support."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Tiny models gain nothing from threads; on a shared 2-core machine two spinning OpenMP
# threads ran ~10x slower than one. Set before torch is imported; subprocesses inherit it.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")

pytest_plugins = [
    "support.processes",
    "support.tiny",
    "support.seaweed",
    "support.minio",
    "support.controlplane",
    "support.kube",
]

# The README's test command runs two pytest workers (`-n 2 --dist loadfile`): a file goes to
# whichever worker is free, in collection order. Most of the wall time is a dozen end-to-end
# files whose stage processes leave a core idle while they wait on each other, so those start
# first, longest first, and the hundreds of quick unit tests fill the gaps at the end instead
# of one long file running alone on one worker while the other sits idle.
LONGEST_FIRST = (
    "test_quality_quick.py", "test_operator_faults.py", "test_demo.py", "test_gang_e2e.py",
    "test_controlplane_faults.py", "test_local_sites.py", "test_federated_e2e.py",
    "test_local_e2e.py", "test_chart_install.py", "test_distributed_training.py",
    "test_cluster_jobs.py", "test_controlplane.py", "test_kueue.py",
)


def pytest_collection_modifyitems(items: list) -> None:
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: files stay whole
