"""The verify pass of a streamed merge: one front-to-back read per file hashes every byte and
checks every stored value, whatever the chunk size (pieces cross chunk boundaries)."""

from __future__ import annotations

import hashlib

import pytest
import torch
from safetensors.torch import save_file

from merit_merger.remote import SequentialReader
from merit_merger.streamcheck import stream_file


@pytest.fixture
def weights(tmp_path):
    g = torch.Generator().manual_seed(0)
    state = {"a": torch.randn(7, 5, generator=g), "b": torch.randn(33, generator=g).bfloat16(),
             "c": torch.arange(10, dtype=torch.int64), "d": torch.randn(3, 3, generator=g).half()}
    return tmp_path / "w.safetensors", state


@pytest.mark.parametrize("chunk", [8, 24, 100, 1 << 20])
def test_every_byte_is_hashed_once_and_every_value_checked(weights, chunk):
    path, state = weights
    save_file(state, str(path))
    digest, problem = stream_file(path, chunk=chunk)
    assert digest == hashlib.sha256(path.read_bytes()).hexdigest() and problem is None
    state["d"][2, 1] = float("nan")  # the last float tensor, in the last chunk
    save_file(state, str(path))
    digest, problem = stream_file(path, chunk=chunk)
    assert digest == hashlib.sha256(path.read_bytes()).hexdigest()
    assert problem == ("non-finite", "NaN/Inf in d")


def test_moments_must_be_non_negative_and_magnitudes_bounded(weights):
    path, state = weights
    save_file({"v": torch.tensor([0.0, 1e-8, -1e-9])}, str(path))
    assert stream_file(path, moments=True)[1][0] == "second-moments"
    save_file({"w": torch.tensor([1.0, -3e16])}, str(path))
    assert stream_file(path)[1][0] == "magnitude"


def test_a_short_file_is_an_error_not_a_short_hash(tmp_path):
    path = tmp_path / "x.bin"
    path.write_bytes(b"0123456789")
    with SequentialReader(path, chunk=4) as reader:
        assert bytes(reader.take(3)) == b"012" and bytes(reader.take(4)) == b"3456"
        with pytest.raises(EOFError):
            reader.take(4)
        assert reader.drain() == hashlib.sha256(b"0123456789").hexdigest()
