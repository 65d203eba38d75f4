"""Session-wide test setup: offline Hugging Face, shared fixtures from tests/support."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Tiny models gain nothing from threads; on a shared 2-core machine two spinning OpenMP
# threads ran ~10x slower than one. Set before torch is imported; subprocesses inherit it.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")
# Without a GPU the GPU merge kernels' tests run in Triton's interpreter, which triton
# chooses once, at its import (and some test modules' imports import it): so here, first.
# A GPU (its device file) keeps them compiled. See tests/support/triton_interpreter.py.
if not os.path.exists("/dev/nvidiactl"):
    os.environ.setdefault("TRITON_INTERPRET", "1")

pytest_plugins = [
    "support.processes",
    "support.tiny",
    "support.seaweed",
    "support.minio",
    "support.controlplane",
    "support.kube",
    "support.workers",
]

