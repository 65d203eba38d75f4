"""Test support: kube (filled in by its owner)."""
