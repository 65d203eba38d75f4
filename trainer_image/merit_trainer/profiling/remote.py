"""Gradient sketches that sites uploaded for their own sources, as the profile stage uses them.

A pull site with `sketches: true` keeps its data and sends only `sketch.npy` + `sketch.json`
(`meritrun contribute --sketch-only`). The hub fetches each set, refuses one that is not
comparable with what the hub computes (another base, projection, dimension, seed, parameter
filter or centring: its cosines would be meaningless) or that claims a source not bound to
that site (a site must not be able to speak for, and so steer, another site's or the hub's
sources), and requires every bound source the hub cannot read. Calibration settings that
differ (stride, samples, truncation) still give comparable cosines: warned and recorded, not
refused. This module does no profiling and no splitting; `stage.profile_to_dir` does.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from meritrun.api import ProfilingSpec
from meritrun.errors import DataError, ObjectNotFound, SpecError, StageFailed, StorageError
from meritrun.storage import Storage
from meritrun.storage.base import join_key

from .sketch import PROJECTION
from .sketchset import SketchSet, load_sketch_set

log = logging.getLogger(__name__)

SKETCH_STEM = "sketch"
# Settings that must agree with the hub's, else the set is refused. `centered` is checked only
# when a set records it (the PCA is the hub's, but a set that says otherwise was made for
# another run).
REQUIRED_SAME = ("base", "projection", "dim", "seed", "parameters", "centered")
# Settings that change the gradient estimate or the token counts, not the projection.
SHOULD_MATCH = ("stride", "calibration_samples", "max_seq_len")


def expected_settings(profiling: ProfilingSpec, *, base: str, max_seq_len: int) -> dict:
    """What a site's sketch set must (REQUIRED_SAME) and should (SHOULD_MATCH) record."""
    return {"base": base, "projection": PROJECTION, "dim": profiling.projection_dim,
            "seed": profiling.seed, "parameters": profiling.parameters,
            "centered": profiling.centered, "stride": profiling.stride,
            "calibration_samples": profiling.calibration_samples, "max_seq_len": max_seq_len}


def fetch_site_sketches(storage: Storage, site_sketches: Mapping[str, str], dest: Path
                        ) -> dict[str, SketchSet]:
    """Download and read every site's sketch set (site -> key prefix) into dest/<site>/."""
    sets = {}
    for site, prefix in site_sketches.items():
        stem = Path(dest) / site / SKETCH_STEM
        for suffix in (".json", ".npy"):
            key = join_key(prefix.rstrip("/"), SKETCH_STEM + suffix)
            try:
                storage.get_file(key, stem.with_suffix(suffix))
            except ObjectNotFound as e:
                raise StageFailed(f"site {site!r}: no sketches at {storage.uri_for(key)} "
                                  "(has it run `meritrun contribute --sketch-only`?)") from e
            except StorageError as e:
                raise StageFailed(f"site {site!r}: cannot fetch {storage.uri_for(key)}: {e}"
                                  ) from e
        try:
            sets[site] = load_sketch_set(stem)
        except (DataError, KeyError, TypeError, AttributeError) as e:
            raise StageFailed(f"site {site!r}: unreadable sketch set "
                              f"{storage.uri_for(prefix)}: {e!r}") from e
        log.info("fetched sketches of site %s: %s", site, ", ".join(sets[site].names))
    return sets


def _owner(source: str, site_of: Mapping[str, str | None], known: Sequence[str]) -> str:
    if source not in known:
        return "not a source of this run"
    site = site_of.get(source)
    return f"bound to site {site!r}" if site else "a hub source"


def check_site_set(
    site: str,
    sketches: SketchSet,
    *,
    expected: Mapping,
    site_of: Mapping[str, str | None],
    sources: Sequence[str],
    readable: Sequence[str],
) -> dict:
    """Refuse a set that is not comparable or not exactly this site's; return the soft
    differences (setting -> the site's value), empty when it matches everything."""
    path, got = f"sites[{site}].sketches", sketches.settings
    for field in REQUIRED_SAME:
        if field == "centered" and field not in got:
            continue
        if got.get(field) != expected[field]:
            raise SpecError(f"site {site!r} sent sketches with {field}={got.get(field)!r}; the "
                            f"hub profiles with {field}={expected[field]!r}", path=path)
    names = list(sketches.names)
    if len(set(names)) < len(names):
        raise SpecError(f"site {site!r} sent a source twice in one sketch set", path=path)
    for name in names:
        if site_of.get(name) != site or name not in sources:
            raise SpecError(f"site {site!r} sent a sketch of source {name!r}, which is "
                            f"{_owner(name, site_of, sources)}: a site sketches only its own "
                            "sources", path=path)
    missing = [s for s in sources
               if site_of.get(s) == site and s not in readable and s not in names]
    if missing:
        raise SpecError(f"site {site!r} sent no sketch of its source(s) {', '.join(missing)} "
                        "(the hub has no data for them)", path=path)
    if not np.issubdtype(sketches.matrix.dtype, np.floating):
        raise DataError(f"site {site!r}: sketch matrix of dtype {sketches.matrix.dtype}, "
                        "expected floats")
    norms = np.linalg.norm(sketches.matrix, axis=1)
    for name, norm in zip(names, norms, strict=True):
        tokens = sketches.tokens.get(name)
        if not (np.isfinite(norm) and norm > 0):
            raise DataError(f"site {site!r}: the sketch of {name!r} is zero or not finite")
        if not isinstance(tokens, int) or isinstance(tokens, bool) or tokens < 0:
            raise DataError(f"site {site!r}: source {name!r} has no valid token count "
                            f"({tokens!r})")
    soft = {f: got.get(f) for f in SHOULD_MATCH if got.get(f) != expected[f]}
    if soft:
        log.warning("site %s sketched with %s (hub: %s): cosines stay comparable, the estimate "
                    "and token counts differ", site, soft, {f: expected[f] for f in soft})
    return soft


def reorder(sketches: SketchSet, order: Sequence[str]) -> SketchSet:
    """The same set with its rows in `order` (the sources it holds, in plan order)."""
    held = set(sketches.names)
    names = [n for n in order if n in held]
    rows = [sketches.names.index(n) for n in names]
    return SketchSet(names, sketches.matrix[rows], {n: sketches.tokens[n] for n in names},
                     {n: c for n, c in sketches.calibration.items() if n in names},
                     [n for n in names if n in sketches.short], dict(sketches.settings))


def check_site_sketches(
    sets: Mapping[str, SketchSet],
    *,
    expected: Mapping,
    site_of: Mapping[str, str | None],
    sources: Sequence[str],
    readable: Sequence[str],
) -> dict[str, dict]:
    """check_site_set for every site; the soft differences of those that have any."""
    differences = {}
    for site, sketches in sets.items():
        soft = check_site_set(site, sketches, expected=expected, site_of=site_of,
                              sources=sources, readable=readable)
        if soft:
            differences[site] = soft
    return differences
