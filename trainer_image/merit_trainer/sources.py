"""Loading the examples of one partition's sources, wherever the data lives.

A run's data is either one mixture file (`data.uri`, examples carry a source field) or one file
per source (`data.sources[].uri`), local or in S3. A partition trains on a subset of sources, so
this module reads only the files it needs and keeps only the examples of those sources. Files
are streamed twice (count, then keep one rank's share), never held whole: a 1M-example mixture
costs each rank its share, not the file. It does no tokenization (shares.py does).
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


def fetch_partition_files(
    data: DataSpec,
    sources: Sequence[str],
    cache_dir: Path,
    *,
    endpoint: str | None = None,
    region: str | None = None,
) -> dict[Path, list[str]]:
    """Local path -> the requested sources it holds (fetched from S3 into cache_dir)."""
    wanted = list(dict.fromkeys(sources))
    if not wanted:
        raise DataError("the partition lists no sources")
    files: dict[Path, list[str]] = {}
    for uri, names in source_files(data, wanted).items():
        try:
            path = fetch_path(uri, Path(cache_dir), endpoint=endpoint, region=region)
        except MeritRunError as e:
            raise DataError(f"cannot fetch data {uri} (sources {', '.join(names)}): {e}") from e
        files.setdefault(path, []).extend(names)
    return files


def count_examples(files: dict[Path, list[str]], sources: Sequence[str], *,
                   source_field: str) -> dict[str, int]:
    """source -> examples, sources in the order asked for, by streaming every file once.

    Examples of other sources in the same file are ignored (a mixture file holds every
    partition's data). A requested source with no examples is a DataError naming it: training
    a partition on silently missing data would skew the token-weighted merge.
    """
    counts = {name: 0 for name in dict.fromkeys(sources)}
    for path, names in files.items():
        keep, other = set(names), 0
        for example in iter_examples(path, source_field=source_field):
            if example.source in keep:
                counts[example.source] += 1
            else:
                other += 1
        log.info("read %s: %s (%d examples of other sources ignored)", path,
                 ", ".join(f"{n}={counts[n]}" for n in names), other)
    empty = [name for name, n in counts.items() if not n]
    if empty:
        raise DataError(
            f"no examples for source(s) {', '.join(map(repr, empty))} "
            f"(field {source_field!r} never has that value in the data)"
        )
    return counts


def read_share(files: dict[Path, list[str]], counts: dict[str, int], *, source_field: str,
               rank: int = 0, world: int = 1) -> dict[int, Example]:
    """raw index -> example, for the raw indices i with i % world == rank, streaming.

    The raw index is the example's place in the partition: sources in the order of `counts`,
    each in file order. Only this share is ever held, so the ranks of a node hold the data
    once between them.
    """
    offsets, start = {}, 0
    for name, n in counts.items():
        offsets[name], start = start, start + n
    share: dict[int, Example] = {}
    for path, names in files.items():
        seen = dict.fromkeys(names, 0)
        for example in iter_examples(path, source_field=source_field):
            if example.source not in seen:
                continue
            index = offsets[example.source] + seen[example.source]
            seen[example.source] += 1
            if index % world == rank:
                share[index] = example
    return dict(sorted(share.items()))


def load_partition_examples(
    data: DataSpec,
    sources: Sequence[str],
    cache_dir: Path,
    *,
    endpoint: str | None = None,
    region: str | None = None,
) -> dict[str, list[Example]]:
    """source -> its examples in file order, sources in the order asked for (every example,
    in one process: profiling-sized uses and tests; training reads its share only)."""
    files = fetch_partition_files(data, sources, cache_dir, endpoint=endpoint, region=region)
    counts = count_examples(files, sources, source_field=data.source_field)
    found: dict[str, list[Example]] = {name: [] for name in counts}
    for example in read_share(files, counts, source_field=data.source_field).values():
        found[example.source].append(example)
    return found
