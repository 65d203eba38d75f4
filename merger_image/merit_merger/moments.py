"""Reader of `optimizer_v.safetensors` (Adam second moments) for the OTA merge.

The merger image does not ship the trainer, so this re-implements the small reader of the
format the trainer writes (merit_trainer.moments): metadata {"kind": "rank1"|"full", "beta2",
"step", "bias_corrected"}; `full`: NAME -> fp32 v of the parameter's shape; `rank1`: for
ndim >= 2, NAME::row [shape[0]], NAME::col [prod(shape[1:])], NAME::total (scalar or [1]) with
v_hat = outer(row, col) / total; 1-D parameters: NAME exact. A block of rows of a rank-1
v_hat is handed out as its factors (the matching slice of `row`, all of `col`), so a full v is
never materialised beyond the block being merged, and often not at all (v^p factorises).

The factors are read and checked with numpy (`factor_arrays`: no torch, for the fused
kernels); `factors` hands them to the torch pass as tensors sharing the arrays' memory.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from .dtypes import to_float32
from .io import HeaderError, ModelReader, read_header
from .methods import Rank1Moment

if TYPE_CHECKING:
    import torch

SEP = "::"
FACTORS = ("row", "col", "total")


class MomentsFormatError(ValueError):
    """The file does not follow the optimizer_v format (verification turns it into a refusal)."""


@dataclass(frozen=True)
class Rank1:
    """The rank-1 factors of one tensor's v_hat = outer(row, col) / total, fp32 arrays."""

    row: np.ndarray
    col: np.ndarray
    total: float


class MomentReader:
    """Second moments of one expert, per tensor name, as fp32 blocks of rows."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        try:
            metas, self.metadata = read_header(self.path)
        except HeaderError:
            raise  # the check that names what is wrong with the header
        except Exception as e:  # noqa: BLE001 - any unreadable header is a format problem
            raise MomentsFormatError(f"{self.path.name}: {e}") from e
        self.kind = self.metadata.get("kind")
        if self.kind not in ("rank1", "full"):
            raise MomentsFormatError(f"metadata kind {self.kind!r} is not 'rank1' or 'full'")
        self._reader = ModelReader(self.path.parent, files=[self.path])
        self.keys = set(metas)
        self._rank1: dict[str, Rank1] = {}

    def close(self) -> None:
        self._reader.close()

    @property
    def reader(self) -> ModelReader:
        """The reader of the file's tensors as stored (factors under their own keys)."""
        return self._reader

    @property
    def bytes_read(self) -> int:
        return self._reader.bytes_read

    @property
    def file(self) -> ModelReader:
        """The file's reader: where its tensors lie and the bytes read (the fused pass reads
        stored moments unit by unit itself and counts them here)."""
        return self._reader

    def check(self, name: str, shape: tuple[int, ...]) -> None:
        """Raise MomentsFormatError unless `name` has well-formed moments for `shape`."""
        if self.kind == "full" or len(shape) < 2:
            if name not in self.keys:
                raise MomentsFormatError(f"no second moments for {name}")
            meta = self._reader.meta(name)
            same = meta.shape == tuple(shape) or (len(shape) < 2 and meta.numel == math.prod(shape))
            if not same:
                raise MomentsFormatError(f"{name}: moments shape {meta.shape} != weight {shape}")
            return
        missing = [f for f in FACTORS if f"{name}{SEP}{f}" not in self.keys]
        if missing:
            raise MomentsFormatError(f"{name}: rank-1 factor(s) {missing} missing")
        factors = self.factor_arrays(name)
        if factors.row.size != shape[0] or factors.col.size != math.prod(shape[1:]):
            raise MomentsFormatError(
                f"{name}: rank-1 factors ({factors.row.size}, {factors.col.size}) do not "
                f"fit weight shape {tuple(shape)}")
        values = np.concatenate([factors.row, factors.col, [np.float32(factors.total)]])
        if not bool(np.isfinite(values).all()) or bool((values < 0).any()):
            raise MomentsFormatError(f"{name}: rank-1 factors are negative or not finite")

    def factor_arrays(self, name: str) -> Rank1:
        """The rank-1 factors of the whole of `name`, fp32 numpy arrays (no torch), read
        once and kept until `drop_cache`."""
        cached = self._rank1.get(name)
        if cached is None:
            row, col, total = (self._float32(f"{name}{SEP}{f}") for f in FACTORS)
            if total.size != 1:
                raise MomentsFormatError(f"{name}: rank-1 total must be a scalar")
            cached = self._rank1[name] = Rank1(row, col, float(total[0]))
        return cached

    def _float32(self, key: str) -> np.ndarray:
        try:
            return to_float32(self._reader.read_array(key), self._reader.meta(key).dtype)
        except ValueError as e:
            raise MomentsFormatError(f"{key}: {e}") from e

    def factored(self, name: str, shape: tuple[int, ...]) -> bool:
        """True when v of `name` is stored as rank-1 factors (see `factors`), not whole."""
        return self.kind == "rank1" and len(shape) >= 2

    def read_stored(self, name: str, shape: tuple[int, ...], rows: tuple[int, int] | None = None,
                    *, out: torch.Tensor | None = None) -> torch.Tensor:
        """Stored v rows (full kind, or 1-D tensors) as in the file, into `out` if given."""
        whole = rows is None or len(shape) < 1
        t = self._reader.read(name, None if whole else rows, out=out)
        if len(shape) < 2 and t.numel() == math.prod(shape):
            t = t.reshape(shape)
        return t

    def stored_array(self, name: str, shape: tuple[int, ...],
                     rows: tuple[int, int] | None = None) -> np.ndarray:
        """`read_stored` as a flat fp32 numpy array (no torch)."""
        whole = rows is None or len(shape) < 1
        raw = self._reader.read_array(name, None if whole else rows)
        return to_float32(raw, self._reader.meta(name).dtype)

    def factors(self, name: str, shape: tuple[int, ...], rows: tuple[int, int] | None = None
                ) -> Rank1Moment:
        """The rank-1 factors of rows [start, stop) of `name` (v_hat = outer(row, col) / total)."""
        import torch  # the torch pass's factors (`factor_arrays` has them without torch)

        start, stop = rows if rows is not None else (0, shape[0])
        f = self.factor_arrays(name)
        return Rank1Moment(torch.from_numpy(f.row[start:stop]), torch.from_numpy(f.col), f.total)

    def read(self, name: str, shape: tuple[int, ...], rows: tuple[int, int] | None = None
             ) -> torch.Tensor:
        """fp32 v (or v_hat) of rows [start, stop) of the weight `name` of shape `shape`."""
        if self.factored(name, shape):
            block = self.factors(name, shape, rows)
            return block.dense().reshape((block.row.numel(), *shape[1:]))
        return self.read_stored(name, shape, rows).float()

    def drop_cache(self, name: str) -> None:
        self._rank1.pop(name, None)
