"""Session-wide test setup: offline Hugging Face, shared fixtures from tests/support."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

pytest_plugins = [
    "support.processes",
    "support.tiny",
    "support.seaweed",
    "support.kube",
]
