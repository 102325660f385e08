"""The report's statistics: the t-interval of a mean over seeds, and the verdict on a paired difference.

With n = 1 the interval is undefined: NaN, never a made-up width. No correction for the number of
comparisons is applied (the report says how many there are).
"""

from __future__ import annotations

import math

import numpy as np

from pipeline.report.columns import CONFIDENCE


def finite_values(values) -> np.ndarray:
    """The finite values (None and NaN/inf left out) as float64."""
    v = np.asarray([x for x in values if x is not None], dtype=float)
    return v[np.isfinite(v)]


def finite_mean(values) -> float:
    """The mean of the finite values, NaN when there are none (``t_interval``'s mean, without the interval)."""
    v = finite_values(values)
    return float(v.mean()) if v.size else float("nan")


def t_quantile(n: int, confidence: float = CONFIDENCE) -> float:
    """t(0.5 + confidence / 2, n − 1): the half-width of the interval in standard errors."""
    from scipy import stats

    return float(stats.t.ppf(0.5 + confidence / 2, max(1, n - 1)))


def t_interval(values, confidence: float = CONFIDENCE) -> dict:
    """n, mean, sd (ddof 1) and the two-sided t-interval of the mean of the finite ``values``.

    n = 0: everything NaN; n = 1: the mean, sd and interval NaN (undefined, not zero width).
    """
    v = finite_values(values)
    n = int(v.size)
    out = {"n": n, "mean": float("nan"), "sd": float("nan"), "ci_low": float("nan"), "ci_high": float("nan")}
    if n == 0:
        return out
    out["mean"] = float(v.mean())
    if n < 2:
        return out
    sd = float(v.std(ddof=1))
    half = t_quantile(n, confidence) * sd / math.sqrt(n)
    out.update(sd=sd, ci_low=out["mean"] - half, ci_high=out["mean"] + half)
    return out


def verdict(n_pairs: int, ci_low: float, ci_high: float) -> str:
    """"better" / "worse" when the interval of the difference excludes 0, else no evidence; n < 2: too small."""
    if n_pairs < 2 or not (math.isfinite(ci_low) and math.isfinite(ci_high)):
        return "n too small"
    if ci_low > 0:
        return "better"
    if ci_high < 0:
        return "worse"
    return "no evidence of a difference"
