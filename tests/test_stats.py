"""The one bootstrap behind every interval (wowlib.stats): resampling questions, not pairs.

The simulation gives each question its own accuracy (strong within-question correlation, as when
a question's wrong answers share what makes them easy or hard to order) and many pairs per
question. Pair-level intervals then are too narrow; question-level intervals cover the true value
about 95% of the time.
"""
from __future__ import annotations

import math

import numpy as np
import pytest

from wowlib import elicit, stats


def simulated(rng: np.random.Generator, n_questions: int = 30, pairs_per_question: int = 20,
              mean: float = 0.6, concentration: float = 1.5) -> tuple[np.ndarray, np.ndarray]:
    """(agree per pair, question per pair): question q's pairs agree with probability p_q ~
    Beta(mean * c, (1 - mean) * c); a small c makes the p_q spread widely around ``mean``."""
    p = rng.beta(mean * concentration, (1 - mean) * concentration, size=n_questions)
    agree = (rng.random((n_questions, pairs_per_question)) < p[:, None]).astype(float).ravel()
    return agree, np.repeat(np.arange(n_questions), pairs_per_question)


def test_question_intervals_cover_and_pair_intervals_are_too_narrow():
    rng = np.random.default_rng(1)
    truth, n_sets = 0.6, 200
    covered, widths_q, widths_pair = 0, [], []
    for k in range(n_sets):
        agree, question = simulated(rng)
        by_question = elicit.pair_accuracy(agree, questions=question, seed=k, n_resamples=400)
        by_pair = elicit.pair_accuracy(agree, seed=k, n_resamples=400)
        covered += by_question.ci_low <= truth <= by_question.ci_high
        widths_q.append(by_question.ci_high - by_question.ci_low)
        widths_pair.append(by_pair.ci_high - by_pair.ci_low)
    assert 0.90 <= covered / n_sets <= 0.99, covered / n_sets
    assert np.median(widths_pair) < 0.6 * np.median(widths_q)       # pairs as if independent: far too narrow


def test_the_margin_rule_is_applied_inside_every_resample():
    """top_share_mean with unit weights is the margin rule on the data itself."""
    rng = np.random.default_rng(0)
    agree = rng.integers(0, 2, 57).astype(float)
    gaps = rng.random(57)
    for margin in (1.0, 0.5, 0.1):
        kept = elicit.margin_select(gaps, margin)
        expected = agree[kept].mean()
        got = stats.top_share_mean(agree, gaps, margin)(np.ones((1, 57)))[0, 0]
        assert got == pytest.approx(expected)
    # a unit drawn twice counts twice: weights [2, 0, 1] over gaps [3, 2, 1], top half of 3 -> 1 unit
    w = np.array([[2.0, 0.0, 1.0]])
    assert stats.top_share_mean(np.array([1.0, 0.0, 0.0]), np.array([3.0, 2.0, 1.0]), 0.5)(w)[0, 0] == 1.0


def test_cluster_bootstrap_edge_cases():
    est, low, high = stats.cluster_bootstrap(["q"] * 4, stats.weighted_ratio(np.ones(4), np.ones(4)))
    assert est[0] == 1.0 and math.isnan(low[0]) and math.isnan(high[0])      # one question: no interval
    same = stats.mean_interval([1, 1, 1, 1], ["a", "a", "b", "b"])
    assert (same.estimate, same.low, same.high) == (1.0, 1.0, 1.0)
    empty = stats.mean_interval([], [])
    assert math.isnan(empty.estimate)
    # seeded: the same call gives the same interval
    agree, question = simulated(np.random.default_rng(3))
    assert elicit.pair_accuracy(agree, questions=question, seed=5) == elicit.pair_accuracy(agree, questions=question,
                                                                                             seed=5)


def test_pearson_interval():
    x = np.linspace(0, 1, 12)
    r = stats.pearson_interval(x, 2 * x + 0.01 * np.sin(np.arange(12)), n_resamples=500)
    assert r.estimate > 0.99 and r.low > 0.95
    assert math.isnan(stats.pearson_interval([0.5, 0.6], [0.1, 0.2]).estimate)       # under three points
