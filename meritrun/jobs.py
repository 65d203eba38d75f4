"""Compatibility name: the Job builders live in `meritrun.pipeline.jobs`."""

from .pipeline.jobs import *  # noqa: F403
from .pipeline.jobs import __all__  # noqa: F401
