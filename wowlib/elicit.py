"""Phase 1 elicitation: can a model tell which of two WRONG answers is less wrong?

Wrong-over-wrong (WoW) pairs are built from the samples table (``wowlib.sample``): per question,
every pair of valid, wrong answers with different proxies; the proxy order is the silver label.
Each elicitation method orders a pair, and its accuracy is the share of pairs where that order
agrees with the proxy order (ties and non-answers count as wrong; random = 50%).

Methods (paper section 2):
- ``heuristic``: response length in tokens (longer = less wrong);
- ``consistency``: share of the question's valid answers equal to this answer;
- ``logits``: mean token log-probability of the response;
- ``pairwise`` (+ ``_consistent``): an LLM judge names the better of two responses; the
  consistent variant keeps a pair only if the verdict follows the answer when swapped;
- ``score``: an LLM judge grades responses 0-5 in batches of five.
Judge methods in log-probability mode carry a ``_logprob`` suffix.

Everything here is a pure function of records (dicts as written to the run directory): per pair
we compute an *outcome* (agree 0/1, score gap), and every accuracy, margin and confidence
interval is taken from outcomes by one function, ``pair_accuracy``.
"""
from __future__ import annotations

import itertools
import logging
import math
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import pandas as pd

from . import stats, store

log = logging.getLogger(__name__)

MARGINS = (1.0, 0.5, 0.1)                       # paper: top 100%, 50%, 10% of pairs by score gap
SELF_METHODS = ("heuristic", "consistency", "logits")
NO_JUDGE = "-"                                  # judge column of the self-contained methods
PROXY_TOL = 1e-9                                # proxies closer than this are "equal" (no pair)
OUTCOME_COLUMNS = ["task", "generator", "judge", "method", "question_id", "i", "j",
                   "proxy_i", "proxy_j", "agree", "gap"]
ROW_COLUMNS = ["task", "generator", "judge", "method", "margin", "n_pairs", "accuracy", "ci_low", "ci_high"]

SampleKey = tuple[str, str, str, int]            # (task, generator, question_id, sample_idx)


def sample_key(record: dict) -> SampleKey:
    return (record["task"], record["generator"], str(record["question_id"]), int(record["sample_idx"]))


def _group_key(record: dict) -> tuple[str, str, str]:
    return (record["task"], record["generator"], str(record["question_id"]))


def _by_question(samples: Iterable[dict]) -> dict[tuple[str, str, str], list[dict]]:
    groups: dict[tuple[str, str, str], list[dict]] = defaultdict(list)
    for r in samples:
        groups[_group_key(r)].append(r)
    for rows in groups.values():
        rows.sort(key=lambda r: int(r["sample_idx"]))
    return dict(sorted(groups.items()))


# ---------------------------------------------------------------------------- WoW pairs

@dataclass(frozen=True)
class Pair:
    """Two wrong answers to one question with different proxies; ``i < j`` (sample indices).
    The silver label is the proxy order: ``better`` is the sample index of the less wrong one."""

    task: str
    question_id: str
    generator: str
    i: int
    j: int
    proxy_i: float
    proxy_j: float

    @property
    def better(self) -> int:
        return self.i if self.proxy_i > self.proxy_j else self.j

    @property
    def key_i(self) -> SampleKey:
        return (self.task, self.generator, self.question_id, self.i)

    @property
    def key_j(self) -> SampleKey:
        return (self.task, self.generator, self.question_id, self.j)


def is_wow_candidate(record: dict) -> bool:
    """A sample that can enter a WoW pair: parsed, graded wrong, with a proxy."""
    return record["status"] == "ok" and record["correct"] is False and record["proxy"] is not None


def wow_pairs(samples: Iterable[dict]) -> list[Pair]:
    """Every WoW pair, per (task, generator, question), in a deterministic order."""
    pairs = []
    for (task, generator, qid), rows in _by_question(samples).items():
        wrong = [r for r in rows if is_wow_candidate(r)]
        for a, b in itertools.combinations(wrong, 2):
            if abs(a["proxy"] - b["proxy"]) > PROXY_TOL:
                pairs.append(Pair(task, qid, generator, int(a["sample_idx"]), int(b["sample_idx"]),
                                  float(a["proxy"]), float(b["proxy"])))
    return pairs


