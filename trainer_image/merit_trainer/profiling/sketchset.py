"""Sketches of several sources, as one unit that can be saved, shipped and combined.

A site that keeps its data can profile its own sources against the same base model and seed,
and send only `sketch.npy` (sources x dim) + `sketch.json` (names, token counts, settings)
to the hub; `combine_sketch_sets` refuses sets that are not comparable (another base, seed,
dimension, parameter filter or projection), because their cosines would be meaningless.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from meritrun.api import ProfilingSpec
from meritrun.artifacts import base_fingerprint
from meritrun.data import Example
from meritrun.errors import DataError, SpecError

from .calibration import (
    DEFAULT_MAX_LEN,
    build_calibration,
    count_supervised_tokens,
    encode_supervised,
)
from .gradients import GradientSketcher, enable_checkpointing, load_base
from .sketch import DEFAULT_CACHE_BYTES, PROJECTION, CountSketch

log = logging.getLogger(__name__)

# Settings that must agree for two sketches to be compared.
COMPARABLE = ("base", "dim", "seed", "parameters", "projection")


@dataclass(frozen=True)
class SketchSet:
    names: list[str]
    matrix: np.ndarray  # sources x dim, float64
    tokens: dict[str, int]  # supervised tokens over every example of the source (one epoch)
    calibration: dict[str, int] = field(default_factory=dict)  # calibration examples used
    short: list[str] = field(default_factory=list)  # sources with fewer than asked for
    settings: dict = field(default_factory=dict)

    def as_tuple(self) -> tuple[list[str], np.ndarray, dict[str, int]]:
        return self.names, self.matrix, self.tokens


def profile_sketches(
    model_dir: Path,
    examples_by_source: Mapping[str, Sequence[Example]],
    settings: ProfilingSpec,
    *,
    max_seq_len: int = DEFAULT_MAX_LEN,
    device=None,
    cache_bytes: int = DEFAULT_CACHE_BYTES,
) -> SketchSet:
    """Calibrate, take every source's mean-loss gradient at the base and sketch it.

    cache_bytes bounds the hash cache on the model's device (4 bytes per sketched element):
    parameters beyond it have their hashes regenerated on the CPU for every micro-batch.
    """
    dtype = torch.bfloat16 if settings.precision == "bf16" else torch.float32
    model, tokenizer = load_base(Path(model_dir), device=device, dtype=dtype)
    if settings.gradient_checkpointing:
        enable_checkpointing(model)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    calib = build_calibration(examples_by_source, stride=settings.stride,
                              samples=settings.calibration_samples, seed=settings.seed)
    sketch = CountSketch(settings.projection_dim, seed=settings.seed, cache_bytes=cache_bytes)
    sketcher = GradientSketcher(model, settings.parameters, sketch)
    rows, tokens = [], {}
    try:
        for name, examples in examples_by_source.items():
            encoded = encode_supervised(tokenizer, calib.examples[name], max_len=max_seq_len)
            if not encoded:
                raise DataError(f"source {name!r}: no calibration example keeps a supervised "
                                f"token at max length {max_seq_len}")
            row, _ = sketcher.sketch_source(encoded, micro_batch_size=settings.micro_batch_size,
                                            pad_id=pad_id)
            rows.append(row)
            tokens[name] = count_supervised_tokens(tokenizer, examples, max_len=max_seq_len)
            log.info("sketched source %s (%d calibration examples, %d tokens in all)", name,
                     len(encoded), tokens[name])
    finally:
        sketcher.close()
    return SketchSet(
        names=list(examples_by_source), matrix=np.stack(rows), tokens=tokens,
        calibration=calib.counts(), short=calib.short,
        settings={
            "base": base_fingerprint(Path(model_dir)), "dim": settings.projection_dim,
            "seed": settings.seed, "parameters": settings.parameters, "projection": PROJECTION,
            "parameter_count": sketcher.parameter_count, "stride": settings.stride,
            "calibration_samples": settings.calibration_samples,
            "micro_batch_size": settings.micro_batch_size, "max_seq_len": max_seq_len,
            "precision": settings.precision,
        },
    )


def sketch_sources(
    model_dir: Path, examples_by_source: Mapping[str, Sequence[Example]], settings: ProfilingSpec
) -> tuple[list[str], np.ndarray, dict[str, int]]:
    """(source names, G: sources x dim, supervised tokens per source) for one site's data."""
    return profile_sketches(model_dir, examples_by_source, settings).as_tuple()


def save_sketch_set(sketches: SketchSet, stem: Path) -> tuple[Path, Path]:
    """Write stem.npy (the matrix) and stem.json (everything else)."""
    stem = Path(stem)
    stem.parent.mkdir(parents=True, exist_ok=True)
    npy, meta = stem.with_suffix(".npy"), stem.with_suffix(".json")
    np.save(npy, sketches.matrix)
    meta.write_text(json.dumps({
        "names": sketches.names, "tokens": sketches.tokens,
        "calibration": sketches.calibration, "short": sketches.short,
        "settings": sketches.settings,
    }, indent=2))
    return npy, meta


def load_sketch_set(stem: Path) -> SketchSet:
    stem = Path(stem)
    try:
        meta = json.loads(stem.with_suffix(".json").read_text())
        matrix = np.load(stem.with_suffix(".npy"), allow_pickle=False)
    except (OSError, ValueError) as e:
        raise DataError(f"cannot read sketch {stem}: {e}") from e
    if matrix.shape != (len(meta["names"]), meta["settings"]["dim"]):
        raise DataError(f"sketch {stem}: matrix shape {matrix.shape} does not match "
                        f"{len(meta['names'])} sources x dim {meta['settings']['dim']}")
    return SketchSet(meta["names"], matrix, meta["tokens"], meta.get("calibration", {}),
                     meta.get("short", []), meta["settings"])


def combine_sketch_sets(sets: Sequence[SketchSet]) -> SketchSet:
    """Stack the sources of comparable sketch sets (e.g. from several sites)."""
    if not sets:
        raise SpecError("no sketches to combine", path="profiling")
    first = sets[0].settings
    for other in sets[1:]:
        for key in COMPARABLE:
            if other.settings.get(key) != first.get(key):
                raise SpecError(f"sketches disagree on {key}: {first.get(key)!r} vs "
                                f"{other.settings.get(key)!r}", path="profiling")
    names = [n for s in sets for n in s.names]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise SpecError(f"source {duplicates[0]!r} was sketched more than once",
                        path="profiling")
    return SketchSet(
        names=names, matrix=np.concatenate([s.matrix for s in sets]),
        tokens={k: v for s in sets for k, v in s.tokens.items()},
        calibration={k: v for s in sets for k, v in s.calibration.items()},
        short=[n for s in sets for n in s.short], settings=dict(first),
    )
