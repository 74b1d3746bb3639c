"""Shared tolerances for comparisons of float outputs (golden fixtures, other code paths).

fp32 results differ in their last bits between CPUs: torch and numpy pick reduction kernels by
instruction set (SSE, AVX2, AVX-512, AMX), and each kernel sums in its own order. A fixture made
on one machine is therefore compared with a tolerance, never bit for bit. The tolerance is
relative to the output's magnitude (max |expected|), floored at 1 so that an O(1) output keeps
an absolute bound: ``max|Δ| ≤ rel · max(1, max|expected|)``. Exact equality is kept for integer
work (token ids, bins, masks) and for a computation repeated on the same machine.
"""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = ["FP32_PARITY", "assert_close_scaled", "max_abs_diff"]

#: cellkit's parity contract for fp32 CPU outputs (scGPT reference facts §8.7: ≤ 1e-5 for O(1)
#: outputs; scGPT's own fast and slow paths differ by 2e-6), scaled by the output's magnitude
FP32_PARITY = 1e-5


def _numpy(x: Any) -> np.ndarray:
    if hasattr(x, "detach"):  # torch tensor
        x = x.detach().cpu().numpy()
    return np.asarray(x, dtype=np.float64)


def max_abs_diff(actual: Any, expected: Any) -> float:
    """``max |actual - expected|`` (0 for empty arrays); shapes must agree."""
    a, e = _numpy(actual), _numpy(expected)
    assert a.shape == e.shape, f"shape {a.shape} != expected {e.shape}"
    return float(np.abs(a - e).max()) if a.size else 0.0


def assert_close_scaled(
    actual: Any, expected: Any, *, rel: float = FP32_PARITY, what: str = "output", floor: float = 1.0
) -> float:
    """Assert ``max|actual - expected| ≤ rel · max(floor, max|expected|)``; return ``max|Δ|``.

    Parameters
    ----------
    actual, expected
        Arrays or tensors of one shape (NaN anywhere fails).
    rel
        Allowed deviation relative to the expected output's largest magnitude.
    what
        Name of the compared output, for the failure message.
    floor
        Smallest scale used: outputs of magnitude below ``floor`` get the absolute bound
        ``rel · floor``.
    """
    a, e = _numpy(actual), _numpy(expected)
    assert a.shape == e.shape, f"{what}: shape {a.shape} != expected {e.shape}"
    assert not np.isnan(a).any(), f"{what}: NaN in the result"
    diff = float(np.abs(a - e).max()) if a.size else 0.0
    scale = max(floor, float(np.abs(e).max()) if e.size else 0.0)
    bound = rel * scale
    assert diff <= bound, (
        f"{what}: max|Δ| = {diff:.3g} exceeds {rel:g} × max(|expected|, {floor:g}) = {bound:.3g} "
        f"(max|expected| = {scale:.3g})"
    )
    return diff