def wow_stats(samples: Sequence[dict]) -> dict[str, int]:
    """What ``wow_pairs`` kept and dropped: samples by status, correct answers, pairs of wrong
    answers with equal proxies, questions with fewer than two wrong answers."""
    stats = {"samples": len(samples), "questions": 0, "unparsed": 0, "error": 0, "correct": 0,
             "no_proxy": 0, "wrong": 0, "pairs": 0, "equal_proxy_pairs": 0, "questions_without_pairs": 0}
    for rows in _by_question(samples).values():
        stats["questions"] += 1
        for r in rows:
            if r["status"] in ("unparsed", "error"):
                stats[r["status"]] += 1
            elif r["correct"]:
                stats["correct"] += 1
            elif r["proxy"] is None:
                stats["no_proxy"] += 1
        wrong = [r for r in rows if is_wow_candidate(r)]
        stats["wrong"] += len(wrong)
        n_pairs = 0
        for a, b in itertools.combinations(wrong, 2):
            if abs(a["proxy"] - b["proxy"]) > PROXY_TOL:
                n_pairs += 1
            else:
                stats["equal_proxy_pairs"] += 1
        stats["pairs"] += n_pairs
        stats["questions_without_pairs"] += n_pairs == 0
    return stats


# ---------------------------------------------------------------------------- scores per sample

def heuristic_scores(samples: Iterable[dict]) -> dict[SampleKey, float]:
    """Response length in tokens: the paper's heuristic "longer = less wrong"."""
    return {sample_key(r): float(r["n_tokens"]) for r in samples if r.get("n_tokens") is not None}


def _same_answer(a: Any, b: Any) -> bool:
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool):
        return float(a) == float(b)
    return a == b


def consistency_scores(samples: Iterable[dict]) -> dict[SampleKey, float]:
    """Share of the question's valid answers (status "ok", correct ones included) equal to this
    sample's ``answer``, itself included.

    ``answer`` is the option index in the ORIGINAL order (or the number), so two samples agree
    when they chose the same underlying option, whatever letter it had. The paper's official code
    compared the extracted LETTERS, although every sample saw the options in its own random order,
    so equal letters there often meant different options (and vice versa): a bug this fixes.
    """
    scores = {}
    for rows in _by_question(samples).values():
        valid = [r for r in rows if r["status"] == "ok" and r["answer"] is not None]
        for r in valid:
            same = sum(_same_answer(r["answer"], other["answer"]) for other in valid)
            scores[sample_key(r)] = same / len(valid)
    return scores


def logit_scores(samples: Iterable[dict]) -> dict[SampleKey, float]:
    """Mean token log-probability of the sampled response (the paper's "logits" method)."""
    return {sample_key(r): float(r["mean_logprob"]) for r in samples if r.get("mean_logprob") is not None}


SCORERS = {"heuristic": heuristic_scores, "consistency": consistency_scores, "logits": logit_scores}


# ---------------------------------------------------------------------------- outcomes

def agrees(score_i: float | None, score_j: float | None, pair: Pair) -> tuple[int, float]:
    """(agree, gap) of a score order with the proxy order; a tie or a missing score is wrong."""
    if score_i is None or score_j is None or math.isnan(score_i) or math.isnan(score_j):
        return 0, 0.0
    diff = score_i - score_j
    agree = int(diff != 0 and (diff > 0) == (pair.proxy_i > pair.proxy_j))
    return agree, abs(diff)


def _outcome(pair: Pair, judge: str, method: str, agree: int, gap: float) -> dict[str, Any]:
    return {"task": pair.task, "generator": pair.generator, "judge": judge, "method": method,
            "question_id": pair.question_id, "i": pair.i, "j": pair.j, "proxy_i": pair.proxy_i,
            "proxy_j": pair.proxy_j, "agree": agree, "gap": gap}


def score_outcomes(pairs: Sequence[Pair], scores: dict[SampleKey, float], method: str,
                   judge: str = NO_JUDGE) -> list[dict[str, Any]]:
    """One outcome per pair from per-sample scores (higher = less wrong)."""
    out = []
    for p in pairs:
        agree, gap = agrees(scores.get(p.key_i), scores.get(p.key_j), p)
        out.append(_outcome(p, judge, method, agree, gap))
    return out


def self_outcomes(samples: Sequence[dict], methods: Sequence[str] = SELF_METHODS) -> list[dict[str, Any]]:
    """Outcomes of the self-contained methods (heuristic, consistency, logits) on every WoW pair."""
    pairs = wow_pairs(samples)
    return [o for m in methods for o in score_outcomes(pairs, SCORERS[m](samples), m)]


