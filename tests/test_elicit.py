"""Elicitation: WoW pairs, the three self-contained methods, judge outcomes, margins, CIs, tables.

Every expected number below is computed by hand from the samples in ``SAMPLES`` (see the
comments next to each case), so a change in a rule (ties, margins, exclusions) fails a test.
"""
from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from wowlib import elicit
from wowlib.elicit import Pair


def s(task, qid, idx, answer, proxy, correct=False, status="ok", n_tokens=10, lp=-1.0, order=None,
      extraction=None):
    return {"task": task, "split": "train", "question_id": qid, "sample_idx": idx, "option_order": order,
            "prompt": "p", "response": f"response {qid}/{idx}", "n_tokens": n_tokens, "mean_logprob": lp,
            "extraction": extraction, "answer": answer, "proxy": proxy, "correct": correct, "status": status,
            "generator": "g"}


T3 = 1 / 3
# kc/q1: options with proxies (0, 1/3, 2/3, 1), gold = option 3. Samples 0 and 1 both answered the
# LETTER "A", but in different option orders: A = option 0 for sample 0, A = option 1 for sample 1.
Q1 = [
    s("kc", "q1", 0, 0, 0.0, n_tokens=10, lp=-2.0, order=[0, 1, 2, 3], extraction="A"),
    s("kc", "q1", 1, 1, T3, n_tokens=20, lp=-1.0, order=[1, 0, 2, 3], extraction="A"),
    s("kc", "q1", 2, 2, 2 * T3, n_tokens=5, lp=-1.5, order=[3, 2, 1, 0], extraction="B"),
    s("kc", "q1", 3, 1, T3, n_tokens=10, lp=-3.0, order=[0, 1, 2, 3], extraction="B"),
    s("kc", "q1", 4, 3, 1.0, correct=True, n_tokens=50, lp=-0.5, order=[3, 0, 1, 2], extraction="A"),
    s("kc", "q1", 5, None, None, status="unparsed", n_tokens=7, lp=-0.1, order=[0, 1, 2, 3], extraction="?"),
]
# WoW pairs of q1, in order: (0,1) (0,2) (0,3) (1,2) (2,3); (1,3) has equal proxies.
NL = "nlgraph_shortest_path"
Q2 = [   # numeric, gold 10; samples 0 and 1 give the same number (8 and 8.0)
    s(NL, "q2", 0, 8, 0.8, n_tokens=30, lp=-1.0),
    s(NL, "q2", 1, 8.0, 0.8, n_tokens=30, lp=-1.2),
    s(NL, "q2", 2, 5, 0.5, n_tokens=10, lp=-0.5),
    s(NL, "q2", 3, 10, 1.0, correct=True, n_tokens=12),
    s(NL, "q2", 4, None, None, status="error", n_tokens=0, lp=None),
]
Q3 = [s(NL, "q3", 0, 3, 0.3), s(NL, "q3", 1, 10, 1.0, correct=True)]   # one wrong answer: no pair
SAMPLES = Q1 + Q2 + Q3


def acc_of(rows, task, method, margin=1.0, judge="-"):
    [row] = [r for r in rows if r["task"] == task and r["method"] == method and r["margin"] == margin
             and r["judge"] == judge]
    return row["n_pairs"], row["accuracy"]


# ---------------------------------------------------------------------------- pairs

def test_wow_pairs_drop_correct_unparsed_equal_proxy_and_lonely_wrong():
    pairs = elicit.wow_pairs(SAMPLES)
    assert [(p.question_id, p.i, p.j) for p in pairs] == [
        ("q1", 0, 1), ("q1", 0, 2), ("q1", 0, 3), ("q1", 1, 2), ("q1", 2, 3), ("q2", 0, 2), ("q2", 1, 2)]
    assert pairs[0] == Pair("kc", "q1", "g", 0, 1, 0.0, T3)
    assert pairs[0].better == 1 and pairs[4].better == 2
    stats = elicit.wow_stats(SAMPLES)
    assert stats == {"samples": 13, "questions": 3, "unparsed": 1, "error": 1, "correct": 3, "no_proxy": 0,
                     "wrong": 8, "pairs": 7, "equal_proxy_pairs": 2, "questions_without_pairs": 1}


def test_wow_pairs_independent_of_record_order():
    assert elicit.wow_pairs(SAMPLES[::-1]) == elicit.wow_pairs(SAMPLES)


# ---------------------------------------------------------------------------- scores

