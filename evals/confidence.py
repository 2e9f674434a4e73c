"""Confidence intervals of the numbers eval.py, steering and the experiments report, and how they are printed."""
from __future__ import annotations

import math


def mean_ci(x, t: bool = False) -> dict:
    """Mean and 90% CI over independent units: normal approximation, mean +- 1.645 sd / sqrt(n); with t, Student's t
    with n - 1 degrees of freedom (scipy.stats.t.interval(0.9, n - 1, mean, sem), what run_steering.py reports)."""
    import numpy as np
    x = np.asarray(x, dtype=np.float64)
    se = x.std(ddof=1) / math.sqrt(len(x)) if len(x) > 1 else float("nan")
    m = float(x.mean()) if len(x) else float("nan")
    z = t_quantile(0.9, len(x) - 1) if t and len(x) > 1 else 1.645
    return {"mean": m, "lo": m - z * se, "hi": m + z * se, "n": len(x), **({"dist": "t"} if t else {})}


def t_quantile(conf: float, df: int) -> float:
    """The two-sided `conf` quantile of Student's t with integer df (0.9 -> the 95th percentile): bisection on the
    exact finite series of P(|T| <= t) (Abramowitz & Stegun 26.7.3-4, theta = atan(t / sqrt(df)))."""
    def inside(theta):
        c, s, term, total = math.cos(theta), math.sin(theta), 1.0, 1.0
        for k in range(1, (df - 1) // 2 if df % 2 else df // 2):
            term *= c * c * (2 * k if df % 2 else 2 * k - 1) / (2 * k + 1 if df % 2 else 2 * k)
            total += term
        if df % 2:
            return 2 / math.pi * (theta + (s * c * total if df > 1 else 0.0))
        return s * total
    lo, hi = 0.0, math.pi / 2
    while hi - lo > 1e-15:
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if inside(mid) < conf else (lo, mid)
    return math.tan((lo + hi) / 2) * math.sqrt(df)


def fmt_num(x, spec: str) -> str:
    return "-" if x is None else format(x, spec)  # None: an undefined number (NaN in the computation)


def fmt_ci(d, p=4) -> str:
    """"mean [lo, hi]" of a mean_ci dict (as read back from JSON, where NaN became None)."""
    if not d or d["mean"] is None:
        return "-"
    ci = f" [{d['lo']:.{p}f}, {d['hi']:.{p}f}]" if d["lo"] is not None else ""
    return f"{d['mean']:.{p}f}{ci}"
