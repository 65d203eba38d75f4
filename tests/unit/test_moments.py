"""Adam second moments for OTA: rank-1 factors, the optimizer_v file, and reading an optimizer."""

from __future__ import annotations

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from merit_trainer.moments import (
    compress_rank1,
    dense_second_moment,
    expand_rank1,
    load_second_moments,
    optimizer_second_moments,
    save_second_moments,
)
from meritrun.errors import IntegrityError


def _positive(*shape: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(*shape, generator=g) + 0.01


def test_rank1_factors_reconstruct_an_exactly_rank1_tensor() -> None:
    a, b = _positive(6), _positive(2, 5, seed=1)
    v = torch.einsum("i,jk->ijk", a, b)  # viewed as (6, 10) it is outer(a, b.flatten())
    factors = compress_rank1(v)
    assert factors["row"].shape == (6,) and factors["col"].shape == (10,)
    assert factors["total"].shape == (1,)
    torch.testing.assert_close(factors["row"], v.reshape(6, -1).sum(1))
    torch.testing.assert_close(factors["col"], v.reshape(6, -1).sum(0))
    rebuilt = expand_rank1(factors["row"], factors["col"], factors["total"], v.shape)
    assert rebuilt.shape == v.shape and rebuilt.dtype == torch.float32
    torch.testing.assert_close(rebuilt, v, rtol=1e-5, atol=0)


def test_rank1_keeps_row_and_column_sums_of_any_tensor() -> None:
    v = _positive(7, 4, seed=2) ** 3  # far from rank 1
    f = compress_rank1(v)
    v_hat = expand_rank1(f["row"], f["col"], f["total"], v.shape)
    assert not torch.allclose(v_hat, v, rtol=1e-2)
    torch.testing.assert_close(v_hat.sum(1), v.sum(1), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(v_hat.sum(0), v.sum(0), rtol=1e-5, atol=1e-6)


def test_zero_total_expands_to_zeros_not_nan() -> None:
    f = compress_rank1(torch.zeros(3, 4))
    assert torch.equal(expand_rank1(f["row"], f["col"], f["total"], (3, 4)), torch.zeros(3, 4))


def test_one_dimensional_tensors_stay_exact() -> None:
    v = _positive(9, seed=3).double()
    f = compress_rank1(v)
    assert list(f) == ["exact"] and f["exact"].dtype == torch.float32
    torch.testing.assert_close(f["exact"], v.float())


@pytest.fixture
def moments() -> dict[str, torch.Tensor]:
    return {"model.layers.0.mlp.up_proj.weight": _positive(8, 3, seed=4),
            "model.norm.weight": _positive(3, seed=5),
            "model.conv.weight": _positive(4, 2, 3, seed=6)}


def test_rank1_file_layout_and_metadata(tmp_path, moments) -> None:
    path = save_second_moments(tmp_path / "v.safetensors", moments, kind="rank1", beta2=0.95,
                               step=42)
    with safe_open(str(path), framework="pt") as f:
        keys, meta = set(f.keys()), f.metadata()
        conv_col = f.get_tensor("model.conv.weight::col")
    assert keys == {
        "model.layers.0.mlp.up_proj.weight::row", "model.layers.0.mlp.up_proj.weight::col",
        "model.layers.0.mlp.up_proj.weight::total", "model.norm.weight",
        "model.conv.weight::row", "model.conv.weight::col", "model.conv.weight::total",
    }
    assert conv_col.shape == (6,)
    assert meta == {"kind": "rank1", "beta2": "0.95", "step": "42", "bias_corrected": "false"}


def test_rank1_round_trip(tmp_path, moments) -> None:
    path = save_second_moments(tmp_path / "v.safetensors", moments, kind="rank1", beta2=0.999,
                               step=7)
    kind, entries, meta = load_second_moments(path)
    assert kind == "rank1" and float(meta["beta2"]) == 0.999 and int(meta["step"]) == 7
    up = entries["model.layers.0.mlp.up_proj.weight"]
    assert isinstance(up, tuple) and len(up) == 3
    torch.testing.assert_close(up[0], moments["model.layers.0.mlp.up_proj.weight"].sum(1))
    assert torch.equal(entries["model.norm.weight"], moments["model.norm.weight"])
    conv = dense_second_moment(entries["model.conv.weight"], (4, 2, 3))
    expected = compress_rank1(moments["model.conv.weight"])
    torch.testing.assert_close(
        conv, expand_rank1(expected["row"], expected["col"], expected["total"], (4, 2, 3)))


def test_full_round_trip_is_exact(tmp_path, moments) -> None:
    path = save_second_moments(tmp_path / "v.safetensors", moments, kind="full", beta2=0.999,
                               step=3)
    kind, entries, meta = load_second_moments(path)
    assert kind == "full" and meta["kind"] == "full" and meta["bias_corrected"] == "false"
    assert set(entries) == set(moments)
    for name, v in moments.items():
        assert torch.equal(dense_second_moment(entries[name], v.shape), v)


def test_dense_second_moment_refuses_a_wrong_shape(tmp_path, moments) -> None:
    path = save_second_moments(tmp_path / "v.safetensors", moments, kind="rank1", beta2=0.9,
                               step=1)
    _, entries, _ = load_second_moments(path)
    with pytest.raises(IntegrityError, match="do not fit"):
        dense_second_moment(entries["model.layers.0.mlp.up_proj.weight"], (3, 8))
    with pytest.raises(IntegrityError, match="shape"):
        dense_second_moment(entries["model.norm.weight"], (4,))


def test_load_refuses_unknown_kind_and_missing_factors(tmp_path) -> None:
    bad_kind = tmp_path / "kind.safetensors"
    save_file({"w": torch.ones(2)}, str(bad_kind), metadata={"kind": "rank2"})
    with pytest.raises(IntegrityError, match="kind"):
        load_second_moments(bad_kind)
    partial = tmp_path / "partial.safetensors"
    save_file({"w::row": torch.ones(2), "w::col": torch.ones(3)}, str(partial),
              metadata={"kind": "rank1", "beta2": "0.9", "step": "1"})
    with pytest.raises(IntegrityError, match="total"):
        load_second_moments(partial)


def test_optimizer_second_moments_are_raw_exp_avg_sq() -> None:
    torch.manual_seed(0)
    layer = torch.nn.Linear(4, 3)
    named = dict(layer.named_parameters())
    opt = torch.optim.AdamW(layer.parameters(), lr=1e-2, betas=(0.9, 0.98))
    layer(torch.randn(5, 4)).pow(2).sum().backward()
    grads = {n: p.grad.clone() for n, p in named.items()}
    opt.step()
    named_v, beta2, step = optimizer_second_moments(opt, named)
    assert beta2 == 0.98 and step == 1
    for name, g in grads.items():  # after one step, v = (1 - beta2) g^2 (no bias correction)
        torch.testing.assert_close(named_v[name], (1 - 0.98) * g * g)
    for _ in range(2):
        opt.zero_grad()
        layer(torch.randn(5, 4)).sum().backward()
        opt.step()
    named_v, _, step = optimizer_second_moments(opt, named)
    assert step == 3
    assert torch.equal(named_v["weight"], opt.state[layer.weight]["exp_avg_sq"])


def test_parameters_without_state_get_zero_moments() -> None:
    frozen = torch.nn.Parameter(torch.ones(2, 2))
    opt = torch.optim.AdamW([frozen])
    named_v, _, step = optimizer_second_moments(opt, {"frozen": frozen})
    assert step == 0 and torch.equal(named_v["frozen"], torch.zeros(2, 2))