def test_consistency_counts_underlying_options_not_letters():
    scores = elicit.consistency_scores(SAMPLES)
    # q1: 5 valid answers (options 0, 1, 2, 1, 3); the unparsed sample is not a valid answer.
    # Samples 0 and 1 both said "A" but chose options 0 and 1: NOT consistent with each other.
    assert scores[("kc", "g", "q1", 0)] == pytest.approx(1 / 5)
    assert scores[("kc", "g", "q1", 1)] == pytest.approx(2 / 5)
    assert scores[("kc", "g", "q1", 3)] == pytest.approx(2 / 5)   # same option, different letter
    assert ("kc", "g", "q1", 5) not in scores
    # q2: 4 valid answers (8, 8.0, 5, 10): 8 and 8.0 are the same number.
    assert scores[(NL, "g", "q2", 1)] == pytest.approx(2 / 4)
    assert scores[(NL, "g", "q2", 2)] == pytest.approx(1 / 4)


def test_self_methods_accuracy_by_hand():
    rows = elicit.elicitation_rows(SAMPLES)
    # heuristic, q1: lengths 10, 20, 5, 10 -> (0,1) yes, (0,2) no, (0,3) TIE = wrong, (1,2) no, (2,3) no
    assert acc_of(rows, "kc", "heuristic") == (5, pytest.approx(1 / 5))
    # consistency, q1: 1/5, 2/5, 1/5, 2/5 -> yes, tie, yes, no, no
    assert acc_of(rows, "kc", "consistency") == (5, pytest.approx(2 / 5))
    # logits, q1: -2, -1, -1.5, -3 -> yes, yes, no, no, yes
    assert acc_of(rows, "kc", "logits") == (5, pytest.approx(3 / 5))
    # q2 (q3 has no pair): lengths 30, 30, 10 and consistency 2/4, 2/4, 1/4 -> both pairs right
    assert acc_of(rows, NL, "heuristic") == (2, 1.0)
    assert acc_of(rows, NL, "consistency") == (2, 1.0)
    # logits q2: -1, -1.2 vs -0.5 -> both wrong
    assert acc_of(rows, NL, "logits") == (2, 0.0)


def test_margins_keep_largest_gaps_with_stable_ties():
    rows = elicit.elicitation_rows(SAMPLES)
    # logits q1 gaps (1.0, 0.5, 1.0, 0.5, 1.5), agree (1, 1, 0, 0, 1); int(5 * .5) = 2 largest:
    # 1.5 (pair 4) and, of the two 1.0s, the later one in the stable sort (pair 2): agree 1, 0.
    assert acc_of(rows, "kc", "logits", 0.5) == (2, 0.5)
    # heuristic q1 gaps (10, 5, 0, 15, 5), agree (1, 0, 0, 0, 0): top 2 = pairs 3, 0 -> 1/2
    assert acc_of(rows, "kc", "heuristic", 0.5) == (2, 0.5)
    # int(5 * 0.1) = 0 pairs: no accuracy, no CI
    n, acc = acc_of(rows, "kc", "logits", 0.1)
    assert n == 0 and math.isnan(acc)
    assert list(elicit.margin_select([3, 1, 2, 2], 0.5)) == [0, 3]


def test_margin_select_rejects_bad_margin():
    with pytest.raises(ValueError):
        elicit.margin_select([1.0], 0.0)


# ---------------------------------------------------------------------------- CIs

def test_ci_contains_estimate_and_is_nan_safe():
    acc = elicit.pair_accuracy([1, 0, 1, 1, 0, 1, 1, 1])
    assert acc.n_pairs == 8 and acc.accuracy == 0.75
    assert 0 <= acc.ci_low <= acc.accuracy <= acc.ci_high <= 1 and acc.ci_low < acc.ci_high
    assert elicit.pair_accuracy([1, 0, 1, 1, 0, 1, 1, 1]) == acc                # seeded
    one = elicit.pair_accuracy([1])
    assert one.accuracy == 1.0 and math.isnan(one.ci_low) and math.isnan(one.ci_high)
    none = elicit.pair_accuracy([])
    assert none.n_pairs == 0 and math.isnan(none.accuracy) and math.isnan(none.ci_low)
    same = elicit.pair_accuracy([1, 1, 1])
    assert (same.ci_low, same.ci_high) == (1.0, 1.0)
    with pytest.raises(ValueError):
        elicit.pair_accuracy([1, 0], None, margin=0.5)


# ---------------------------------------------------------------------------- judges

def pw(qid, task, i, j, pi, pj, verdict, swapped, status="ok", swapped_status="ok", judge="J"):
    return {"task": task, "question_id": qid, "generator": "g", "judge": judge, "mode": "text", "i": i, "j": j,
            "proxy_i": pi, "proxy_j": pj, "text": "...", "verdict": verdict, "status": status,
            "swapped_text": "...", "swapped_verdict": swapped, "swapped_status": swapped_status}


