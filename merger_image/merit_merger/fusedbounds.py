"""The least and greatest of stored float values, by one compiled pass over their bits.

The value checks (NaN/Inf, magnitude, second moments >= 0: `streamcheck.bounds_problem`)
need only the least and greatest values, NaN when one is NaN (as torch's aminmax gives
them). Here they are order keys of the fp32 bits (the magnitude bits, negated for a set sign
bit): integer min and max vectorise where float ones (NaN) do not, and a NaN keys above inf,
so it comes back as the NaN it is. The streamed stage's verify pass (`streamcheck`) checks
each piece of a file so, and the fused pass's norm scan (`fusedscan`) each unit, neither
with torch. Apart from `fusedscan` because `streamcheck` imports it (fusedscan imports the
rule's module, `valuescan`, which imports streamcheck).
"""

from __future__ import annotations

import numpy as np
from numba import njit

from .fused import BF16, CHUNK, CODES, F32, _widen

MAGNITUDE = np.int32(0x7FFFFFFF)


@njit(cache=True, nogil=True, inline="always")
def key_bounds(bits, n, least, greatest):
    """(least, greatest) order keys of fp32 bits[:n], from those given."""
    for i in range(n):
        m = bits[i] & MAGNITUDE
        key = -m if bits[i] < 0 else m
        least = min(least, key)
        greatest = max(greatest, key)
    return least, greatest


@njit(cache=True, nogil=True)
def key_range(address, code, n):
    """The least and greatest order keys of n stored values (`code`) at address."""
    x = np.empty(CHUNK, np.float32)
    bits = x.view(np.int32)
    least, greatest = MAGNITUDE, -MAGNITUDE
    for start in range(0, n, CHUNK):
        m = min(CHUNK, n - start)
        _widen(address, code, start, m, x)
        least, greatest = key_bounds(bits, m, least, greatest)
    return least, greatest


def value_bounds(raw: np.ndarray, dtype_name: str) -> tuple[float, float] | None:
    """(least, greatest) of the values stored in `raw` (uint8, contiguous) as torch's aminmax
    gives them, NaN when one is NaN (either bound: `bounds_problem` refuses it); None when
    the kernels do not take the dtype or there are no values."""
    code = CODES.get(dtype_name)
    n = raw.size // (4 if code == F32 else 2)
    if code is None or not n:
        return None
    least, greatest = key_range(raw.ctypes.data, code, n)
    return value_of(int(least)), value_of(int(greatest))


def value_of(key: int) -> float:
    """The fp32 value (a Python float) whose order key is `key`."""
    bits = -key | -0x80000000 if key < 0 else key
    return float(np.array([bits], np.int32).view(np.float32)[0])


def warm() -> None:
    """Compile (or load from the cache) the pass's specialisations."""
    data = np.zeros(8, np.uint8)
    for code in (BF16, F32):
        key_range(data.ctypes.data, code, 2)
