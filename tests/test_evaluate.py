"""wowlib.evaluate: metrics against hand-computed values, bootstrap sanity, selection, tables."""
from __future__ import annotations

import itertools
import math

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import stats

from wowlib import evaluate as ev

NR = 300   # bootstrap resamples in tests


def rec(qid: str, *, correct: bool | None = False, proxy: float | None = None, status: str = "ok",
        conf: float | None = 0.5, task: str = "kc", idx: int = 0, split: str = "test") -> dict:
    """One record of the samples contract (only what the metrics read matters)."""
    return {"task": task, "split": split, "question_id": qid, "sample_idx": idx, "option_order": None,
            "prompt": "p", "response": "r", "n_tokens": 3,
            "mean_logprob": None if conf is None else (math.log(conf) if conf > 0 else -math.inf),
            "extraction": "A", "answer": None if status != "ok" else 0, "proxy": proxy,
            "correct": correct, "status": status, "generator": "m"}


def official_style_ece(correct, conf, n_bins=10):
    """A reference written from the paper's definition with (lower, upper] bins (the official
    convention), as an independent check where no confidence is exactly 0."""
    correct, conf = np.asarray(correct, float), np.asarray(conf, float)
    edges = np.linspace(0, 1, n_bins + 1)
    total = 0.0
    for lo, hi in itertools.pairwise(edges):
        inside = (conf > lo) & (conf <= hi)
        if inside.any():
            total += inside.mean() * abs(conf[inside].mean() - correct[inside].mean())
    return total


# ---------------------------------------------------------------------------- ECE

def test_ece_three_bins_by_hand():
    conf = [0.1, 0.2, 0.5, 0.6, 0.9]
    correct = [False, True, True, False, True]
    # [0,1/3]: conf .15 acc .5 -> .35*2/5 ; (1/3,2/3]: conf .55 acc .5 -> .05*2/5 ; (2/3,1]: .1*1/5
    assert ev.ece(correct, conf, n_bins=3) == pytest.approx(0.14 + 0.02 + 0.02)
    table = ev.reliability(correct, conf, n_bins=3)
    assert table["count"].tolist() == [2, 2, 1]
    assert table["mean_confidence"].tolist() == pytest.approx([0.15, 0.55, 0.9])
    assert table["accuracy"].tolist() == pytest.approx([0.5, 0.5, 1.0])
    assert list(table.columns) == ["bin", "lower", "upper", "count", "mean_confidence", "accuracy"]


def test_ece_confidence_exactly_zero_and_one():
    # confidence 0 answered right and confidence 1 answered wrong: both maximally miscalibrated
    assert ev.ece([True, False], [0.0, 1.0]) == pytest.approx(1.0)
    # the official (lower, upper] bins dropped the 0 (while still counting it in n): 0.5
    assert official_style_ece([True, False], [0.0, 1.0]) == pytest.approx(0.5)
    assert ev.bin_index(np.array([0.0, 1.0, 0.1, 0.10000001])).tolist() == [0, 9, 0, 1]
    assert ev.ece([False, True], [0.0, 1.0]) == pytest.approx(0.0)


def test_ece_all_correct_all_wrong_and_empty():
    conf = [0.95, 0.85, 0.55]
    assert ev.ece([True] * 3, conf) == pytest.approx((0.05 + 0.15 + 0.45) / 3)
    assert ev.ece([False] * 3, conf) == pytest.approx(np.mean(conf))
    assert math.isnan(ev.ece([], []))
    empty = ev.task_metrics([])
    assert math.isnan(empty.ece) and math.isnan(empty.p_wrong) and math.isnan(empty.accuracy)
    assert "empty" in empty.note


def test_bin_boundary_goes_to_lower_bin():
    # (lower, upper]: 0.5 with two bins belongs to the first bin
    assert ev.ece([True, False], [0.5, 0.75], n_bins=2) == pytest.approx(0.5 * 0.5 + 0.5 * 0.75)
    assert ev.reliability([True], [0.5], n_bins=2)["count"].tolist() == [1, 0]


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.booleans(), st.floats(1e-6, 1.0)), min_size=1, max_size=40))
def test_ece_matches_official_bins_when_no_zero(pairs):
    correct, conf = zip(*pairs)
    assert ev.ece(correct, conf) == pytest.approx(official_style_ece(correct, conf), abs=1e-12)


