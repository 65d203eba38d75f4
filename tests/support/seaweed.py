"""Test support: seaweed (filled in by its owner)."""
