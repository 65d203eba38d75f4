"""The train stage's data path: streamed shares and tokenization in worker processes.

Each rank streams the JSONL and keeps only its share (raw index i % world == rank), in the
order one process always used (sources as asked, each in file order); tokenizing in a pool of
processes gives exactly the one-process encoding; reading a quarter share holds about a
quarter of the data, not the file.
"""

from __future__ import annotations

import json
import tracemalloc
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from merit_trainer.shares import encode_share
from merit_trainer.sources import count_examples, fetch_partition_files, read_share
from meritrun.api import DataSpec
from meritrun.data import read_examples
from meritrun.textenc import encode_example


@pytest.fixture(scope="module")
def big_mixture(tmp_path_factory) -> Path:
    """3 sources interleaved, 6000 examples (about 1 MB), chat and plain rows mixed."""
    path = tmp_path_factory.mktemp("data") / "mix.jsonl"
    with path.open("w") as f:
        for i in range(6000):
            source = ("alpha", "beta", "gamma")[i % 3]
            word = f"w{i:05d}-" + "xyz"[i % 3] * (i % 37)
            row = ({"source": source, "prompt": f"copy: {word}\n", "completion": word}
                   if i % 5 else
                   {"source": source, "messages": [{"role": "user", "content": word},
                                                   {"role": "assistant", "content": word[::-1]}]})
            f.write(json.dumps(row) + "\n")
    return path


def _files(data: Path, sources: list[str], tmp: Path):
    files = fetch_partition_files(DataSpec(uri=str(data)), sources, tmp)
    return files, count_examples(files, sources, source_field="source")


def test_shares_split_the_one_process_order(big_mixture, tmp_path):
    sources = ["gamma", "alpha"]  # the partition's order, not the file's
    files, counts = _files(big_mixture, sources, tmp_path)
    assert counts == {"gamma": 2000, "alpha": 2000}
    whole = read_share(files, counts, source_field="source")
    every = read_examples([big_mixture])
    expected = [e for e in every if e.source == "gamma"] + [e for e in every
                                                            if e.source == "alpha"]
    assert list(whole) == list(range(4000)) and list(whole.values()) == expected
    shares = [read_share(files, counts, source_field="source", rank=r, world=3)
              for r in range(3)]
    assert all(i % 3 == r for r, share in enumerate(shares) for i in share)
    assert {i: e for share in shares for i, e in share.items()} == whole


def test_a_quarter_share_holds_about_a_quarter_of_the_data(big_mixture, tmp_path):
    files, counts = _files(big_mixture, ["alpha", "beta", "gamma"], tmp_path)

    def peak(world: int) -> int:
        tracemalloc.start()
        try:
            share = read_share(files, counts, source_field="source", rank=0, world=world)
            held = tracemalloc.get_traced_memory()[1]
            del share
            return held
        finally:
            tracemalloc.stop()

    whole, quarter = peak(1), peak(4)
    assert quarter < 0.4 * whole, (quarter, whole)


def test_two_tokenizer_processes_give_exactly_the_one_process_encoding(big_mixture, tmp_path,
                                                                      tiny_base, caplog):
    tokenizer = AutoTokenizer.from_pretrained(tiny_base)
    files, counts = _files(big_mixture, ["beta", "alpha"], tmp_path)
    share = read_share(files, counts, source_field="source", rank=0, world=2)
    share = dict(list(share.items())[:1200])
    one = encode_share(tokenizer, share, max_len=48)
    with caplog.at_level("INFO", logger="merit_trainer.tokenizing"):
        two = encode_share(tokenizer, share, max_len=48, workers=2, min_per_worker=1)
    assert "tokenizing 1200 examples in 2 processes" in caplog.text
    assert list(two) == list(one) and two == one
    assert one[0] == encode_example(tokenizer, share[0], max_len=48)
    assert sum(e.supervised for e in two.values()) == sum(e.supervised for e in one.values())
