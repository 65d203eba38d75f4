"""The quality benchmark: the papers' claims (MERIT, OTA/FFG, DMO) checked at small scale on a CPU.

`python -m bench.quality` (full, about an hour on 2 cores) or `--quick` (smoke run). See
docs/quality.md for the design, the sizes and the latest results.
"""