def test_ece_from_records_uses_exp_mean_logprob_and_skips_missing():
    records = [rec("q1", correct=True, proxy=1.0, conf=0.9), rec("q1", proxy=0.5, conf=0.3, idx=1),
               rec("q2", proxy=0.2, conf=0.0), rec("q2", status="error", conf=None, idx=1)]
    m = ev.task_metrics(records)
    assert m.ece == pytest.approx(ev.ece([True, False, False], [0.9, 0.3, 0.0]))
    assert m.n_confidence == 3 and "without a log-prob" in m.note
    rel = ev.reliability_table(records)
    assert rel["count"].sum() == 3 and rel.loc[0, "count"] == 1


# ---------------------------------------------------------------------------- p_wrong, accuracy

def mixed_task() -> list[dict]:
    return [rec("q1", correct=True, proxy=1.0), rec("q1", proxy=0.5, idx=1),
            rec("q1", status="unparsed", idx=2),
            rec("q2", proxy=0.25), rec("q2", proxy=0.75, idx=1), rec("q2", status="error", conf=None, idx=2)]


def test_p_wrong_unparsed_as_zero_vs_excluded_and_accuracy():
    m = ev.task_metrics(mixed_task())
    assert m.p_wrong == pytest.approx((0.5 + 0 + 0.25 + 0.75 + 0) / 5)
    assert m.p_wrong_parsed == pytest.approx((0.5 + 0.25 + 0.75) / 3)
    assert m.accuracy == pytest.approx(1 / 6)
    assert m.mean_proxy == pytest.approx((1.0 + 1.5) / 6)
    assert (m.n_samples, m.n_wrong, m.n_unparsed, m.n_error, m.n_questions) == (6, 5, 1, 1, 2)


def test_no_proxy_task_is_nan_with_note():
    records = [rec("q1", correct=False, proxy=None), rec("q1", correct=True, proxy=None, idx=1)]
    m = ev.task_metrics(records)
    assert math.isnan(m.p_wrong) and math.isnan(m.p_wrong_parsed) and math.isnan(m.mean_proxy)
    assert m.accuracy == pytest.approx(0.5) and "no proxy" in m.note
    ungraded = ev.task_metrics([rec("q1", correct=None, proxy=None)])
    assert math.isnan(ungraded.accuracy) and math.isnan(ungraded.ece) and "not graded" in ungraded.note


def test_all_unparsed_and_inconsistent_records():
    m = ev.task_metrics([rec("q1", status="unparsed"), rec("q2", status="unparsed")])
    assert m.p_wrong == 0.0 and math.isnan(m.p_wrong_parsed) and m.accuracy == 0.0
    with pytest.raises(ValueError, match="no proxy"):
        ev.task_metrics([rec("q1", proxy=0.5), rec("q2", proxy=None)])
    with pytest.raises(ValueError, match="several tasks"):
        ev.task_metrics([rec("q1", proxy=0.5), rec("q2", proxy=0.5, task="chess")])
    bad = rec("q1", proxy=0.5)
    del bad["mean_logprob"]
    with pytest.raises(ValueError, match="missing keys"):
        ev.task_metrics([bad])


# ---------------------------------------------------------------------------- improvements, bootstrap

def model(n_q: int, acc: float, wrong_proxy: float, conf: float, seed: int, n_s: int = 4) -> list[dict]:
    rng = np.random.default_rng(seed)
    out = []
    for q in range(n_q):
        for s in range(n_s):
            right = bool(rng.random() < acc)
            out.append(rec(f"q{q}", correct=right, proxy=1.0 if right else wrong_proxy, conf=conf, idx=s))
    return out


