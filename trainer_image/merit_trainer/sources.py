"""Loading the examples of one partition's sources, wherever the data lives.

A run's data is either one mixture file (`data.uri`, examples carry a source field) or one file
per source (`data.sources[].uri`), local or in S3. A partition trains on a subset of sources, so
this module reads only the files it needs and keeps only the examples of those sources. It does
no tokenization (training.py does, with the model's tokenizer).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

from meritrun.api import DataSpec
from meritrun.data import Example, iter_examples
from meritrun.errors import DataError, MeritRunError
from meritrun.storage import fetch_path

log = logging.getLogger(__name__)


def source_files(data: DataSpec, sources: Sequence[str]) -> dict[str, list[str]]:
    """URI -> the requested sources it holds. A source declared in data.sources with a uri
    reads that file; any other source reads data.uri."""
    declared = {s.name: s for s in data.sources or []}
    files: dict[str, list[str]] = {}
    for name in sources:
        spec = declared.get(name)
        if spec is not None and spec.uri:
            uri = spec.uri
        elif data.uri:
            uri = data.uri
        elif spec is not None:
            where = f" (it lives at site {spec.site!r}, which must supply it)" if spec.site else ""
            raise DataError(f"source {name!r} has no data uri{where}")
        else:
            raise DataError(f"source {name!r} is not in data.sources and data.uri is unset")
        files.setdefault(uri, []).append(name)
    return files


def load_partition_examples(
    data: DataSpec,
    sources: Sequence[str],
    cache_dir: Path,
    *,
    endpoint: str | None = None,
    region: str | None = None,
) -> dict[str, list[Example]]:
    """source -> its examples in file order, sources in the order asked for.

    Examples of other sources in the same file are ignored (a mixture file holds every
    partition's data). A requested source with no examples is a DataError naming it: training
    a partition on silently missing data would skew the token-weighted merge.
    """
    wanted = list(dict.fromkeys(sources))
    if not wanted:
        raise DataError("the partition lists no sources")
    found: dict[str, list[Example]] = {name: [] for name in wanted}
    for uri, names in source_files(data, wanted).items():
        try:
            path = fetch_path(uri, Path(cache_dir), endpoint=endpoint, region=region)
        except MeritRunError as e:
            raise DataError(f"cannot fetch data {uri} (sources {', '.join(names)}): {e}") from e
        keep, other = set(names), 0
        for example in iter_examples(path, source_field=data.source_field):
            if example.source in keep:
                found[example.source].append(example)
            else:
                other += 1
        log.info("read %s: %s (%d examples of other sources ignored)", uri,
                 ", ".join(f"{n}={len(found[n])}" for n in names), other)
    empty = [name for name, examples in found.items() if not examples]
    if empty:
        raise DataError(
            f"no examples for source(s) {', '.join(map(repr, empty))} "
            f"(field {data.source_field!r} never has that value in the data)"
        )
    return found