def _pair_from_judgment(r: dict) -> Pair:
    return Pair(r["task"], str(r["question_id"]), r["generator"], int(r["i"]), int(r["j"]),
                float(r["proxy_i"]), float(r["proxy_j"]))


def is_swap_consistent(record: dict) -> bool:
    """The verdict follows the answer when the outputs are swapped (swapped position 1 shows
    sample j): both parsed and ``swapped_verdict == 3 - verdict``."""
    return (record.get("verdict") in (1, 2) and record.get("swapped_verdict") in (1, 2)
            and record["swapped_verdict"] == 3 - record["verdict"])


def pairwise_outcomes(judgments: Iterable[dict], consistent: bool = False) -> list[dict[str, Any]]:
    """Outcomes of a pairwise judge from its records (``wowlib.judge.judge_pairwise``).

    A verdict of 1 prefers sample ``i``. A missing/invalid verdict or an error counts as wrong
    (an undecided judge is no better than a tie). With ``consistent=True`` only swap-consistent
    pairs are kept. In log-prob mode the gap is |log p(1) - log p(2)| (margins apply); in text
    mode every gap is 0, so only margin 1.0 is meaningful.
    """
    out = []
    for r in judgments:
        if r.get("status") == "error" or (consistent and not is_swap_consistent(r)):
            continue
        pair = _pair_from_judgment(r)
        verdict = r.get("verdict")
        agree = int(verdict in (1, 2) and (verdict == 1) == (pair.proxy_i > pair.proxy_j))
        gap = 0.0
        if r.get("logprob_1") is not None and r.get("logprob_2") is not None:
            gap = abs(float(r["logprob_1"]) - float(r["logprob_2"]))
        method = "pairwise" + ("_logprob" if r.get("mode") == "logprob" else "") + ("_consistent" if consistent else "")
        out.append(_outcome(pair, r["judge"], method, agree, gap))
    return out


def judge_scores_by_sample(judgments: Iterable[dict]) -> dict[tuple[str, str], dict[SampleKey, float | None]]:
    """Per (judge, mode), the score of every sample a score judge was shown (None where its
    batch did not parse). Batches whose call failed (status "error") are left out."""
    scores: dict[tuple[str, str], dict[SampleKey, float | None]] = defaultdict(dict)
    for r in judgments:
        if r.get("status") == "error":
            continue
        values = r.get("scores") if r.get("status") == "ok" else None
        for k, idx in enumerate(r["samples"]):
            key = (r["task"], r["generator"], str(r["question_id"]), int(idx))
            scores[(r["judge"], r.get("mode", "text"))][key] = None if values is None else float(values[k])
    return dict(scores)


def score_judge_outcomes(samples: Sequence[dict], judgments: Iterable[dict]) -> list[dict[str, Any]]:
    """Outcomes of a score judge on the WoW pairs whose two samples it scored. A batch that did not
    parse scored nobody: its samples' pairs are left out (``task_statistics``: score_parse_fail), not
    counted as wrong; so are the pairs of samples never shown (a remainder under five)."""
    pairs = wow_pairs(samples)
    out = []
    for (judge, mode), scores in sorted(judge_scores_by_sample(judgments).items()):
        shown = [p for p in pairs if scores.get(p.key_i) is not None and scores.get(p.key_j) is not None]
        method = "score" + ("_logprob" if mode == "logprob" else "")
        out += score_outcomes(shown, scores, method, judge)
    return out


def all_outcomes(samples: Sequence[dict], pairwise: Iterable[dict] = (),
                 score: Iterable[dict] = ()) -> pd.DataFrame:
    """One row per (method, judge, WoW pair): every method's agreement with the proxy order."""
    pairwise = list(pairwise)
    rows = self_outcomes(samples) + pairwise_outcomes(pairwise) + pairwise_outcomes(pairwise, consistent=True)
    rows += score_judge_outcomes(samples, score)
    return pd.DataFrame(rows, columns=OUTCOME_COLUMNS)


# ---------------------------------------------------------------------------- accuracy

@dataclass(frozen=True)
class Accuracy:
    n_pairs: int
    accuracy: float
    ci_low: float
    ci_high: float


def margin_select(gaps: Sequence[float], margin: float) -> np.ndarray:
    """Indices of the ``int(n * margin)`` pairs with the largest score gap (the paper's rule:
    argsort of the gaps, keep the top). A stable sort breaks ties by pair order, so the choice
    is deterministic."""
    if not 0 < margin <= 1:
        raise ValueError(f"margin must be in (0, 1], got {margin}")
    gaps = np.asarray(gaps, dtype=float)
    k = int(len(gaps) * margin)
    order = np.argsort(gaps, kind="stable")
    return np.sort(order[len(gaps) - k:]) if k > 0 else np.array([], dtype=int)