def test_improvement_signs():
    orig = model(30, 0.3, 0.2, 0.9, seed=1)          # overconfident, often wrong, very wrong
    better = model(30, 0.6, 0.6, 0.6, seed=2)
    up = ev.improvements(ev.task_data(orig), ev.task_data(better), n_resamples=NR)
    assert up["delta_p_wrong"] == pytest.approx(0.4)
    assert up["delta_accuracy"] > 0 and up["neg_delta_ece"] > 0 and up["delta_mean_proxy"] > 0
    assert up["delta_accuracy"] == pytest.approx(up["aligned_accuracy"] - up["original_accuracy"])
    assert up["neg_delta_ece"] == pytest.approx(up["original_ece"] - up["aligned_ece"])
    down = ev.improvements(ev.task_data(better), ev.task_data(orig), n_resamples=NR)
    for name in ev.IMPROVEMENTS:
        assert down[name] == pytest.approx(-up[name])
    assert up["delta_p_wrong_low"] <= up["delta_p_wrong"] <= up["delta_p_wrong_high"]


def test_bootstrap_ci_of_bernoulli_mean():
    draws = np.zeros(200, bool)
    draws[:60] = True                                 # exactly 0.3, one sample per question
    records = [rec(f"q{i}", correct=bool(d), proxy=1.0 if d else 0.5) for i, d in enumerate(draws)]
    ci = ev.metric_cis(ev.task_data(records), n_resamples=2000, seed=0)
    half = 1.96 * math.sqrt(0.3 * 0.7 / 200)          # 0.0635
    assert ci["accuracy"] == pytest.approx(0.3)
    assert ci["accuracy_low"] < 0.3 < ci["accuracy_high"]
    assert ci["accuracy_low"] == pytest.approx(0.3 - half, abs=0.015)
    assert ci["accuracy_high"] == pytest.approx(0.3 + half, abs=0.015)


def test_bootstrap_coverage_of_bernoulli():
    rng = np.random.default_rng(7)
    hits = 0
    for rep in range(60):
        draws = rng.random(200) < 0.3
        records = [rec(f"q{i}", correct=bool(d), proxy=1.0 if d else 0.5) for i, d in enumerate(draws)]
        ci = ev.metric_cis(ev.task_data(records), n_resamples=400, seed=rep)
        hits += ci["accuracy_low"] <= 0.3 <= ci["accuracy_high"]
    assert 0.85 <= hits / 60 <= 1.0


def test_bootstrap_resamples_questions_not_samples():
    # 50 questions x 10 identical samples: the information is 50 questions, not 500 samples
    records = [rec(f"q{q}", correct=q % 2 == 0, proxy=1.0 if q % 2 == 0 else 0.5, idx=s)
               for q in range(50) for s in range(10)]
    ci = ev.metric_cis(ev.task_data(records), n_resamples=1000)
    width = ci["accuracy_high"] - ci["accuracy_low"]
    assert width > 0.2                                  # ~2*1.96*sqrt(.25/50) = 0.28; per-sample: 0.09


def test_paired_bootstrap_identical_models_is_zero():
    orig = model(40, 0.4, 0.3, 0.7, seed=3)
    up = ev.improvements(ev.task_data(orig), ev.task_data(orig), n_resamples=NR)
    for name in ("delta_p_wrong", "delta_accuracy", "neg_delta_ece"):
        assert up[name] == 0.0 and up[f"{name}_low"] == 0.0 and up[f"{name}_high"] == 0.0


def test_paired_ci_is_narrower_than_unpaired():
    # the aligned model fixes one wrong answer in every 4th question: the change is consistent
    orig = model(80, 0.4, 0.3, 0.7, seed=4)
    aligned = [dict(r) for r in orig]
    for q in range(0, 80, 4):
        for r in aligned:
            if r["question_id"] == f"q{q}" and r["correct"] is False:
                r.update(correct=True, proxy=1.0)
                break
    up = ev.improvements(ev.task_data(orig), ev.task_data(aligned), n_resamples=NR)
    a = ev.metric_cis(ev.task_data(orig), n_resamples=NR)
    b = ev.metric_cis(ev.task_data(aligned), n_resamples=NR)
    unpaired_half = math.hypot(a["accuracy_high"] - a["accuracy_low"], b["accuracy_high"] - b["accuracy_low"]) / 2
    assert up["delta_accuracy"] == pytest.approx(20 / 320)
    assert up["delta_accuracy_low"] > 0                # paired: clearly positive
    assert (up["delta_accuracy_high"] - up["delta_accuracy_low"]) / 2 < 0.5 * unpaired_half


