"""The fused pass's norm scan (`fusedscan`) against numpy: each expert's squared update norm
(to fp64 rounding: the order differs from numpy's), the least and greatest values as torch's
aminmax gives them (NaN, inf, -0.0 included), and the judgments by valuescan's rule."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from merit_merger import fusedbounds, fusedscan
from merit_merger.dtypes import DTYPES, to_float32
from merit_merger.fused import CODES
from merit_merger.valuescan import first_problem

SPECIAL = [0.0, -0.0, 1.5, -2.25, float("inf"), -float("inf"), float("nan"), 3e-41, -7e38]


def stored(values: np.ndarray, name: str) -> np.ndarray:
    """fp32 values as the bytes of a safetensors dtype (torch's rounding)."""
    t = torch.from_numpy(values.astype(np.float32)).to(DTYPES[name].torch)
    return t.view(torch.uint8).numpy().copy()


@pytest.mark.parametrize("name", ["BF16", "F16", "F32"])
def test_value_bounds_are_torch_aminmax(name):
    rng = np.random.default_rng(3)
    for case in range(40):
        values = rng.standard_normal(int(rng.integers(1, 5000))).astype(np.float32)
        picks = rng.integers(0, len(values), 3)
        values[picks] = rng.choice(SPECIAL, 3) if case % 2 else values[picks]
        raw = stored(values, name)
        low, high = fusedbounds.value_bounds(raw, name)
        t = torch.from_numpy(raw).view(DTYPES[name].torch)
        want = [float(v) for v in torch.aminmax(t.float())]
        if any(np.isnan(want)):  # aminmax gives NaN for both; one NaN bound refuses the same
            assert np.isnan(low) or np.isnan(high)
        else:
            assert (low, high) == tuple(want)


@pytest.mark.parametrize("stored_moments", [False, True])
def test_the_scan_of_a_unit_is_numpy_s_sums_and_judgments(stored_moments):
    rng = np.random.default_rng(5)
    k, n, lo, hi = 3, 9000, 517, 8811  # a unit in the middle, not a multiple of the lanes
    base = (rng.standard_normal(n) * 0.02).astype(np.float32)
    experts = [base + (rng.standard_normal(n) * 1e-3 * (i + 1)).astype(np.float32)
               for i in range(k)]
    moments = [np.abs(rng.standard_normal(n)).astype(np.float32) for _ in range(k)]
    experts[1][4000] = np.nan
    moments[2][lo + 3] = -1.0
    names = ["BF16", "F16", "F32"]
    arrays = [stored(e, names[i]) for i, e in enumerate(experts)] + [stored(base, "BF16")]
    arrays += [stored(m, "F32") for m in moments] if stored_moments else []
    dtypes = [*names, "BF16", *(["F32"] * k if stored_moments else [])]
    codes = np.array([CODES[d] for d in dtypes], np.int64)
    addresses = np.array([a.ctypes.data for a in arrays], np.int64)
    judged = fusedscan.scanner("t", k, codes, stored=stored_moments)(addresses, lo, hi)

    widened = [to_float32(a, DTYPES[d]) for a, d in zip(arrays, dtypes, strict=True)]
    theta0 = widened[k][lo:hi]
    for i in range(k):
        theta = widened[i][lo:hi]
        v = widened[k + 1 + i][lo:hi] if stored_moments else None
        problem = first_problem("t", (theta.min(), theta.max()),
                                None if v is None else (v.min(), v.max()))
        d = (theta - theta0).astype(np.float64)
        want = (problem, 0.0) if problem is not None else (None, float(np.dot(d, d)))
        assert judged[i][0] == want[0]
        assert judged[i][1] == pytest.approx(want[1], rel=1e-12)
    assert judged[1][0] == ("non-finite", "NaN/Inf in t")
    assert (judged[2][0] is not None) == stored_moments  # a negative moment


def test_held_inputs_are_scanned_where_they_are_held():
    """A plan that holds its inputs (TIES) gives their addresses; the unit's are not theirs."""
    base = np.linspace(-1, 1, 300).astype(np.float32)
    expert = base + np.float32(0.5)
    arrays = [stored(expert, "F32"), stored(base, "F32")]
    held = np.array([a.ctypes.data for a in arrays], np.int64)
    codes = np.array([CODES["F32"]] * 3, np.int64)
    garbage = np.full(2400, 0xFF, np.uint8)  # NaNs where the unit's own buffers would be
    unit = np.array([garbage.ctypes.data] * 3, np.int64)
    scan = fusedscan.scanner("t", 1, codes, stored=False, held=held)
    assert scan(unit, 0, 300) == [(None, pytest.approx(300 * 0.25))]