def pair_accuracy(agree: Sequence[int], gaps: Sequence[float] | None = None, margin: float = 1.0,
                  seed: int = 0, questions: Sequence | None = None,
                  n_resamples: int = stats.N_RESAMPLES) -> Accuracy:
    """Accuracy of one method on WoW pairs (``agree``: 1 where its order matches the proxy order,
    ties already 0), restricted to the top ``margin`` share by |score gap|, with a 95% interval that
    resamples QUESTIONS (``questions``: each pair's question; default: every pair its own, which
    is right only for independent pairs). The margin rule is applied inside every resample."""
    agree = np.asarray(agree, dtype=float)
    if margin != 1.0 and gaps is None:
        raise ValueError("a margin below 1.0 needs the score gaps")
    n = len(margin_select(np.zeros(len(agree)), margin)) if len(agree) else 0
    if n == 0:
        return Accuracy(0, math.nan, math.nan, math.nan)
    clusters = list(range(len(agree))) if questions is None else list(questions)
    statistic = stats.top_share_mean(agree, np.zeros(len(agree)) if gaps is None else np.asarray(gaps, dtype=float),
                                     margin)
    estimate, low, high = stats.cluster_bootstrap(clusters, statistic, n_resamples, seed)
    return Accuracy(n, float(estimate[0]), float(low[0]), float(high[0]))


def _margins_for(method: str, margins: Sequence[float]) -> list[float]:
    # A text-mode pairwise verdict has no gap: only "all pairs" is meaningful.
    if method in ("pairwise", "pairwise_consistent"):
        return [1.0]
    return list(margins)


def elicitation_rows(samples: Sequence[dict], pairwise: Iterable[dict] = (), score: Iterable[dict] = (),
                     margins: Sequence[float] = MARGINS, seed: int = 0,
                     n_resamples: int = stats.N_RESAMPLES) -> list[dict[str, Any]]:
    """One row per (task, generator, judge, method, margin): n_pairs, accuracy, 95% CI over
    questions. A pairwise judge's swap-checked row is always there, with 0 pairs when no verdict
    survived the swap (position bias is a result, not a gap in the table)."""
    pairwise = list(pairwise)
    outcomes = all_outcomes(samples, pairwise, score)
    rows = []
    for (task, generator, judge, method), group in outcomes.groupby(
            ["task", "generator", "judge", "method"], sort=True):
        for margin in _margins_for(method, margins):
            acc = pair_accuracy(group["agree"].to_numpy(), group["gap"].to_numpy(), margin, seed,
                                questions=group["question_id"].astype(str).to_list(), n_resamples=n_resamples)
            rows.append({"task": task, "generator": generator, "judge": judge, "method": method,
                         "margin": margin, **asdict(acc)})
    present = {(r["task"], r["generator"], r["judge"], r["method"]) for r in rows}
    for task, generator, judge, method in sorted(present):
        checked = f"{method}_consistent"
        if method in ("pairwise", "pairwise_logprob") and (task, generator, judge, checked) not in present \
                and any(r.get("swapped_verdict") is not None or r.get("swapped_status") is not None for r in pairwise):
            rows += [{"task": task, "generator": generator, "judge": judge, "method": checked, "margin": margin,
                      **asdict(Accuracy(0, math.nan, math.nan, math.nan))} for margin in _margins_for(checked, margins)]
    return rows


METHOD_ORDER = ["heuristic", "consistency", "logits", "pairwise", "pairwise_consistent",
                "pairwise_logprob", "pairwise_logprob_consistent", "score", "score_logprob"]


def table1(rows: Sequence[dict] | pd.DataFrame, value: str = "accuracy") -> pd.DataFrame:
    """The paper's Table 1: rows = (method, margin, judge), columns = (task, generator) plus an
    ``overall`` column, the pair-weighted mean accuracy over the columns."""
    df = pd.DataFrame(rows, columns=ROW_COLUMNS) if not isinstance(rows, pd.DataFrame) else rows.copy()
    index = ["method", "margin", "judge"]
    wide = df.set_index(index + ["task", "generator"])[[value, "n_pairs"]].unstack(["task", "generator"])
    table = wide[value].astype(float)
    weights = wide["n_pairs"].astype(float)
    valid = table.notna() & weights.notna() & (weights > 0)
    num = (table.where(valid, 0.0) * weights.where(valid, 0.0)).sum(axis=1)
    den = weights.where(valid, 0.0).sum(axis=1)
    table[("overall", "")] = (num / den.replace(0, np.nan)).astype(float)
    rank = {m: k for k, m in enumerate(METHOD_ORDER)}
    order = sorted(table.index, key=lambda ix: (rank.get(ix[0], len(rank)), ix[0], -ix[1], ix[2]))
    return table.loc[order]