def test_fast_bootstrap_equals_naive_statistic_on_records():
    records = mixed_task() + model(20, 0.3, 0.4, 0.6, seed=5)
    data = ev.task_data(records)
    by_q = {q: [r for r in records if r["question_id"] == q] for q in data.question_ids}

    def naive(idx):
        rs = [r for i in idx for r in by_q[data.question_ids[i]]]
        return ev.task_metrics(rs).p_wrong

    ref = stats.bootstrap((np.arange(data.n_questions),), naive, vectorized=False, n_resamples=100,
                          method="percentile", rng=np.random.default_rng(11))
    ci = ev.metric_cis(data, n_resamples=100, seed=11)
    assert ci["p_wrong_low"] == pytest.approx(ref.confidence_interval.low)
    assert ci["p_wrong_high"] == pytest.approx(ref.confidence_interval.high)


def test_improvements_use_shared_questions_only():
    orig = model(10, 0.5, 0.3, 0.7, seed=6)
    aligned = [r for r in model(12, 0.5, 0.3, 0.7, seed=6)]
    up = ev.improvements(ev.task_data(orig), ev.task_data(aligned), n_resamples=50)
    assert up["n_questions"] == 10 and up["n_unshared_questions"] == 2


# ---------------------------------------------------------------------------- selection

def grid_frame() -> pd.DataFrame:
    rows = []
    # config: (val mean_proxy, test mean_proxy, val p_wrong)
    grid = {"lr1e-4": (0.50, 0.90, 0.40), "lr5e-5": (0.70, 0.40, 0.10), "lr1e-5": (0.60, 0.50, 0.30)}
    for trainer in ("dpo", "ipo"):
        for config, (val, test, pw) in grid.items():
            bump = 0.0 if trainer == "dpo" else 0.01 * (config == "lr1e-5") * 20   # ipo: lr1e-5 best on val
            rows.append({"task": "kc", "preference": "oracle", "trainer": trainer, "config": config,
                         "split": "val", "mean_proxy": val + bump, "p_wrong": pw, "accuracy": 0.3})
            rows.append({"task": "kc", "preference": "oracle", "trainer": trainer, "config": config,
                         "split": "test", "mean_proxy": test, "p_wrong": 0.2, "accuracy": 0.2})
    return pd.DataFrame(rows)


def test_selection_uses_val_not_test():
    sel = ev.select_configs(grid_frame())
    assert len(sel) == 6                                # every config kept
    chosen = ev.selected(sel).set_index("trainer")
    assert chosen.loc["dpo", "config"] == "lr5e-5"      # best on D_val, although lr1e-4 wins on D_test
    assert chosen.loc["dpo", "test_mean_proxy"] == pytest.approx(0.40)
    assert chosen.loc["dpo", "val_mean_proxy"] == pytest.approx(0.70)
    assert chosen.loc["ipo", "config"] == "lr1e-5"
    dpo = sel[sel["trainer"] == "dpo"].set_index("config")
    assert dpo["val_rank"].to_dict() == {"lr5e-5": 1, "lr1e-5": 2, "lr1e-4": 3}
    assert {"val_accuracy", "test_accuracy", "selected", "val_rank"} <= set(sel.columns)


def test_selection_criterion_tie_and_nan():
    frame = grid_frame()
    by_pw = ev.selected(ev.select_configs(frame, criterion="p_wrong"))
    assert set(by_pw["config"]) == {"lr1e-4"}
    by_low = ev.selected(ev.select_configs(frame, criterion="p_wrong", higher_is_better=False))
    assert set(by_low["config"]) == {"lr5e-5"}
    tie = frame.copy()
    tie.loc[tie["split"] == "val", "mean_proxy"] = 0.5 + 1e-15 * np.arange((tie["split"] == "val").sum())
    chosen = ev.selected(ev.select_configs(tie)).set_index("trainer")["config"]
    assert chosen.to_dict() == {"dpo": "lr1e-4", "ipo": "lr1e-4"}   # sorts first as a string
    nan = frame.copy()
    nan.loc[(nan["split"] == "val") & (nan["config"] == "lr5e-5"), "mean_proxy"] = np.nan
    chosen = ev.selected(ev.select_configs(nan)).set_index("trainer")["config"]
    assert chosen["dpo"] == "lr1e-5"


