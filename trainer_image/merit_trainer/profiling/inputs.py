"""Reading every source of a run for profiling, wherever its data lives.

The profile stage needs all sources at once (token counts for the split; calibration examples
for the gradients). Data comes from one mixture file (`data.uri`) and/or one file per source
(`data.sources[].uri`), local or in S3. A source declared without a uri lives at a site that
keeps its data: it is returned as remote; its gradient can only come from the sketches its site
uploads (remote.py), else only strategies that need no gradient of it can place it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from meritrun.api import DataSpec
from meritrun.data import Example, group_by_source, iter_examples
from meritrun.errors import DataError, MeritRunError
from meritrun.storage import fetch_path

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SourceData:
    examples: dict[str, list[Example]]  # sources whose data the hub can read, first-seen order
    remote: list[str]  # declared sources with no data here (kept at their site)


def _read(uri: str, cache_dir: Path, *, source_field: str, endpoint: str | None,
          region: str | None) -> list[Example]:
    try:
        path = fetch_path(uri, cache_dir, endpoint=endpoint, region=region)
    except MeritRunError as e:
        raise DataError(f"cannot fetch data {uri}: {e}") from e
    return list(iter_examples(path, source_field=source_field))


def load_sources(
    data: DataSpec, cache_dir: Path, *, endpoint: str | None = None, region: str | None = None
) -> SourceData:
    """Examples of every source, grouped by source; declared sources without data: remote."""
    groups: dict[str, list[Example]] = {}
    if data.uri:
        groups = group_by_source(_read(data.uri, cache_dir, source_field=data.source_field,
                                       endpoint=endpoint, region=region))
    remote = []
    for spec in data.sources or []:
        if spec.uri:
            examples = _read(spec.uri, cache_dir, source_field=data.source_field,
                             endpoint=endpoint, region=region)
            mine = [ex for ex in examples if ex.source == spec.name]
            if not mine:
                raise DataError(f"{spec.uri}: no example has {data.source_field}={spec.name!r}")
            if len(mine) < len(examples):
                log.warning("%s: ignored %d examples of other sources", spec.uri,
                            len(examples) - len(mine))
            groups.setdefault(spec.name, []).extend(mine)
        elif spec.name not in groups:
            remote.append(spec.name)
    if not groups and not remote:
        raise DataError("the data holds no examples")
    log.info("profiling data: %d sources here (%d examples), %d remote", len(groups),
             sum(map(len, groups.values())), len(remote))
    return SourceData(groups, remote)


def site_bindings(data: DataSpec, sites: dict[str, str]) -> dict[str, str | None]:
    """source -> site: data.sources[].site, overridden by the stage's explicit bindings."""
    bound: dict[str, str | None] = {s.name: s.site for s in data.sources or [] if s.site}
    bound.update(sites)
    return bound