# ---------------------------------------------------------------------------- shades of wrong

def proxy_bins(proxies: Sequence[float], n_bins: int = 5, max_levels: int = 6) -> tuple[np.ndarray, list[str]]:
    """(bin index per proxy, bin labels). Few distinct levels (KC: 0, 1/3, 2/3) are bins of their
    own; otherwise ``n_bins`` equal-width bins over [0, 1] (the last one closed)."""
    p = np.asarray(proxies, dtype=float)
    levels = np.unique(np.round(p, 9))
    if len(levels) <= max_levels:
        return np.searchsorted(levels, np.round(p, 9)), [f"{v:.3g}" for v in levels]
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    index = np.clip(np.digitize(p, edges[1:-1], right=False), 0, n_bins - 1)
    labels = [f"[{a:.2g},{b:.2g}" + ("]" if k == n_bins - 1 else ")") for k, (a, b) in enumerate(itertools.pairwise(edges))]
    return index, labels


def shade_bins(outcomes: pd.DataFrame, n_bins: int = 5, max_levels: int = 6, seed: int = 0) -> pd.DataFrame:
    """Accuracy by (proxy level of the less wrong answer, proxy level of the more wrong answer),
    per (task, generator, judge, method), at margin 1.0. Bins are per task, from the proxies
    of the WoW answers (``proxy_bins``)."""
    columns = ["task", "generator", "judge", "method", "less_wrong", "more_wrong", "n_pairs", "accuracy",
               "ci_low", "ci_high"]
    rows = []
    for task, df in outcomes.groupby("task", sort=True):
        better = np.maximum(df["proxy_i"], df["proxy_j"]).to_numpy()
        worse = np.minimum(df["proxy_i"], df["proxy_j"]).to_numpy()
        index, labels = proxy_bins(np.concatenate([better, worse]), n_bins, max_levels)
        df = df.assign(less_wrong=[labels[k] for k in index[:len(df)]],
                       more_wrong=[labels[k] for k in index[len(df):]])
        for keys, group in df.groupby(["generator", "judge", "method", "less_wrong", "more_wrong"], sort=True):
            acc = pair_accuracy(group["agree"].to_numpy(), seed=seed,
                                questions=group["question_id"].astype(str).to_list())
            rows.append(dict(zip(columns, (task, *keys)), **asdict(acc)))
    return pd.DataFrame(rows, columns=columns)


# ---------------------------------------------------------------------------- dataset statistics

def task_statistics(samples: Sequence[dict], pairwise: Iterable[dict] = (),
                    score: Iterable[dict] = ()) -> pd.DataFrame:
    """Per (task, generator): questions, samples, accuracy, mean confidence (exp of the mean token
    log-prob), share unparsed, errors, WoW pairs; and, when judgments are given, the share of
    text-mode judge calls whose reply did not parse (over all judges; errors excluded; a log-prob
    verdict reads the digits' probabilities and cannot fail to parse, so it is not counted)."""
    groups: dict[tuple[str, str], list[dict]] = defaultdict(list)
    for r in samples:
        groups[(r["task"], r["generator"])].append(r)
    judged: dict[str, dict[tuple[str, str], list[str]]] = {"pairwise": defaultdict(list), "score": defaultdict(list)}
    pairwise = [r for r in pairwise if r.get("mode", "text") == "text"]
    score = [r for r in score if r.get("mode", "text") == "text"]
    for r in pairwise:
        judged["pairwise"][(r["task"], r["generator"])] += [r["status"]] + (
            [r["swapped_status"]] if r.get("swapped_status") is not None else [])
    for r in score:
        judged["score"][(r["task"], r["generator"])].append(r["status"])
    rows = []
    for (task, generator), rs in sorted(groups.items()):
        n = len(rs)
        conf = [math.exp(r["mean_logprob"]) for r in rs if r.get("mean_logprob") is not None]
        row = {"task": task, "generator": generator, "questions": len({r["question_id"] for r in rs}),
               "samples": n, "accuracy": sum(bool(r["correct"]) for r in rs) / n,
               "mean_confidence": float(np.mean(conf)) if conf else math.nan,
               "unparsed": sum(r["status"] == "unparsed" for r in rs) / n,
               "errors": sum(r["status"] == "error" for r in rs),
               "wow_pairs": len(wow_pairs(rs))}
        for kind, by_task in judged.items():
            statuses = [s for s in by_task.get((task, generator), []) if s != "error"]
            row[f"{kind}_parse_fail"] = (sum(s not in ("ok", "tie") for s in statuses) / len(statuses)
                                         if statuses else math.nan)
        rows.append(row)
    return pd.DataFrame(rows)


