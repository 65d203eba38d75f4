"""Benchmarks of MeritRun (run as scripts or `python -m bench.<name>`; not part of the tests)."""
