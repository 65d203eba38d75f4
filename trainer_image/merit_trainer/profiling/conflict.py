"""The conflict matrix and its principal axes (MERIT step 4), in plain numpy.

C[i, j] is the cosine between the sketched gradients of sources i and j. Every source's
gradient shares a large common part at the base (e.g. "produce fluent text"), which would
make the first axis just "how typical is this source"; double-centring C (J C J, J = I - 11'/n)
removes that, so the axes describe how sources differ. The uncentred variant is kept as an
option and recorded. Scores are principal coordinates (eigenvector * sqrt(eigenvalue), as in
classical multidimensional scaling); each axis's sign is fixed so its largest-magnitude
component is positive, which makes the result identical across runs and machines.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from meritrun.errors import DataError


@dataclass(frozen=True)
class ConflictAnalysis:
    matrix: np.ndarray  # sources x sources cosines
    scores: np.ndarray  # sources x axes principal coordinates
    eigenvalues: np.ndarray  # axes, descending
    explained_variance: list[float]  # share of the (centred) matrix's trace per axis
    centered: bool


def cosine_matrix(sketches: np.ndarray, names: list[str] | None = None) -> np.ndarray:
    """Row-normalized Gram matrix; a zero row (no gradient signal) is a DataError."""
    g = np.asarray(sketches, dtype=np.float64)
    norms = np.linalg.norm(g, axis=1)
    dead = np.flatnonzero(~(norms > 0) | ~np.isfinite(norms))
    if dead.size:
        who = names[dead[0]] if names else f"row {dead[0]}"
        raise DataError(f"source {who}: its gradient sketch is zero or not finite")
    unit = g / norms[:, None]
    c = unit @ unit.T
    np.fill_diagonal(c, 1.0)
    return np.clip(c, -1.0, 1.0)


def double_center(c: np.ndarray) -> np.ndarray:
    n = c.shape[0]
    j = np.eye(n) - np.full((n, n), 1.0 / n)
    return j @ c @ j


def fix_signs(vectors: np.ndarray) -> np.ndarray:
    """Flip each column so its largest-|.| entry (first one on ties) is positive."""
    out = vectors.copy()
    for col in range(out.shape[1]):
        lead = int(np.argmax(np.abs(out[:, col])))
        if out[lead, col] < 0:
            out[:, col] = -out[:, col]
    return out


def principal_axes(c: np.ndarray, axes: int, *, centered: bool = True) -> ConflictAnalysis:
    """Top `axes` eigenpairs of C (double-centred unless centered=False)."""
    n = c.shape[0]
    if not 1 <= axes <= n:
        raise ValueError(f"need 1 <= axes <= {n} sources, got {axes}")
    m = double_center(c) if centered else c
    m = (m + m.T) / 2  # exact symmetry so eigh's result does not depend on rounding noise
    values, vectors = np.linalg.eigh(m)
    order = np.argsort(-values, kind="stable")[:axes]
    values, vectors = values[order], fix_signs(vectors[:, order])
    values = np.clip(values, 0.0, None)  # C is a Gram matrix: negatives are rounding
    trace = float(np.trace(m))
    explained = [float(v / trace) if trace > 0 else 0.0 for v in values]
    scores = vectors * np.sqrt(values)[None, :]
    return ConflictAnalysis(c, scores, values, explained, centered)
