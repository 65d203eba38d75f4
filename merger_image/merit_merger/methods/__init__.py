"""Merge methods, one small module each, registered by name."""
