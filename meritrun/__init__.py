"""MeritRun: conflict-aware splitting, isolated partition training and one-shot merging.

The core package holds what every image shares: the API models, the pure pipeline state
machine, the artifact contract, storage, the local runner and the CLI. It never imports torch
or kopf at module level, so the operator image stays small.
"""

__version__ = "0.1.0"
API_GROUP = "merit.run"
API_VERSION = "v1alpha1"
