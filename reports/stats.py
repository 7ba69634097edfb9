"""Is a variant different from the baseline? A paired test over seeds.

Two runs pair when they share ``train.seed`` (same data order and initialisation stream), so the test
looks at per-seed differences ``variant - baseline``. Methods:

* ``ttest`` (default): two-sided paired t-test, :func:`scipy.stats.ttest_rel`; significant when
  ``p < alpha``.
* ``bootstrap``: percentile bootstrap confidence interval of the mean paired difference,
  :func:`scipy.stats.bootstrap`; significant when the ``1 - alpha`` interval excludes 0. With the
  handful of seeds of a typical grid the bootstrap interval is narrow and optimistic; prefer ``ttest``.

Fewer than two pairs cannot be tested: the result says so (``testable`` False) instead of guessing.
No correction for multiple comparisons is applied (one test per variant and metric); the footnote
says so.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
import pandas as pd
from scipy import stats

__all__ = ["METHODS", "PairedResult", "method_note", "paired_test"]

METHODS = ("ttest", "bootstrap")
MARKER = "\u2020"  # dagger


@dataclass(frozen=True)
class PairedResult:
    """The outcome of one paired comparison (``variant - baseline``)."""

    n_pairs: int  # seeds present (finished, metric logged) in both
    mean_diff: float  # mean of the per-seed differences; nan without pairs
    p: float  # two-sided p-value (ttest); nan for bootstrap or when untestable
    ci_low: float  # bootstrap interval; nan for ttest or when untestable
    ci_high: float
    testable: bool  # at least two pairs and a defined statistic
    significant: bool  # testable and below alpha / interval excluding 0


def paired_test(variant: pd.Series, baseline: pd.Series, *, method: str = "ttest", alpha: float = 0.05,
                n_resamples: int = 9999, seed: int = 0) -> PairedResult:
    """Compare two per-seed series (index: seed), pairing on the index and dropping missing values.

    Args:
        variant: metric value per seed of the variant.
        baseline: metric value per seed of the baseline.
        method: ``ttest`` or ``bootstrap`` (see the module docstring).
        alpha: significance level.
        n_resamples: bootstrap resamples.
        seed: bootstrap random seed (the report is deterministic).
    """
    if method not in METHODS:
        raise ValueError(f"method={method!r} is not allowed: expected one of {', '.join(METHODS)}")
    pairs = pd.concat({"v": variant, "b": baseline}, axis=1, join="inner").dropna()
    diff = (pairs["v"] - pairs["b"]).to_numpy(dtype=float)  # (n_pairs,)
    n = len(diff)
    mean_diff = float(diff.mean()) if n else float("nan")
    if n < 2:
        return PairedResult(n, mean_diff, float("nan"), float("nan"), float("nan"), False, False)
    if method == "ttest":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # identical differences: scipy warns, p is nan or 0
            p = float(stats.ttest_rel(pairs["v"], pairs["b"]).pvalue)
        ok = bool(np.isfinite(p))
        return PairedResult(n, mean_diff, p, float("nan"), float("nan"), ok, ok and p < alpha)
    if np.ptp(diff) == 0:  # every resample has the same mean: the interval is that point
        low = high = mean_diff
    else:
        ci = stats.bootstrap((diff,), np.mean, confidence_level=1 - alpha, n_resamples=n_resamples,
                             method="percentile", rng=np.random.default_rng(seed)).confidence_interval
        low, high = float(ci.low), float(ci.high)
    return PairedResult(n, mean_diff, float("nan"), low, high, True, bool(low > 0 or high < 0))


def method_note(method: str, alpha: float) -> str:
    """The footnote that states how the significance marker was computed."""
    how = {
        "ttest": f"p < {alpha:g}, two-sided paired t-test over seeds (scipy.stats.ttest_rel)",
        "bootstrap": f"the {100 * (1 - alpha):g}% percentile bootstrap interval of the mean paired difference "
                     "(scipy.stats.bootstrap) excludes 0",
    }[method]
    return (f"{MARKER}: {how}; runs are paired by train.seed; n/a: fewer than 2 paired seeds (or no "
            "variation to test). Not corrected for multiple comparisons.")