PAIRWISE = [
    pw("q1", "kc", 0, 1, 0.0, T3, 2, 1),                  # right, consistent
    pw("q1", "kc", 0, 2, 0.0, 2 * T3, 2, 2),              # right, inconsistent (position bias)
    pw("q1", "kc", 0, 3, 0.0, T3, 1, 2),                  # wrong, consistent
    pw("q1", "kc", 1, 2, T3, 2 * T3, None, 1, status="missing"),   # unparsed: wrong, not consistent
    pw("q1", "kc", 2, 3, 2 * T3, T3, 1, 2),               # right, consistent
    pw("q2", NL, 0, 2, 0.8, 0.5, None, None, status="error", swapped_status="error"),   # left out
]
SCORES = [
    {"task": "kc", "question_id": "q1", "generator": "g", "judge": "J", "mode": "text",
     "samples": [0, 1, 2, 3, 4], "text": "...", "scores": [1, 3, 2, 3, 5], "status": "ok"},
    {"task": NL, "question_id": "q2", "generator": "g", "judge": "J", "mode": "text",
     "samples": [0, 1, 2, 3, 4], "text": "...", "scores": None, "status": "missing"},
]


def test_swap_consistency_filter():
    assert [elicit.is_swap_consistent(r) for r in PAIRWISE] == [True, False, True, False, True, False]
    rows = elicit.elicitation_rows(SAMPLES, pairwise=PAIRWISE)
    assert acc_of(rows, "kc", "pairwise", judge="J") == (5, pytest.approx(3 / 5))
    assert acc_of(rows, "kc", "pairwise_consistent", judge="J") == (3, pytest.approx(2 / 3))
    assert not [r for r in rows if r["task"] == NL and r["judge"] == "J"]     # failed calls only
    # text-mode verdicts have no gap: only margin 1.0 is reported
    assert not [r for r in rows if r["method"].startswith("pairwise") and r["margin"] != 1.0]


def test_swap_checked_row_is_reported_with_zero_pairs():
    """A judge with a position bias: every verdict flips when the outputs swap. The swap-checked
    row stays in the table, with 0 pairs, instead of vanishing."""
    biased = [dict(r, verdict=1, swapped_verdict=1, status="ok", swapped_status="ok") for r in PAIRWISE[:5]]
    rows = elicit.elicitation_rows(SAMPLES, pairwise=biased)
    checked = [r for r in rows if r["method"] == "pairwise_consistent"]
    assert len(checked) == 1 and checked[0]["n_pairs"] == 0 and math.isnan(checked[0]["accuracy"])
    assert "pairwise_consistent" in elicit.table1(rows).index.get_level_values("method")


def test_pairwise_logprob_margins_use_logprob_gap():
    records = [dict(r, mode="logprob", logprob_1=-1.0, logprob_2=-1.0 - k) for k, r in enumerate(PAIRWISE[:5])]
    rows = elicit.elicitation_rows(SAMPLES, pairwise=records)
    # gaps 0..4; top int(5*.5)=2 are records 3 (unparsed: wrong) and 4 (right) -> 1/2
    assert acc_of(rows, "kc", "pairwise_logprob", 0.5, judge="J") == (2, 0.5)


def test_score_judge_accuracy_and_margins():
    rows = elicit.elicitation_rows(SAMPLES, score=SCORES)
    # q1 scores 1, 3, 2, 3 -> yes, yes, yes, no, no
    assert acc_of(rows, "kc", "score", judge="J") == (5, pytest.approx(3 / 5))
    # gaps (2, 1, 2, 1, 1): the two largest are pairs 0 and 2, both right
    assert acc_of(rows, "kc", "score", 0.5, judge="J") == (2, 1.0)
    # q2's batch did not parse: it scored nobody, so its pairs are left out (not counted as wrong)
    assert not [r for r in rows if r["task"] == NL and r["method"] == "score"]


def test_score_judge_leaves_out_unshown_samples():
    partial = [dict(SCORES[0], samples=[0, 1, 4, 2, 5], scores=[1, 3, 5, 2, 0])]   # sample 3 not shown
    rows = elicit.elicitation_rows(SAMPLES, score=partial)
    # pairs with sample 3 are left out; (0,1) 1<3 yes, (0,2) 1<2 yes, (1,2) 3>2 no
    assert acc_of(rows, "kc", "score", judge="J") == (3, pytest.approx(2 / 3))


# ---------------------------------------------------------------------------- tables

