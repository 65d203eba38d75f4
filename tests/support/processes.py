"""Test support: processes (filled in by its owner)."""
