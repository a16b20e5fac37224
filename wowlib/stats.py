"""One bootstrap for every reported interval: resample QUESTIONS, with all their answers and pairs.

The N answers of one question share its difficulty, and the wrong-over-wrong pairs of one question
share its answers: they are not independent draws. Resampling pairs (or answers) as if they were
gives intervals that are too narrow (``tests/test_stats.py`` shows it on simulated data). So every
interval in the tables and figures comes from ``cluster_bootstrap``: a resample draws questions with
replacement, and each unit (answer, pair, question sum) enters with its question's multiplicity.

A statistic is written once, as a function of unit WEIGHTS: ``statistic(w)`` gets a (B, units)
matrix (row b: how often each unit's question was drawn in resample b; the point estimate is the
all-ones row) and returns (n_statistics, B). Ratios of sums, the margin rule (the top share of the
resampled pairs by score gap) and a difference between two models on the same questions are all
exact under weights, so the point estimate and every resample go through the same code.

Intervals are percentile intervals (not BCa: BCa is undefined when every resample gives the same
value, as for a method that is always right). A statistic undefined on some resample (NaN: e.g. no
wrong answer drawn) gets no interval rather than one conditioned on the resamples that worked.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

N_RESAMPLES = 2000
CONFIDENCE = 0.95
SEED = 0
_CHUNK_CELLS = 4_000_000          # weights built per chunk: resamples x units


@dataclass(frozen=True)
class Interval:
    estimate: float
    low: float
    high: float


def cluster_index(clusters: Sequence) -> tuple[np.ndarray, int]:
    """(index of each unit's cluster in 0..C-1, C), clusters numbered in order of first appearance."""
    ids: dict = {}
    index = np.fromiter((ids.setdefault(c, len(ids)) for c in clusters), dtype=np.int64, count=len(clusters))
    return index, len(ids)


def cluster_bootstrap(clusters: Sequence, statistic: Callable[[np.ndarray], np.ndarray],
                      n_resamples: int = N_RESAMPLES, seed: int = SEED, confidence: float = CONFIDENCE,
                      drop_undefined: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(estimate, low, high), one entry per statistic, resampling the clusters of ``clusters``
    (one label per unit; the question id) with replacement. With fewer than two clusters there
    is nothing to resample: the interval is NaN. A statistic undefined on some resample gets a NaN
    interval, or, with ``drop_undefined`` (a correlation, undefined when a resample repeats one
    point), the percentiles of the resamples where it is defined."""
    index, n_clusters = cluster_index(clusters)
    n_units = len(index)
    estimate = np.asarray(statistic(np.ones((1, n_units))), dtype=float).reshape(-1, 1)[:, 0]
    nan = np.full_like(estimate, np.nan)
    if n_clusters < 2 or n_resamples < 1:
        return estimate, nan, nan
    rng = np.random.default_rng(seed)
    chunk = max(1, min(n_resamples, _CHUNK_CELLS // max(n_units, n_clusters)))
    parts = []
    for start in range(0, n_resamples, chunk):
        b = min(chunk, n_resamples - start)
        draws = rng.integers(0, n_clusters, size=(b, n_clusters))
        counts = np.zeros((b, n_clusters))
        np.add.at(counts, (np.repeat(np.arange(b), n_clusters), draws.ravel()), 1.0)
        parts.append(np.asarray(statistic(counts[:, index]), dtype=float).reshape(len(estimate), b))
    values = np.concatenate(parts, axis=1)
    alpha = (1 - confidence) / 2
    undefined = np.isnan(values).all(axis=1) if drop_undefined else np.isnan(values).any(axis=1)
    with np.errstate(invalid="ignore"):
        low, high = np.nanquantile(values, [alpha, 1 - alpha], axis=1) if values.size else (nan, nan)
    return estimate, np.where(undefined, np.nan, low), np.where(undefined, np.nan, high)


def weighted_ratio(num: np.ndarray, den: np.ndarray) -> Callable[[np.ndarray], np.ndarray]:
    """The statistic sum(w * num) / sum(w * den) (NaN where the denominator is 0)."""
    num, den = np.asarray(num, dtype=float), np.asarray(den, dtype=float)

    def statistic(w: np.ndarray) -> np.ndarray:
        n, d = w @ num, w @ den
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(d > 0, n / np.where(d > 0, d, 1), np.nan)[None, :]
    return statistic


def top_share_mean(values: np.ndarray, gaps: np.ndarray, share: float) -> Callable[[np.ndarray], np.ndarray]:
    """The mean of ``values`` over the top ``share`` of the (weighted) units by gap: the margin
    rule of elicitation accuracy, applied to each resample. Units are ordered by gap, largest first
    (ties: the later unit first, as a stable ascending sort taken from its end); a resample keeps
    ``int(total weight x share)`` units from the top, counting a unit drawn k times k times."""
    order = np.argsort(np.asarray(gaps, dtype=float), kind="stable")[::-1]
    v = np.asarray(values, dtype=float)[order]

    def statistic(w: np.ndarray) -> np.ndarray:
        w = w[:, order]
        k = np.floor(w.sum(axis=1) * share + 1e-9)
        before = np.cumsum(w, axis=1) - w                       # weight above each unit
        taken = np.clip(k[:, None] - before, 0.0, w)            # how much of each unit is kept
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(k > 0, (taken @ v) / np.where(k > 0, k, 1), np.nan)[None, :]
    return statistic


def mean_interval(values: Sequence[float], clusters: Sequence, n_resamples: int = N_RESAMPLES,
                  seed: int = SEED, confidence: float = CONFIDENCE) -> Interval:
    """The mean of ``values`` (one per unit) with its question-level interval."""
    v = np.asarray(values, dtype=float)
    if len(v) == 0:
        return Interval(math.nan, math.nan, math.nan)
    est, low, high = cluster_bootstrap(clusters, weighted_ratio(v, np.ones_like(v)), n_resamples, seed, confidence)
    return Interval(float(est[0]), float(low[0]), float(high[0]))


def pearson_interval(x: Sequence[float], y: Sequence[float], clusters: Sequence | None = None,
                     n_resamples: int = N_RESAMPLES, seed: int = SEED,
                     confidence: float = CONFIDENCE) -> Interval:
    """Pearson's r of (x, y) with a bootstrap interval over ``clusters`` (default: each point is
    its own cluster). A resample with a constant x or y has no r and is left out of the percentiles."""
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    if len(x) < 3:
        return Interval(math.nan, math.nan, math.nan)

    def statistic(w: np.ndarray) -> np.ndarray:
        total = w.sum(axis=1)
        mx, my = (w @ x) / total, (w @ y) / total
        dx, dy = x[None, :] - mx[:, None], y[None, :] - my[:, None]
        cov = (w * dx * dy).sum(axis=1)
        sx, sy = np.sqrt((w * dx * dx).sum(axis=1)), np.sqrt((w * dy * dy).sum(axis=1))
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where((sx > 1e-12) & (sy > 1e-12), cov / (sx * sy), np.nan)[None, :]
    est, low, high = cluster_bootstrap(range(len(x)) if clusters is None else clusters, statistic,
                                       n_resamples, seed, confidence, drop_undefined=True)
    return Interval(float(est[0]), float(low[0]), float(high[0]))


def minimum_detectable_effect(standard_error: float, alpha: float = 0.05, power: float = 0.8) -> float:
    """The smallest true effect a two-sided test at level ``alpha`` detects with probability
    ``power``, for an estimate with this standard error: (z_{1-alpha/2} + z_{power}) x SE."""
    from scipy.stats import norm
    return float((norm.ppf(1 - alpha / 2) + norm.ppf(power)) * standard_error)


def questions_needed(standard_error: float, n_questions: int, target: float, alpha: float = 0.05,
                     power: float = 0.8) -> int:
    """Questions for a minimum detectable effect of ``target``, scaling the standard error measured
    on ``n_questions`` questions as 1 / sqrt(questions) (questions are the independent unit)."""
    mde = minimum_detectable_effect(standard_error, alpha, power)
    return int(math.ceil(n_questions * (mde / target) ** 2))