def test_selection_from_records_end_to_end():
    entries = []
    for config, acc in (("a", 0.2), ("b", 0.8)):
        for split, shift in (("val", 0.0), ("test", 0.1)):
            recs = [dict(r, split=split) for r in model(8, acc, 0.3 + shift, 0.6, seed=len(config))]
            entries.append(({"preference": "oracle", "trainer": "dpo", "config": config}, recs))
    table = ev.metrics_table(entries, ci=False)
    assert {"p_wrong", "accuracy", "ece", "mean_proxy", "n_samples", "split", "note"} <= set(table.columns)
    chosen = ev.selected(ev.select_configs(table))
    assert chosen["config"].tolist() == ["b"]
    with_ci = ev.metrics_table(entries[:1], n_resamples=50)
    assert {"p_wrong_low", "ece_high"} <= set(with_ci.columns)


# ---------------------------------------------------------------------------- tables

def comparisons() -> list:
    orig = model(12, 0.4, 0.3, 0.7, seed=8)
    better = model(12, 0.5, 0.5, 0.5, seed=9)
    other_orig = [dict(r, task="nlgraph_flow") for r in orig]
    other_better = [dict(r, task="nlgraph_flow") for r in better]
    return [
        ev.Comparison("dpo oracle", {"preference": "oracle", "trainer": "dpo", "source": "self"}, orig, better),
        ("dpo row+score", {"preference": "row+score", "trainer": "dpo", "source": "mix"}, orig, better),
        ("sp->flow", {"preference": "oracle", "trainer": "dpo", "train_task": "kc"}, other_orig, other_better),
        ("random", {"preference": "random", "trainer": "dpo"}, orig, orig),
    ]


def test_table_builders_route_rows_and_columns():
    rows = ev.improvement_rows(comparisons(), n_resamples=50)
    assert len(rows) == 4 and rows.loc[0, "train_task"] == "kc"
    trio = ["delta_p_wrong", "delta_p_wrong_low", "delta_p_wrong_high", "delta_accuracy",
            "delta_accuracy_low", "delta_accuracy_high", "neg_delta_ece", "neg_delta_ece_low",
            "neg_delta_ece_high"]
    t2 = ev.table2(rows)
    assert list(t2.columns) == ["task", "label", "preference", "trainer", "source", "n_questions", *trio]
    assert t2["label"].tolist() == ["dpo oracle"]
    assert ev.table3(rows)["label"].tolist() == ["dpo row+score"]
    t4 = ev.table4(rows)
    assert list(t4.columns)[:2] == ["train_task", "task"]
    assert t4[["train_task", "task"]].values.tolist() == [["kc", "nlgraph_flow"]]
    assert ev.control_table(rows)["label"].tolist() == ["random"]
    assert ev.control_table(rows).loc[0, "delta_accuracy"] == 0.0
    with pytest.raises(ValueError, match="no original-model records"):
        ev.improvement_rows([("x", {}, comparisons()[0].original, comparisons()[2][3])], n_resamples=10)


def test_formatting():
    assert ev.format_ci(0.0741, 0.0312, 0.1176) == "0.074 [0.031, 0.118]"
    assert ev.format_ci(-0.05, -0.1, 0.0, digits=1, scale=100) == "-5.0 [-10.0, 0.0]"
    assert ev.format_ci(float("nan"), 0, 1) == "n/a"
    assert ev.format_ci(0.5, float("nan"), float("nan")) == "0.500"
    table = pd.DataFrame({"task": ["kc"], "delta_p_wrong": [0.1], "delta_p_wrong_low": [0.0],
                          "delta_p_wrong_high": [0.2]})
    formatted = ev.format_table(table)
    assert list(formatted.columns) == ["task", "delta_p_wrong"]
    assert formatted.loc[0, "delta_p_wrong"] == "0.100 [0.000, 0.200]"
    md = ev.to_markdown(formatted)
    assert md.splitlines() == ["| task | delta_p_wrong |", "|---|---|", "| kc | 0.100 [0.000, 0.200] |"]


