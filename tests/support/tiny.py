"""Test support: tiny (filled in by its owner)."""
