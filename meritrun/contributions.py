"""Compatibility name: the pull-site state machine lives in `meritrun.pipeline.pull`."""

from .pipeline.actions import OfferAssignment, RevokeGrant, grant_name
from .pipeline.pull import grant_expiry, sketch_sites

__all__ = ["OfferAssignment", "RevokeGrant", "grant_expiry", "grant_name", "sketch_sites"]