# ---------------------------------------------------------------------------- the stage's selection

def _entries(configs_per_set: int, splits=("val", "test")):
    """The original and aligned models' records: aligned config c answers correctly on c+1 questions."""
    from wowlib.evaluate import ORIGINAL
    meta0 = {"model": "base", "prefs": None, "preference": ORIGINAL, "trainer": None, "train_task": None,
             "config": None}
    qs = [f"q{k}" for k in range(4)]
    entries = [(meta0, [rec(q, proxy=0.0, split=s) for s in splits for q in qs])]
    for c in range(configs_per_set):
        meta = {"model": f"m{c}", "prefs": "self-oracle-kc", "preference": "oracle", "trainer": "dpo",
                "train_task": "kc", "config": f"cfg{c}"}
        entries.append((meta, [rec(q, correct=k <= c, proxy=1.0 if k <= c else 0.5, split=s)
                               for s in splits for k, q in enumerate(qs)]))
    return entries


@pytest.mark.parametrize("splits", [("val", "test"), ("test",)])
def test_stage_selects_on_val_or_takes_the_single_config(splits) -> None:
    from wowlib.evaluate import EvalConfig, _selected_comparisons
    n_configs = 2 if "val" in splits else 1
    entries = _entries(n_configs, splits)
    metrics = ev.metrics_table([(m, [r for r in recs if r["split"] == s]) for m, recs in entries
                                      for s in splits], n_resamples=NR)
    tables = _selected_comparisons(entries, metrics, EvalConfig(splits=splits, n_resamples=NR))
    chosen = tables["improvements"]["label"].tolist()
    assert chosen == [f"m{n_configs - 1}"]          # the config better on D_val (or the only one)
    assert tables["improvements"]["delta_accuracy"].iloc[0] == pytest.approx(n_configs / 4)


def test_stage_refuses_a_grid_without_val() -> None:
    from wowlib.evaluate import EvalConfig, _selected_comparisons
    entries = _entries(2, ("test",))
    metrics = ev.metrics_table([(m, recs) for m, recs in entries], n_resamples=NR)
    with pytest.raises(ValueError, match="needs 'val'"):
        _selected_comparisons(entries, metrics, EvalConfig(splits=("test",), n_resamples=NR))


# ---------------------------------------------------------------------------- reuse key and reruns

def _fake_adapter(directory, value: float = 1.0):
    """An adapter folder that verifies by structure (no train_log: as one made outside wowlib)."""
    import json
    import struct
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "adapter_config.json").write_text(json.dumps({"r": 2, "base_model_name_or_path": "tiny"}))
    header = json.dumps({"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}).encode()
    (directory / "adapter_model.safetensors").write_bytes(
        len(header).to_bytes(8, "little") + header + struct.pack("<2f", value, value))
    return directory


class _Answers:
    """A stand-in model for answer_split: every answer is option A; counts its calls."""

    name = key = "fake:tiny"

    def __init__(self):
        self.calls = 0

    def generate(self, requests, desc=""):
        from wowlib.llm.base import Completion
        self.calls += len(requests)
        return [Completion(text="The answer is A.", n_tokens=4, mean_logprob=-0.5) for _ in requests]


EVAL = ev.EvalConfig(base_model="tiny", n_questions=2, n_samples=2, max_new_tokens=8, n_resamples=10)


def test_the_reuse_key_has_no_machine_path_and_follows_the_adapters_content(tmp_path):
    import json

    from wowlib import store
    run = store.Run(tmp_path / "run")
    adapter = _fake_adapter(run.model("self-oracle-kc--dpo"))
    params = ev.eval_params(EVAL, "self-oracle-kc--dpo", str(adapter), "kc", run)
    assert params["adapter"] == "models/self-oracle-kc--dpo" and len(params["adapter_hash"]) == 16
    assert store.absolute_paths(json.dumps(params), store.local_roots() + [tmp_path]) == []
    moved = store.Run(tmp_path / "elsewhere" / "run")                   # a run directory moved or copied
    (tmp_path / "elsewhere").mkdir()
    run.root.rename(moved.root)
    assert ev.eval_params(EVAL, "self-oracle-kc--dpo", str(moved.model("self-oracle-kc--dpo")), "kc", moved) == params
    _fake_adapter(moved.model("self-oracle-kc--dpo"), value=2.0)        # retrained: other weights
    assert ev.eval_params(EVAL, "self-oracle-kc--dpo", str(moved.model("self-oracle-kc--dpo")), "kc",
                          moved)["hash"] != params["hash"]
    assert "adapter_hash" not in ev.eval_params(EVAL, "tiny", None, "kc", moved)   # the base model: as before
    weights = moved.model("self-oracle-kc--dpo") / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-3])
    from wowlib.align import AdapterError
    with pytest.raises(AdapterError, match=r"self-oracle-kc--dpo: adapter_model.safetensors is truncated"):
        ev.eval_params(EVAL, "self-oracle-kc--dpo", str(moved.model("self-oracle-kc--dpo")), "kc", moved)


