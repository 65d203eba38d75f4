"""Merge methods against independent element-wise computations (numpy, float64), the
registry, and the exact streaming k-th largest used for FFG thresholds."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from merit_merger.methods import METHODS, MergeInputs, TensorStats, get_method
from merit_merger.methods.dare import dare, dare_seed, keep_mask
from merit_merger.methods.ota import ota
from merit_merger.methods.task_arithmetic import task_arithmetic
from merit_merger.methods.ties import ties
from merit_merger.methods.token_weighted import token_weighted
from merit_merger.methods.uniform import uniform
from merit_merger.selection import KthLargest, keep_count
from meritrun.errors import SpecError

FP32 = 2e-6  # fp32 accumulation vs a float64 reference, for values of order 1


def tensors(k: int, shape=(6, 7), seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=g)
    experts = [base + 0.1 * torch.randn(shape, generator=g) for _ in range(k)]
    moments = [torch.exp(torch.randn(shape, generator=g) * 2 - 10) for _ in range(k)]
    return base, experts, moments


def np64(ts):
    return [t.double().numpy() for t in ts]


def assert_close(got: torch.Tensor, want: np.ndarray, tol: float = FP32) -> None:
    assert got.dtype == torch.float32
    assert np.max(np.abs(got.double().numpy() - want)) <= tol


def test_registry_accepts_kebab_and_camel_names():
    assert {"token-weighted", "uniform", "task-arithmetic", "ties", "dare", "ota"} <= set(METHODS)
    for spec, key in [("tokenWeighted", "token-weighted"), ("taskArithmetic", "task-arithmetic"),
                      ("token_weighted", "token-weighted"), ("ota", "ota")]:
        assert get_method(spec).key == key
        assert get_method(key).spec_name == spec if "_" not in spec else True
    with pytest.raises(SpecError, match="unknown merge method"):
        get_method("slerp")


def test_params_are_declared_and_validated():
    assert get_method("ota").parse_params({}).epsilon == 1e-26
    with pytest.raises(SpecError, match="takes no parameter"):
        get_method("token-weighted").parse_params({"density": 0.3})
    assert get_method("token-weighted").parse_params({"density": 0.3}, strict=False) is not None
    with pytest.raises(SpecError, match="density"):
        get_method("ties").parse_params({"density": 1.5})


def test_token_weighted_and_uniform_match_elementwise():
    _, experts, _ = tensors(3)
    tokens = [100, 300, 600]
    e = np64(experts)
    want = sum(n / sum(tokens) * x for n, x in zip(tokens, e, strict=True))
    assert_close(token_weighted(experts, tokens), want)
    assert_close(uniform(experts), sum(e) / 3)


def test_task_arithmetic_matches_elementwise():
    base, experts, _ = tensors(3)
    b, e = base.double().numpy(), np64(experts)
    assert_close(task_arithmetic(base, experts, scale=0.4), b + 0.4 * sum(x - b for x in e))


def ties_reference(b, experts, density, scale):
    out = np.empty_like(b)
    taus = []
    for x in experts:
        tau = (x - b).reshape(-1)
        k = max(1, int(density * tau.size))
        keep = np.zeros(tau.size, bool)
        keep[np.argsort(-np.abs(tau), kind="stable")[:k]] = True
        taus.append(np.where(keep, tau, 0.0))
    for i in range(b.size):
        vals = [t[i] for t in taus]
        sign = 1.0 if sum(vals) >= 0 else -1.0
        agree = [v for v in vals if np.sign(v) == sign]
        out.reshape(-1)[i] = b.reshape(-1)[i] + scale * (sum(agree) / max(1, len(agree)))
    return out


def test_ties_matches_elementwise():
    base, experts, _ = tensors(3, shape=(9, 11), seed=1)
    want = ties_reference(base.double().numpy(), np64(experts), 0.3, 0.8)
    assert_close(ties(base, experts, density=0.3, scale=0.8), want)


def test_dare_matches_elementwise_and_is_reproducible():
    base, experts, _ = tensors(2, shape=(40, 50), seed=2)
    got = dare(base, experts, name="w", density=0.4, scale=0.7, seed=3)
    b, want = base.double().numpy(), np.zeros((40, 50))
    for k, x in enumerate(np64(experts)):
        keep = keep_mask((40, 50), density=0.4, seed=dare_seed(3, "w", k)).numpy()
        assert 0.3 < keep.mean() < 0.5
        want += np.where(keep, (x - b) / 0.4, 0.0)
    assert_close(got, b + 0.7 * want)
    assert torch.equal(got, dare(base, experts, name="w", density=0.4, scale=0.7, seed=3))
    assert not torch.equal(got, dare(base, experts, name="v", density=0.4, scale=0.7, seed=3))


def ota_reference(b, experts, moments, p, eps, thresholds=None):
    """Element by element in float64; only the FFG mask decision is taken in fp32, since
    the saliency threshold is defined on fp32 values (s = (tau * tau) * v in fp32)."""
    out = np.empty_like(b)
    for i in np.ndindex(b.shape):
        num = den = 0.0
        for k, (x, v) in enumerate(zip(experts, moments, strict=True)):
            tau = x[i] - b[i]
            w = v[i] ** p + eps
            tau32 = np.float32(np.float32(x[i]) - np.float32(b[i]))
            s32 = np.float32(tau32 * tau32) * np.float32(v[i])
            if thresholds is not None and not s32 >= np.float32(thresholds[k]):
                w = 0.0
            num, den = num + w * tau, den + w
        out[i] = b[i] + num / den if den > 0 else b[i]
    return out


@pytest.mark.parametrize("power", [0.5, 1.0])
def test_ota_matches_elementwise(power):
    base, experts, moments = tensors(3, seed=4)
    want = ota_reference(base.double().numpy(), np64(experts), np64(moments), power, 1e-26)
    assert_close(ota(base, experts, moments, power=power, epsilon=1e-26), want)


def test_ota_with_ffg_masks_and_all_masked_fallback():
    base, experts, moments = tensors(3, seed=5)
    sal = [((x - base) ** 2 * v).reshape(-1) for x, v in zip(experts, moments, strict=True)]
    thresholds = [float(s.kthvalue(s.numel() - 12).values) for s in sal]  # keep the top 13
    stats = TensorStats()
    got = ota(base, experts, moments, thresholds=thresholds, stats=stats)
    want = ota_reference(base.double().numpy(), np64(experts), np64(moments), 0.5, 1e-26,
                         thresholds)
    assert_close(got, want)
    assert stats.kept == [13, 13, 13]
    masked = torch.stack([s.reshape(base.shape) < t for s, t in zip(sal, thresholds,
                                                                   strict=True)]).all(0)
    assert stats.fallback == int(masked.sum()) > 0
    assert torch.equal(got[masked], base[masked])  # every expert masked -> the base value


def test_large_epsilon_turns_ota_into_a_plain_average():
    base, experts, moments = tensors(3, seed=6)
    got = ota(base, experts, moments, epsilon=1e6)
    assert torch.allclose(got, uniform(experts), atol=1e-5)


def test_identical_models_merge_to_the_model():
    base, experts, moments = tensors(1, seed=7)
    theta = experts[0]
    same = [theta.clone() for _ in range(3)]
    for key in ("token-weighted", "uniform", "ota"):
        method = get_method(key)
        inputs = MergeInputs("w", base, same, [1.0, 2.0, 3.0], [moments[0]] * 3)
        assert torch.allclose(method.merge(inputs, method.parse_params({})), theta, atol=1e-6)
    ta = get_method("task-arithmetic")
    merged = ta.merge(MergeInputs("w", base, same, [1, 1, 1]), ta.parse_params({"scale": 1 / 3}))
    assert torch.allclose(merged, theta, atol=1e-6)
    for key in ("ties", "dare"):  # experts equal to the base: every update is zero
        method = get_method(key)
        inputs = MergeInputs("w", base, [base.clone()] * 3, [1, 1, 1])
        assert torch.equal(method.merge(inputs, method.parse_params({})), base)


@pytest.mark.parametrize("density", [1e-4, 0.01, 0.3, 1.0])
def test_streaming_kth_largest_equals_topk_over_the_concatenation(density):
    g = torch.Generator().manual_seed(8)
    parts = [torch.exp(torch.randn(n, generator=g) * 6) for n in (1000, 5000, 77)]
    parts.append(torch.zeros(300))  # ties at zero, and -0.0 must count as 0
    parts.append(-torch.zeros(5))
    parts.append(parts[0][:200].clone())  # duplicated values
    values = torch.cat([p.reshape(-1) for p in parts]).abs()
    k = keep_count(values.numel(), density)
    sel = KthLargest(k)
    for p in parts:
        sel.add_first(p)
    sel.end_first()
    for p in parts:
        sel.add_second(p)
    assert sel.result() == float(torch.topk(values, k).values[-1])
