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

Power (no library computes this for a report): with ``n`` pairs and ``s`` the sample standard deviation
of the paired differences, the two-sided paired t-test at level ``alpha`` rejects with probability
``P(|T| > t_{1-alpha/2, n-1})`` where ``T`` follows the noncentral t distribution with ``n - 1``
degrees of freedom and noncentrality ``delta / (s / sqrt(n))`` (:func:`paired_power`, exact, via
``scipy.stats.nct``; not the normal approximation, which is far too optimistic with 2-5 seeds). The
*minimum detectable difference* (:func:`min_detectable_difference`) is the ``delta`` at which that
probability reaches ``power`` (0.8); :func:`seeds_needed` is the smallest ``n`` reaching it for a
given ``delta`` (0.5 mIoU points in the report), assuming the spread stays ``s``.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
import pandas as pd
from scipy import stats

__all__ = ["ALPHA", "METHODS", "POWER", "TARGET_POINTS", "PairedResult", "Power", "method_note",
           "min_detectable_difference", "paired_power", "paired_test", "power_analysis", "power_note", "seeds_needed"]

METHODS = ("ttest", "bootstrap")
MARKER = "\u2020"  # dagger
POWER = 0.8  # the power a minimum detectable difference is stated at
ALPHA = 0.05
TARGET_POINTS = 0.5  # "how many seeds would detect a 0.5-point difference" (accuracy metrics, in points)
MAX_SEEDS = 10_000  # seeds_needed gives up (None) beyond this


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


# ----------------------------------------------------------------------------- power


def paired_power(delta: float, sd: float, n: int, *, alpha: float = ALPHA) -> float:
    """Power of the two-sided paired t-test with ``n`` pairs to detect a true mean difference ``delta`` when the
    paired differences have standard deviation ``sd`` (noncentral t; see the module docstring)."""
    df = n - 1
    nc = abs(delta) / (sd / np.sqrt(n))
    crit = stats.t.ppf(1 - alpha / 2, df)
    upper = stats.nct.sf(crit, df, nc)
    lower = np.nan_to_num(stats.nct.cdf(-crit, df, nc), nan=0.0)  # the far tail: scipy gives nan once it is ~0
    return float(upper + lower)


def min_detectable_difference(sd: float, n: int, *, alpha: float = ALPHA, power: float = POWER) -> float:
    """The true mean paired difference the test detects with probability ``power`` (nan: n < 2 or sd not > 0)."""
    from scipy.optimize import brentq

    if n < 2 or not sd > 0 or not np.isfinite(sd):
        return float("nan")
    high = sd
    while paired_power(high, sd, n, alpha=alpha) < power:
        high *= 2
    return float(brentq(lambda d: paired_power(d, sd, n, alpha=alpha) - power, 0.0, high, xtol=1e-12 * sd,
                        rtol=1e-10))


def seeds_needed(delta: float, sd: float, *, alpha: float = ALPHA, power: float = POWER) -> int | None:
    """The fewest pairs (seeds) with which the test detects ``delta`` with probability ``power`` at spread ``sd``
    (None: sd unknown, or more than :data:`MAX_SEEDS`). Power grows with n: doubling, then bisection."""
    if not sd > 0 or not np.isfinite(sd) or not delta > 0:
        return None
    enough = lambda n: paired_power(delta, sd, n, alpha=alpha) >= power  # noqa: E731
    low, high = 1, 2  # power(low) < target (one pair cannot be tested), power(high) unknown
    while not enough(high):
        if high >= MAX_SEEDS:
            return None
        low, high = high, 2 * high
    while high - low > 1:
        mid = (low + high) // 2
        low, high = (low, mid) if enough(mid) else (mid, high)
    return high


@dataclass(frozen=True)
class Power:
    """What a variant-vs-baseline comparison can detect, from its paired differences."""

    n_pairs: int
    sd_diff: float  # sample std (ddof=1) of the paired differences; nan with < 2 pairs
    mdd: float  # minimum detectable difference (same units as the metric); nan when unknown
    seeds_for_target: int | None  # pairs needed to detect the target difference at this spread


def power_analysis(variant: pd.Series, baseline: pd.Series, *, target: float, alpha: float = ALPHA,
                   power: float = POWER) -> Power:
    """Power of the paired comparison of two per-seed series (index: seed) and the seeds a ``target`` needs."""
    pairs = pd.concat({"v": variant, "b": baseline}, axis=1, join="inner").dropna()
    diff = (pairs["v"] - pairs["b"]).to_numpy(dtype=float)  # (n_pairs,)
    n = len(diff)
    sd = float(diff.std(ddof=1)) if n >= 2 else float("nan")
    return Power(n, sd, min_detectable_difference(sd, n, alpha=alpha, power=power),
                 seeds_needed(target, sd, alpha=alpha, power=power))


def power_note(alpha: float = ALPHA, power: float = POWER, target_points: float = TARGET_POINTS) -> str:
    """The footnote that states how the minimum detectable difference and the seed count are computed."""
    return (f"MDD: the smallest true mean paired difference that a two-sided paired t-test at alpha = {alpha:g} "
            f"detects with power {power:g}, given the standard deviation of the observed per-seed differences and "
            f"the seeds both ran (noncentral t distribution, scipy.stats.nct; exact, not the normal approximation); "
            f"in parentheses, the seeds needed to detect {target_points:g} points at that spread. n/a: fewer than 2 "
            "paired seeds, or no spread. Bold is withheld where the difference to the baseline is below its MDD.")