# ---------------------------------------------------------------------------- the stage

def write_elicitation(run: store.Run, samples: Sequence[dict], pairwise: Sequence[dict] = (),
                      score: Sequence[dict] = (), margins: Sequence[float] = MARGINS,
                      seed: int = 0) -> dict[str, pd.DataFrame]:
    """All Phase 1 tables into ``elicitation/``: one row per (task, generator, judge, method,
    margin) with n_pairs, accuracy and 95% CI (``rows.csv``, with ``beats_random`` = the CI lies
    above 50%), the Table 1 layout (``table1.csv``), accuracy by shade bins (``shade_bins.csv``)
    and per-task dataset statistics (``dataset_stats.csv``)."""
    rows = pd.DataFrame(elicitation_rows(samples, pairwise, score, margins, seed))
    if not rows.empty:
        rows["beats_random"] = rows["ci_low"] > 0.5
    tables = {"rows": rows,
              "table1": table1(rows) if not rows.empty else pd.DataFrame(),
              "shade_bins": shade_bins(all_outcomes(samples, pairwise, score), seed=seed),
              "dataset_stats": task_statistics(samples, pairwise, score)}
    for name, table in tables.items():
        frame = table.reset_index() if name == "table1" and not table.empty else table
        if name == "table1" and not table.empty:
            frame.columns = [c if isinstance(c, str) else "/".join(x for x in map(str, c) if x) for c in frame.columns]
        store.write_csv(run.elicitation / f"{name}.csv", frame.to_dict("records"), list(frame.columns))
    return tables


def walk_through(samples: Sequence[dict], pairwise: Sequence[dict] = (),
                 score: Sequence[dict] = ()) -> tuple[dict[str, Any], pd.DataFrame]:
    """One WoW pair seen by every method (for the notebook). The pair is chosen by a rule: the
    largest proxy gap among pairs a pairwise judge saw (else among all pairs), first by question
    id. Returns the two answers and, per method, each answer's score and whether the method
    ranks the less wrong answer first."""
    pairs = wow_pairs(samples)
    judged = {(r["task"], r["generator"], str(r["question_id"]), r["i"], r["j"]) for r in pairwise}
    pool = [p for p in pairs if (p.task, p.generator, p.question_id, p.i, p.j) in judged] or pairs
    if not pool:
        return {}, pd.DataFrame()
    pair = min(pool, key=lambda p: (-abs(p.proxy_i - p.proxy_j), p.task, p.question_id, p.i, p.j))
    by_key = {sample_key(r): r for r in samples}
    less, more = (pair.key_i, pair.key_j) if pair.proxy_i > pair.proxy_j else (pair.key_j, pair.key_i)
    answers = {role: {k: by_key[key][k] for k in ("sample_idx", "answer", "proxy", "n_tokens", "response")}
               for role, key in (("less wrong", less), ("more wrong", more))}
    outcomes = all_outcomes(samples, pairwise, score)
    mine = outcomes[(outcomes["task"] == pair.task) & (outcomes["generator"] == pair.generator)
                    & (outcomes["question_id"].astype(str) == pair.question_id)
                    & (outcomes["i"] == pair.i) & (outcomes["j"] == pair.j)]
    rows = []
    for method, scorer in SCORERS.items():
        values = scorer(samples)
        rows.append({"method": method, "judge": "-", "less wrong": values.get(less), "more wrong": values.get(more)})
    for _, o in mine.iterrows():
        if o["method"] not in SCORERS:
            rows.append({"method": o["method"], "judge": o["judge"], "less wrong": None, "more wrong": None})
    table = pd.DataFrame(rows)
    agree = {(o["method"], o["judge"]): bool(o["agree"]) for _, o in mine.iterrows()}
    table["ranks less wrong first"] = [agree.get((m, j)) for m, j in zip(table["method"], table["judge"])]
    return {"task": pair.task, "generator": pair.generator, "question_id": pair.question_id, **answers}, table
