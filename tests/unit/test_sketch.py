"""Count-sketch, gradient sketching, calibration and conflict PCA on real tiny-model gradients."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch

from merit_trainer.profiling.calibration import (
    build_calibration,
    calibration_indices,
    encode_supervised,
)
from merit_trainer.profiling.conflict import cosine_matrix, fix_signs, principal_axes
from merit_trainer.profiling.gradients import (
    GradientSketcher,
    load_base,
    parameter_pattern,
    select_parameters,
)
from merit_trainer.profiling.sketch import CHUNK, CountSketch
from merit_trainer.profiling.sketchset import (
    SketchSet,
    combine_sketch_sets,
    load_sketch_set,
    save_sketch_set,
)
from meritrun.data import group_by_source, iter_examples
from meritrun.errors import DataError, SpecError
from meritrun.textenc import collate, token_losses


def _cos(a, b) -> float:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))


def test_sketch_is_linear_seeded_and_cache_independent():
    torch.manual_seed(0)
    a, b = torch.randn(5000), torch.randn(5000)
    sk = CountSketch(256, seed=1)
    assert torch.allclose(sk.project("w", a + 2 * b), sk.project("w", a) + 2 * sk.project("w", b),
                          atol=1e-4)
    uncached = CountSketch(256, seed=1, cache_bytes=0)
    assert torch.equal(uncached.project("w", a), sk.project("w", a)) and uncached.cached_bytes == 0
    assert not torch.allclose(CountSketch(256, seed=2).project("w", a), sk.project("w", a))
    assert not torch.allclose(sk.project("v", a), sk.project("w", a))  # name is part of the key
    # norms are preserved in expectation: ||sketch|| close to ||x|| for k << n
    assert abs(sk.project("w", a).norm().item() / a.norm().item() - 1) < 0.15


def test_sketch_handles_parameters_larger_than_a_chunk():
    x = torch.zeros(CHUNK + 1000)
    x[CHUNK + 10] = 3.0  # one element in the second chunk
    s = CountSketch(64, seed=0).project("big", x)
    assert torch.count_nonzero(s) == 1 and abs(s).sum().item() == pytest.approx(3.0)


def test_sketch_preserves_cosines_of_random_vectors():
    rng = np.random.default_rng(0)
    base = rng.standard_normal(200_000)
    sk = CountSketch(8192, seed=0)
    for mix in (0.0, 0.5, 0.9):
        other = mix * base + np.sqrt(1 - mix**2) * rng.standard_normal(base.size)
        pa = sk.project("p", torch.from_numpy(base).float())
        pb = sk.project("p", torch.from_numpy(other).float())
        assert abs(_cos(pa, pb) - _cos(base, other)) < 0.05


_CHILD = (
    "import torch, sys; from merit_trainer.profiling.sketch import CountSketch;"
    "x = torch.arange(3000, dtype=torch.float32).sin();"
    "sys.stdout.write(CountSketch(64, seed=5).project('l.w', x).numpy().tobytes().hex())"
)


def test_sketch_is_identical_in_another_process():
    out = subprocess.run([sys.executable, "-c", _CHILD], capture_output=True, text=True,
                         check=True, timeout=120).stdout
    here = CountSketch(64, seed=5).project("l.w", torch.arange(3000, dtype=torch.float32).sin())
    assert bytes.fromhex(out) == here.numpy().tobytes()


def test_parameter_filters(tiny_base):
    model, _ = load_base(tiny_base, device=torch.device("cpu"))
    names = [n for n, _ in select_parameters(model, "attention")]
    assert names and all(".self_attn." in n for n in names)
    assert any(n.endswith("o_proj.weight") for n in names)
    assert len(select_parameters(model, "all")) == len(list(model.parameters()))
    assert all("mlp" in n for n, _ in select_parameters(model, r"mlp\.down_proj"))
    gpt2 = parameter_pattern("attention")
    assert gpt2.search("transformer.h.0.attn.c_attn.weight")
    assert gpt2.search("transformer.h.3.attn.c_proj.bias")
    assert not gpt2.search("transformer.h.0.mlp.c_proj.weight")
    with pytest.raises(SpecError, match="invalid parameter regex"):
        select_parameters(model, "([")
    with pytest.raises(SpecError, match="matches no parameter"):
        select_parameters(model, "nothing-like-this")


def test_calibration_stride_sample_and_short_sources():
    assert calibration_indices(20, stride=5, samples=10, seed=0, source="a") == [0, 5, 10, 15]
    idx = calibration_indices(1000, stride=5, samples=50, seed=0, source="a")
    assert len(idx) == 50 and all(i % 5 == 0 for i in idx) and idx == sorted(idx)
    assert idx == calibration_indices(1000, stride=5, samples=50, seed=0, source="a")
    assert idx != calibration_indices(1000, stride=5, samples=50, seed=1, source="a")
    calib = build_calibration({"big": list(range(1000)), "small": list(range(7))}, stride=5,
                              samples=50, seed=0)
    assert calib.counts() == {"big": 50, "small": 2} and calib.short == ["small"]


def _dense_gradients(model_dir, examples_by_source, names, parameters):
    """Independent reference: one full batch per source, autograd over the filtered params."""
    model, tok = load_base(model_dir, device=torch.device("cpu"))
    params = [p for _, p in select_parameters(model, parameters)]
    dense = {}
    for name in names:
        encoded = encode_supervised(tok, examples_by_source[name], max_len=512)
        batch = collate(encoded, pad_id=tok.pad_token_id)
        summed, counts = token_losses(model, batch)
        grads = torch.autograd.grad(summed.sum() / counts.sum(), params)
        dense[name] = torch.cat([g.reshape(-1) for g in grads]).double().numpy()
    return dense


@pytest.fixture(scope="module")
def calibration_examples(tiny_mixture):
    groups = group_by_source(iter_examples(tiny_mixture.train))
    return {s: exs[:12] for s, exs in groups.items()}


@pytest.mark.parametrize("parameters", ["all", "attention"])
def test_sketched_gradient_cosines_match_exact_ones(tiny_base, calibration_examples, parameters):
    names = list(calibration_examples)
    dense = _dense_gradients(tiny_base, calibration_examples, names, parameters)
    model, tok = load_base(tiny_base, device=torch.device("cpu"))
    sketch = CountSketch(8192, seed=0)
    sketcher = GradientSketcher(model, parameters, sketch)
    rows = {}
    for name in names:
        encoded = encode_supervised(tok, calibration_examples[name], max_len=512)
        rows[name], _ = sketcher.sketch_source(encoded, micro_batch_size=5,
                                               pad_id=tok.pad_token_id)
    sketcher.close()
    assert all(p.grad is None for p in model.parameters())  # freed right after sketching
    assert sum(p.requires_grad for p in model.parameters()) == len(sketcher.selected)
    exact = cosine_matrix(np.stack([dense[n] for n in names]))
    sketched = cosine_matrix(np.stack([rows[n] for n in names]))
    assert np.abs(exact - sketched).max() < 0.05
    # micro-batches of 5, token-weighted, add up to exactly the full-batch mean-loss gradient
    name = names[0]
    reference = torch.zeros(8192, dtype=torch.float64)
    offset = 0
    for pname, p in sketcher.selected:
        part = torch.from_numpy(dense[name][offset:offset + p.numel()]).float()
        sketch.add(reference, pname, part)
        offset += p.numel()
    np.testing.assert_allclose(rows[name], reference.numpy(), rtol=1e-3, atol=1e-6)


def test_conflict_pca_finds_two_planted_groups():
    rng = np.random.default_rng(1)
    common, axis = rng.standard_normal(500), rng.standard_normal(500)
    rows = [common + sign * axis + 0.1 * rng.standard_normal(500) for sign in (1, 1, -1, -1)]
    g = np.stack(rows) * np.array([[1.0], [5.0], [0.2], [3.0]])  # scale must not matter
    c = cosine_matrix(g)
    assert np.allclose(np.diag(c), 1) and np.allclose(c, c.T)
    pca = principal_axes(c, 2, centered=True)
    assert np.sign(pca.scores[0, 0]) == np.sign(pca.scores[1, 0]) != np.sign(pca.scores[2, 0])
    assert pca.explained_variance[0] > 0.9 and sum(pca.explained_variance) <= 1 + 1e-9
    assert np.abs(pca.scores[:, 0]).argmax() == np.argmax(pca.scores[:, 0])  # sign convention
    uncentred = principal_axes(c, 1, centered=False)
    assert not uncentred.centered and uncentred.eigenvalues[0] > pca.eigenvalues[0]
    assert np.array_equal(fix_signs(-pca.scores), fix_signs(pca.scores))
    with pytest.raises(DataError, match="zero"):
        cosine_matrix(np.zeros((2, 3)), ["a", "b"])


def test_sketch_sets_save_load_and_combine(tmp_path):
    settings = {"base": "sha256:x", "dim": 4, "seed": 0, "parameters": "all", "projection": "cs"}
    a = SketchSet(["a"], np.ones((1, 4)), {"a": 10}, {"a": 3}, [], settings)
    b = SketchSet(["b", "c"], np.arange(8.0).reshape(2, 4), {"b": 1, "c": 2}, {}, ["c"], settings)
    save_sketch_set(b, tmp_path / "site-b")
    loaded = load_sketch_set(tmp_path / "site-b")
    assert loaded.names == ["b", "c"] and np.array_equal(loaded.matrix, b.matrix)
    both = combine_sketch_sets([a, loaded])
    assert both.names == ["a", "b", "c"] and both.matrix.shape == (3, 4)
    assert both.tokens == {"a": 10, "b": 1, "c": 2} and both.short == ["c"]
    other_base = SketchSet(["d"], np.ones((1, 4)), {"d": 1}, {}, [], {**settings, "base": "y"})
    with pytest.raises(SpecError, match="disagree on base"):
        combine_sketch_sets([a, other_base])
    with pytest.raises(SpecError, match="'a' was sketched more than once"):
        combine_sketch_sets([a, a])