def test_a_rerun_reuses_and_other_settings_are_refused(tmp_path, data_dir, monkeypatch):
    """The same settings: the file is reused (no model call). Other settings for the same file:
    refused, naming the file and the changed keys, unless overwrite=True (or WOW_OVERWRITE=1)."""
    import dataclasses

    from wowlib import store
    monkeypatch.delenv(store.OVERWRITE_ENV, raising=False)
    run = store.Run(tmp_path / "run")
    adapter = str(_fake_adapter(run.model("m")))
    llm = _Answers()
    first = ev.answer_split(run, EVAL, "m", adapter, ["kc"], llm=llm)
    assert llm.calls and len(first) == 2 * 2 * len(EVAL.splits)
    assert ev.answer_split(run, EVAL, "m", adapter, ["kc"], llm=object()) == first      # reused as it is
    other = dataclasses.replace(EVAL, n_samples=3)
    with pytest.raises(store.OverwriteError) as err:
        ev.answer_split(run, other, "m", adapter, ["kc"], llm=object())
    assert str(run.eval("m", "kc")) in str(err.value) and "n_samples: 2 -> 3" in str(err.value)
    assert ev.answer_split(run, EVAL, "m", adapter, ["kc"], llm=object()) == first      # untouched
    again = ev.answer_split(run, other, "m", adapter, ["kc"], llm=_Answers(), overwrite=True)
    assert len(again) == 2 * 3 * len(EVAL.splits)
    assert not (run.root / store.WRITER_LOCK).exists()


def test_an_old_manifest_with_an_absolute_adapter_path_is_the_same_setting(tmp_path, data_dir, monkeypatch):
    """Manifests written before the key was made portable hold the adapter's absolute path and no
    adapter_hash: the answers are recomputed (through the call cache) without a refusal."""
    from wowlib import store
    monkeypatch.delenv(store.OVERWRITE_ENV, raising=False)
    run = store.Run(tmp_path / "run")
    adapter = str(_fake_adapter(run.model("m")))
    ev.answer_split(run, EVAL, "m", adapter, ["kc"], llm=_Answers())
    manifest = store.read_json(run.eval("m", "kc").parent / "manifest.json")
    params = manifest["entries"]["kc"]["params"]
    params.pop("adapter_hash")
    params.update(adapter=str(run.model("m").resolve()), hash="0123456789abcdef")
    store.write_json(run.eval("m", "kc").parent / "manifest.json", manifest)
    llm = _Answers()
    ev.answer_split(run, EVAL, "m", adapter, ["kc"], llm=llm)
    assert llm.calls
    recorded = store.manifest_params(run.eval("m", "kc").parent, "kc")
    assert recorded["adapter"] == "models/m" and recorded["adapter_hash"]