def test_table1_shape_and_overall():
    rows = elicit.elicitation_rows(SAMPLES, pairwise=PAIRWISE, score=SCORES)
    table = elicit.table1(rows)
    assert list(table.columns) == [("kc", "g"), (NL, "g"), ("overall", "")]
    # 3 self methods x 3 margins + pairwise + pairwise_consistent + score x 3 margins
    assert table.shape == (14, 3)
    assert table.index[0] == ("heuristic", 1.0, "-")
    # overall = pair-weighted: heuristic (1/5 on 5 pairs, 1.0 on 2 pairs) -> 3/7
    assert table.loc[("heuristic", 1.0, "-"), ("overall", "")] == pytest.approx(3 / 7)
    # a column with no pairs does not count: pairwise has none on nlgraph
    assert table.loc[("pairwise", 1.0, "J"), ("overall", "")] == pytest.approx(3 / 5)
    assert math.isnan(table.loc[("logits", 0.1, "-"), ("overall", "")])


def test_shade_bins_kc_levels():
    outcomes = elicit.all_outcomes(SAMPLES)
    bins = elicit.shade_bins(outcomes[outcomes.task == "kc"])
    logits = bins[bins.method == "logits"].set_index(["less_wrong", "more_wrong"])
    # logits q1: (1/3 over 0) yes + no; (2/3 over 0) yes; (2/3 over 1/3) no + yes
    assert logits.loc[("0.333", "0"), "n_pairs"] == 2 and logits.loc[("0.333", "0"), "accuracy"] == 0.5
    assert logits.loc[("0.667", "0"), "accuracy"] == 1.0
    assert logits.loc[("0.667", "0.333"), "n_pairs"] == 2
    assert len(logits) == 3


def test_proxy_bins_equal_width_when_many_levels():
    index, labels = elicit.proxy_bins([0.05, 0.15, 0.35, 0.55, 0.75, 0.95, 1.0, 0.2], n_bins=5)
    assert list(index) == [0, 0, 1, 2, 3, 4, 4, 1]
    assert len(labels) == 5 and labels[-1].endswith("]")
    index, labels = elicit.proxy_bins([0.0, T3, 2 * T3, T3])
    assert list(index) == [0, 1, 2, 1] and labels == ["0", "0.333", "0.667"]


def test_task_statistics():
    stats = elicit.task_statistics(SAMPLES, pairwise=PAIRWISE, score=SCORES).set_index("task")
    kc = stats.loc["kc"]
    assert kc["questions"] == 1 and kc["samples"] == 6 and kc["wow_pairs"] == 5
    assert kc["accuracy"] == pytest.approx(1 / 6) and kc["unparsed"] == pytest.approx(1 / 6)
    assert kc["mean_confidence"] == pytest.approx(np.mean(np.exp([-2, -1, -1.5, -3, -0.5, -0.1])))
    assert kc["pairwise_parse_fail"] == pytest.approx(1 / 10)     # 1 missing of 10 verdicts
    nl = stats.loc[NL]
    assert nl["errors"] == 1 and nl["wow_pairs"] == 2 and nl["score_parse_fail"] == 1.0
    assert math.isnan(nl["pairwise_parse_fail"])                   # only an errored call


def test_rows_frame_columns():
    df = pd.DataFrame(elicit.elicitation_rows(SAMPLES))
    assert list(df.columns) == elicit.ROW_COLUMNS


def test_ties_and_missing_scores_are_wrong_either_way():
    up, down = Pair("kc", "q", "g", 0, 1, 0.5, 0.0), Pair("kc", "q", "g", 0, 1, 0.0, 0.5)
    tied = {("kc", "g", "q", 0): 2.0, ("kc", "g", "q", 1): 2.0}
    assert [o["agree"] for o in elicit.score_outcomes([up, down], tied, "m")] == [0, 0]
    missing = {("kc", "g", "q", 0): 2.0}
    assert [o["agree"] for o in elicit.score_outcomes([up, down], missing, "m")] == [0, 0]
    ordered = {("kc", "g", "q", 0): 3.0, ("kc", "g", "q", 1): 2.0}
    assert [o["agree"] for o in elicit.score_outcomes([up, down], ordered, "m")] == [1, 0]


def test_parse_failures_count_text_verdicts_only():
    """A log-prob verdict cannot fail to parse: it must not dilute the text judge's failure rate."""
    text = [{**r, "mode": "text", "status": "missing", "swapped_status": None} for r in PAIRWISE if r["task"] == "kc"]
    logprob = [{**r, "mode": "logprob", "status": "ok", "swapped_status": "ok"} for r in PAIRWISE if r["task"] == "kc"]
    stats = elicit.task_statistics(SAMPLES, pairwise=text + logprob).set_index("task")
    assert stats.loc["kc", "pairwise_parse_fail"] == 1.0
