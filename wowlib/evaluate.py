"""Phase 2 evaluation: is the aligned model less wrong, more correct, better calibrated?

From the answer records of the run directory (docs/design.md; one dict per (question, sample), the same as the
Phase 1 samples), this module computes, per (model, task):

- ``p_wrong``: the mean proxy of the WRONG answers ("less wrong"). As in the paper's code, an
  answer that could not be parsed (``status`` "unparsed", or "error") is wrong and counts as
  proxy 0; ``p_wrong_parsed`` excludes those answers instead, so a model that merely parses better
  cannot pass for one that is less wrong.
- ``mean_proxy``: the mean proxy of ALL answers (unparsed = 0): the paper's "mean proxy score",
  the default criterion for choosing a grid configuration on D_val.
- ``accuracy``: the share of all samples that are correct ("more correct"; unparsed = wrong).
- ``ece``: expected calibration error, 10 equal-width bins over confidence = exp(mean token
  log-prob), with the reliability-diagram data behind it.

then the improvements of an aligned model over the original on the same questions, with paired
bootstrap confidence intervals that resample QUESTIONS; the selection of grid configurations on
D_val; and the generic builder behind Tables 2-4 and the control rows.

Every metric is a function of per-question sums (counts, proxy sums, per-bin confidence and
correctness sums), so the point estimate and every bootstrap resample go through one code path:
a resample of questions is a vector of multiplicities, and its sums are a matrix product.
"""
from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from . import stats, store

log = logging.getLogger(__name__)

N_BINS = 10                     # paper: 10 equal-width bins
N_RESAMPLES, CONFIDENCE_LEVEL, SEED = stats.N_RESAMPLES, stats.CONFIDENCE, stats.SEED

MODEL_METRICS = ("p_wrong", "p_wrong_parsed", "mean_proxy", "accuracy", "ece")
IMPROVEMENTS = ("delta_p_wrong", "delta_p_wrong_parsed", "delta_mean_proxy", "delta_accuracy",
                "neg_delta_ece")
TABLE_IMPROVEMENTS = ("delta_p_wrong", "delta_accuracy", "neg_delta_ece")   # the paper's columns

# Preference types as the tables name them (metadata key "preference").
WOW_PREFERENCES = ("oracle", "direct", "score")
ROW_PREFERENCES = ("row", "row+oracle", "row+direct", "row+score")
CONTROL_PREFERENCES = ("random", "sft_wrong")
META_KEYS = ("preference", "trainer", "source", "train_task", "config")

_REQUIRED = ("task", "question_id", "status", "correct", "proxy", "mean_logprob")
_STATUSES = ("ok", "unparsed", "error")


# ---------------------------------------------------------------------------- confidence and bins

def confidence(mean_logprob: float | None) -> float:
    """exp(mean token log-prob) in [0, 1]; NaN when the response has no log-prob (an error).
    -inf gives 0; a positive value within float noise of 0 is clipped to 1."""
    if mean_logprob is None or (isinstance(mean_logprob, float) and math.isnan(mean_logprob)):
        return math.nan
    value = float(mean_logprob)
    if value > 1e-6:
        raise ValueError(f"mean_logprob must be <= 0 (a log-probability), got {value}")
    return min(1.0, math.exp(value))


def bin_index(confidences: np.ndarray, n_bins: int = N_BINS) -> np.ndarray:
    """The bin of each confidence for ``n_bins`` equal-width bins over [0, 1].

    Bins are (lower, upper] as in the paper's code, with the edges of ``np.linspace(0, 1, n + 1)``
    (so boundary values fall exactly where the official comparisons put them), EXCEPT that the
    first bin is [0, 1/n]: the official code tests ``conf > lower``, which silently dropped every
    answer with confidence exactly 0 (and still counted it in the denominator). Confidence 1 falls
    in the last bin."""
    if n_bins < 1:
        raise ValueError(f"n_bins must be >= 1, got {n_bins}")
    conf = np.asarray(confidences, dtype=float)
    if conf.size and (np.nanmin(conf) < 0.0 or np.nanmax(conf) > 1.0):
        raise ValueError("confidences must lie in [0, 1]")
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    return np.clip(np.searchsorted(edges, conf, side="left") - 1, 0, n_bins - 1)


def _bin_sums(correct: np.ndarray, conf: np.ndarray, n_bins: int) -> np.ndarray:
    """(n_bins, 3): count, sum of confidence, sum of correctness per bin."""
    b = bin_index(conf, n_bins)
    return np.stack([np.bincount(b, minlength=n_bins).astype(float),
                     np.bincount(b, weights=conf, minlength=n_bins),
                     np.bincount(b, weights=correct.astype(float), minlength=n_bins)], axis=1)


def ece_from_bins(bins: np.ndarray) -> np.ndarray:
    """ECE = sum_b (n_b / n) |acc_b - conf_b| = sum_b |sum_b correct - sum_b conf| / n.
    Empty bins contribute nothing (they are skipped); no answers -> NaN. ``bins``: (..., n_bins, 3)."""
    n = bins[..., 0].sum(axis=-1)
    gap = np.abs(bins[..., 2] - bins[..., 1]).sum(axis=-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(n > 0, gap / np.where(n > 0, n, 1), np.nan)


def ece(correct: Sequence[bool] | np.ndarray, confidences: Sequence[float] | np.ndarray,
        n_bins: int = N_BINS) -> float:
    """Expected calibration error with ``n_bins`` equal-width bins (see ``bin_index``); NaN if
    there are no answers."""
    correct, conf = np.asarray(correct, dtype=bool), np.asarray(confidences, dtype=float)
    if correct.shape != conf.shape:
        raise ValueError(f"correct and confidences differ in shape: {correct.shape} vs {conf.shape}")
    return float(ece_from_bins(_bin_sums(correct, conf, n_bins)))


def reliability(correct: Sequence[bool] | np.ndarray, confidences: Sequence[float] | np.ndarray,
                n_bins: int = N_BINS) -> pd.DataFrame:
    """Reliability-diagram data: one row per bin (empty bins included, with count 0 and NaN
    means, so a plot keeps its axis): bin, lower, upper, count, mean_confidence, accuracy."""
    correct, conf = np.asarray(correct, dtype=bool), np.asarray(confidences, dtype=float)
    return _reliability_frame(_bin_sums(correct, conf, n_bins))


def _reliability_frame(bins: np.ndarray) -> pd.DataFrame:
    n_bins = len(bins)
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    count = bins[:, 0]
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_conf = np.where(count > 0, bins[:, 1] / np.where(count > 0, count, 1), np.nan)
        acc = np.where(count > 0, bins[:, 2] / np.where(count > 0, count, 1), np.nan)
    return pd.DataFrame({"bin": np.arange(n_bins), "lower": edges[:-1], "upper": edges[1:],
                         "count": count.astype(int), "mean_confidence": mean_conf, "accuracy": acc})


# ---------------------------------------------------------------------------- per-question sums

# Columns of the per-question sums; the bins follow as (count, conf_sum, correct_sum) triples.
_N, _N_CORRECT, _N_WRONG, _WRONG_PROXY, _N_WRONG_PARSED, _WRONG_PARSED_PROXY, _ALL_PROXY, _N_CONF = range(8)
_N_FIXED = 8


@dataclass(frozen=True)
class TaskData:
    """One model's answers to one task, reduced to per-question sums (rows follow
    ``question_ids``). ``has_proxy``/``graded`` say whether the task has a proxy and a
    right/wrong rule at all; without them the dependent metrics are NaN."""

    task: str
    question_ids: tuple[str, ...]
    sums: np.ndarray
    n_bins: int
    has_proxy: bool
    graded: bool
    n_unparsed: int
    n_error: int
    split: str | None = None
    generator: str | None = None

    @property
    def n_questions(self) -> int:
        return len(self.question_ids)

    def restrict(self, question_ids: Sequence[str]) -> TaskData:
        """The same data for ``question_ids`` only, in that order (for pairing two models)."""
        row = {q: i for i, q in enumerate(self.question_ids)}
        missing = [q for q in question_ids if q not in row]
        if missing:
            raise KeyError(f"{self.task}: questions not answered: {missing[:5]}")
        idx = [row[q] for q in question_ids]
        return TaskData(self.task, tuple(question_ids), self.sums[idx], self.n_bins, self.has_proxy,
                        self.graded, self.n_unparsed, self.n_error, self.split, self.generator)


def split_by_task(records: Iterable[Mapping]) -> dict[str, list[Mapping]]:
    """Records grouped by their ``task`` field, tasks in sorted order."""
    groups: dict[str, list[Mapping]] = {}
    for r in records:
        groups.setdefault(r["task"], []).append(r)
    return dict(sorted(groups.items()))


def task_data(records: Sequence[Mapping], n_bins: int = N_BINS) -> TaskData:
    """Reduce one task's records to per-question sums, checking the record contract.

    Unparsed and error answers count as wrong with proxy 0 (in ``p_wrong`` and ``mean_proxy``)
    and are left out of ``p_wrong_parsed``; answers without a log-prob (errors) are left out of the
    ECE. A task has no proxy when its parsed answers all have a null proxy."""
    if not records:
        raise ValueError("no records: an empty task has no metrics (use task_metrics, which gives NaN)")
    tasks = {r.get("task") for r in records}
    if len(tasks) != 1:
        raise ValueError(f"records of several tasks {sorted(map(str, tasks))}: use split_by_task first")
    for k, r in enumerate(records):
        missing = [key for key in _REQUIRED if key not in r]
        if missing:
            raise ValueError(f"record {k} ({r.get('task')}/{r.get('question_id')}): missing keys {missing}")
        if r["status"] not in _STATUSES:
            raise ValueError(f"record {k}: status must be one of {_STATUSES}, got {r['status']!r}")
    task = next(iter(tasks))
    parsed = [r for r in records if r["status"] == "ok"]
    with_proxy = sum(r["proxy"] is not None for r in parsed)
    if 0 < with_proxy < len(parsed):
        raise ValueError(f"{task}: {len(parsed) - with_proxy} of {len(parsed)} parsed answers have no proxy")
    # No parsed answer at all: the paper's rule (unparsed = proxy 0) still defines p_wrong.
    has_proxy = with_proxy > 0 or not parsed
    graded = all(r["correct"] is not None for r in records)

    qids = tuple(dict.fromkeys(str(r["question_id"]) for r in records))
    row = {q: i for i, q in enumerate(qids)}
    sums = np.zeros((len(qids), _N_FIXED + 3 * n_bins))
    conf_rows: list[int] = []
    conf_correct: list[bool] = []
    conf_values: list[float] = []
    for r in records:
        i = row[str(r["question_id"])]
        ok = r["status"] == "ok"
        proxy = float(r["proxy"]) if ok and r["proxy"] is not None else 0.0
        if not -1e-9 <= proxy <= 1.0 + 1e-9:
            raise ValueError(f"{task}/{r['question_id']}: proxy {proxy} outside [0, 1]")
        correct = r["correct"] is True
        wrong = r["correct"] is False
        sums[i, _N] += 1
        sums[i, _N_CORRECT] += correct
        sums[i, _ALL_PROXY] += proxy
        if wrong:
            sums[i, _N_WRONG] += 1
            sums[i, _WRONG_PROXY] += proxy
            if ok:
                sums[i, _N_WRONG_PARSED] += 1
                sums[i, _WRONG_PARSED_PROXY] += proxy
        c = confidence(r["mean_logprob"])
        if not math.isnan(c):
            sums[i, _N_CONF] += 1
            conf_rows.append(i)
            conf_correct.append(correct)
            conf_values.append(c)
    if conf_rows:
        conf = np.array(conf_values)
        cols = _N_FIXED + 3 * bin_index(conf, n_bins)
        rows = np.array(conf_rows)
        np.add.at(sums, (rows, cols), 1.0)
        np.add.at(sums, (rows, cols + 1), conf)
        np.add.at(sums, (rows, cols + 2), np.array(conf_correct, dtype=float))
    splits = {r.get("split") for r in records}
    generators = {r.get("generator") for r in records}
    return TaskData(task=str(task), question_ids=qids, sums=sums, n_bins=n_bins, has_proxy=has_proxy,
                    graded=graded, n_unparsed=sum(r["status"] == "unparsed" for r in records),
                    n_error=sum(r["status"] == "error" for r in records),
                    split=splits.pop() if len(splits) == 1 else None,
                    generator=generators.pop() if len(generators) == 1 else None)


def _ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, num / np.where(den > 0, den, 1), np.nan)


def metrics_from_sums(sums: np.ndarray, data: TaskData) -> dict[str, np.ndarray]:
    """The metrics of summed question rows ``sums`` (shape (..., columns)): one array each."""
    nan = np.full(sums.shape[:-1], np.nan)
    bins = sums[..., _N_FIXED:].reshape(sums.shape[:-1] + (data.n_bins, 3))
    proxy_ok, graded = data.has_proxy and data.graded, data.graded
    return {
        "p_wrong": _ratio(sums[..., _WRONG_PROXY], sums[..., _N_WRONG]) if proxy_ok else nan,
        "p_wrong_parsed": _ratio(sums[..., _WRONG_PARSED_PROXY], sums[..., _N_WRONG_PARSED]) if proxy_ok else nan,
        "mean_proxy": _ratio(sums[..., _ALL_PROXY], sums[..., _N]) if data.has_proxy else nan,
        "accuracy": _ratio(sums[..., _N_CORRECT], sums[..., _N]) if graded else nan,
        "ece": ece_from_bins(bins) if graded else nan,
    }


def _notes(data: TaskData) -> list[str]:
    notes = []
    if not data.has_proxy:
        notes.append("no proxy for this task (null for every answer): p_wrong and mean_proxy are NaN")
    if not data.graded:
        notes.append("answers are not graded right/wrong (correct is null): accuracy, p_wrong and ECE are NaN")
    total = data.sums.sum(axis=0)
    if data.has_proxy and data.graded and total[_N_WRONG] == 0:
        notes.append("no wrong answers: p_wrong is NaN")
    if total[_N_CONF] < total[_N]:
        notes.append(f"{int(total[_N] - total[_N_CONF])} answers without a log-prob left out of the ECE")
    return notes


# ---------------------------------------------------------------------------- point estimates

@dataclass(frozen=True)
class TaskMetrics:
    """The metrics of one model on one task (point estimates)."""

    task: str | None
    n_questions: int
    n_samples: int
    n_wrong: int
    n_unparsed: int
    n_error: int
    n_confidence: int
    p_wrong: float
    p_wrong_parsed: float
    mean_proxy: float
    accuracy: float
    ece: float
    note: str = ""

    def as_row(self) -> dict[str, Any]:
        return asdict(self)


def task_metrics(records: Sequence[Mapping], n_bins: int = N_BINS) -> TaskMetrics:
    """p_wrong, p_wrong_parsed, mean_proxy, accuracy and ECE of one task's records; an empty task
    gives NaN everywhere (with a note)."""
    if not records:
        nan = math.nan
        return TaskMetrics(None, 0, 0, 0, 0, 0, 0, nan, nan, nan, nan, nan, note="no answers (empty task)")
    return _task_metrics(task_data(records, n_bins))


def _task_metrics(data: TaskData) -> TaskMetrics:
    total = data.sums.sum(axis=0)
    values = {k: float(v) for k, v in metrics_from_sums(total, data).items()}
    return TaskMetrics(task=data.task, n_questions=data.n_questions, n_samples=int(total[_N]),
                       n_wrong=int(total[_N_WRONG]), n_unparsed=data.n_unparsed, n_error=data.n_error,
                       n_confidence=int(total[_N_CONF]), note="; ".join(_notes(data)), **values)


def confidences(records: Sequence[Mapping]) -> np.ndarray:
    """exp(mean_logprob) of each record (NaN where there is none)."""
    return np.array([confidence(r.get("mean_logprob")) for r in records], dtype=float)


def reliability_table(records: Sequence[Mapping], n_bins: int = N_BINS) -> pd.DataFrame:
    """Reliability-diagram data of one task's records (answers without a log-prob left out)."""
    if not records:
        return _reliability_frame(np.zeros((n_bins, 3)))
    data = task_data(records, n_bins)
    return _reliability_frame(data.sums[:, _N_FIXED:].sum(axis=0).reshape(n_bins, 3))


# ---------------------------------------------------------------------------- bootstrap

def question_bootstrap(sums: Sequence[np.ndarray], statistic: Callable[[list[np.ndarray]], np.ndarray],
                       n_resamples: int = N_RESAMPLES, seed: int = SEED,
                       confidence_level: float = CONFIDENCE_LEVEL) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Bootstrap CIs that resample QUESTIONS (``wowlib.stats.cluster_bootstrap``): (estimate, low,
    high), one entry per statistic.

    ``sums`` are per-question matrices whose rows are the same questions (one per model);
    ``statistic`` maps their weighted column sums (each (B, columns)) to an array (n_statistics, B).
    A resampled question brings every model's row along (a paired comparison), and its answers
    with it: the N samples of a question share its difficulty, so resampling samples would give
    intervals that are too narrow. A resample on which a statistic is undefined (e.g. no wrong
    answer) makes that statistic's interval NaN."""
    mats = [np.asarray(s, dtype=float) for s in sums]
    n_q = mats[0].shape[0]
    if any(m.shape[0] != n_q for m in mats):
        raise ValueError("per-question sums must have the same questions (rows)")
    return stats.cluster_bootstrap(range(n_q), lambda w: statistic([w @ m for m in mats]), n_resamples, seed,
                                   confidence_level)


def _with_ci(names: Sequence[str], estimate: np.ndarray, low: np.ndarray, high: np.ndarray) -> dict[str, float]:
    row: dict[str, float] = {}
    for name, e, lo, hi in zip(names, estimate, low, high):
        row[name], row[f"{name}_low"], row[f"{name}_high"] = float(e), float(lo), float(hi)
    return row


def metric_cis(data: TaskData, n_resamples: int = N_RESAMPLES, seed: int = SEED,
               confidence_level: float = CONFIDENCE_LEVEL) -> dict[str, float]:
    """Each model metric with its (unpaired) bootstrap CI over questions: ``name``, ``name_low``,
    ``name_high`` for every name in MODEL_METRICS."""
    def statistic(s: list[np.ndarray]) -> np.ndarray:
        values = metrics_from_sums(s[0], data)
        return np.stack([values[k] for k in MODEL_METRICS])
    return _with_ci(MODEL_METRICS, *question_bootstrap([data.sums], statistic, n_resamples, seed,
                                                       confidence_level))


def improvements(original: TaskData, aligned: TaskData, n_resamples: int = N_RESAMPLES, seed: int = SEED,
                 confidence_level: float = CONFIDENCE_LEVEL) -> dict[str, float]:
    """The aligned model's improvements over the original on the questions both answered, each
    positive when the aligned model is better, with paired bootstrap CIs (see question_bootstrap):

    - delta_p_wrong = p_wrong(aligned) - p_wrong(original)   (> 0: less wrong)
    - delta_p_wrong_parsed, delta_mean_proxy: the same for those metrics
    - delta_accuracy = accuracy(aligned) - accuracy(original)   (> 0: more correct)
    - neg_delta_ece = -(ece(aligned) - ece(original))   (> 0: better calibrated)
    """
    if original.task != aligned.task:
        raise ValueError(f"cannot compare different tasks: {original.task} vs {aligned.task}")
    if original.n_bins != aligned.n_bins:
        raise ValueError("original and aligned were binned differently")
    common = [q for q in original.question_ids if q in set(aligned.question_ids)]
    if not common:
        raise ValueError(f"{original.task}: the two models share no question")
    dropped = original.n_questions + aligned.n_questions - 2 * len(common)
    if dropped:
        log.warning("%s: comparing on the %d shared questions (%d answered by one model only)",
                    original.task, len(common), dropped)
    o, a = original.restrict(common), aligned.restrict(common)

    def statistic(s: list[np.ndarray]) -> np.ndarray:
        mo, ma = metrics_from_sums(s[0], o), metrics_from_sums(s[1], a)
        return np.stack([ma["p_wrong"] - mo["p_wrong"], ma["p_wrong_parsed"] - mo["p_wrong_parsed"],
                         ma["mean_proxy"] - mo["mean_proxy"], ma["accuracy"] - mo["accuracy"],
                         mo["ece"] - ma["ece"]])
    row: dict[str, Any] = {"n_questions": len(common), "n_unshared_questions": dropped}
    row.update(_with_ci(IMPROVEMENTS, *question_bootstrap([o.sums, a.sums], statistic, n_resamples, seed,
                                                          confidence_level)))
    for prefix, d in (("original", o), ("aligned", a)):
        total = d.sums.sum(axis=0)
        row[f"{prefix}_n_samples"] = int(total[_N])
        for k, v in metrics_from_sums(total, d).items():
            row[f"{prefix}_{k}"] = float(v)
    return row


# ---------------------------------------------------------------------------- metric tables

def metrics_table(entries: Iterable[tuple[Mapping[str, Any], Sequence[Mapping]]], n_bins: int = N_BINS,
                  n_resamples: int = N_RESAMPLES, seed: int = SEED,
                  confidence_level: float = CONFIDENCE_LEVEL, ci: bool = True) -> pd.DataFrame:
    """One row per (entry, task): the entry's metadata (model, preference, trainer, config...),
    task, split, counts, every MODEL_METRICS value with its plain bootstrap CI (if ``ci``), note.
    This is ``eval/metrics.csv`` and the input of ``select_configs``."""
    rows = []
    for meta, records in entries:
        for task, recs in split_by_task(records).items():
            data = task_data(recs, n_bins)
            point = _task_metrics(data).as_row()
            row: dict[str, Any] = dict(meta)
            row.update(task=task, split=data.split, generator=data.generator)
            row.update({k: v for k, v in point.items() if k not in ("task", "note")})
            if ci:
                row.update(metric_cis(data, n_resamples, seed, confidence_level))
            row["note"] = point["note"]
            rows.append(row)
    return pd.DataFrame(rows)


# ---------------------------------------------------------------------------- selection

def select_configs(metrics: pd.DataFrame, criterion: str = "mean_proxy",
                   group_by: Sequence[str] | None = None, config_col: str = "config",
                   split_col: str = "split", val_split: str = "val", test_split: str = "test",
                   higher_is_better: bool = True) -> pd.DataFrame:
    """The paper's model selection: in each group (default: those of task, source, preference,
    trainer that are columns), the config with the best ``criterion`` on D_val; D_test numbers
    are only reported, never looked at for choosing.

    ``metrics`` is long: one row per (config, split) with metric columns (``metrics_table``).
    Returns one row per (group, config), ALL configs kept: group keys, config, ``val_<metric>``
    and ``test_<metric>`` for every numeric column, ``selected`` and ``val_rank`` (1 = best).

    Criterion: the paper selects on the "mean proxy score" on D_val; we read it as ``mean_proxy``
    (all answers, unparsed = 0). (The official analysis script, through a variable that is
    overwritten, in effect ranked by the mean proxy of wrong answers: pass ``criterion="p_wrong"``
    to reproduce that.) Ties are broken deterministically: the criterion is rounded to 12
    decimals (so summation order cannot split a tie), then the config that sorts first by its
    identifier (as a string) wins; the official script kept whichever directory the file system
    listed first. A config whose criterion is NaN on D_val is never selected."""
    if group_by is None:
        group_by = [k for k in ("task", "source", "preference", "trainer") if k in metrics.columns]
    group_by = list(group_by)
    for col in (*group_by, config_col, split_col, criterion):
        if col not in metrics.columns:
            raise KeyError(f"select_configs: column {col!r} missing (columns: {list(metrics.columns)})")
    keys = [*group_by, config_col]
    dup = metrics[metrics.duplicated([*keys, split_col], keep=False)]
    if len(dup):
        raise ValueError(f"select_configs: several rows for the same config and split:\n{dup[[*keys, split_col]]}")
    value_cols = [c for c in metrics.columns if c not in (*keys, split_col)
                  and pd.api.types.is_numeric_dtype(metrics[c])]
    parts = []
    for split, prefix in ((val_split, "val_"), (test_split, "test_")):
        part = metrics[metrics[split_col] == split][[*keys, *value_cols]]
        parts.append(part.rename(columns={c: prefix + c for c in value_cols}))
    wide = parts[0].merge(parts[1], on=keys, how="outer")
    missing_val = wide[f"val_{criterion}"].isna()
    if missing_val.any():
        log.warning("select_configs: %d configs without a D_val %s are not eligible", missing_val.sum(), criterion)
    if wide[f"test_{criterion}"].isna().any():
        log.warning("select_configs: some configs have no D_test numbers")

    score = wide[f"val_{criterion}"].round(12) * (1 if higher_is_better else -1)
    wide = wide.assign(_score=score, _config=wide[config_col].astype(str))
    wide = wide.sort_values([*group_by, "_score", "_config"],
                            ascending=[True] * len(group_by) + [False, True], na_position="last",
                            kind="mergesort")
    if group_by:
        wide["val_rank"] = wide.groupby(group_by, sort=False, dropna=False).cumcount() + 1
    else:
        wide["val_rank"] = np.arange(1, len(wide) + 1)
    wide["selected"] = (wide["val_rank"] == 1) & wide["_score"].notna()
    lead = [*keys, "selected", "val_rank"]
    return wide[lead + [c for c in wide.columns if c not in lead and not c.startswith("_")]].reset_index(drop=True)


def selected(selection: pd.DataFrame) -> pd.DataFrame:
    """Only the chosen config of each group (rows of ``select_configs``)."""
    return selection[selection["selected"]].reset_index(drop=True)


# ---------------------------------------------------------------------------- tables 2-4

@dataclass(frozen=True)
class Comparison:
    """An aligned model against the original, on the same evaluation records' tasks. ``meta``
    holds the row's description: preference ("oracle", "row+score", "random"...), trainer,
    source, train_task (default: the evaluated task), config."""

    label: str
    meta: Mapping[str, Any]
    original: Sequence[Mapping]
    aligned: Sequence[Mapping]


def improvement_rows(comparisons: Iterable[Comparison | tuple[str, Mapping, Sequence[Mapping], Sequence[Mapping]]],
                     n_bins: int = N_BINS, n_resamples: int = N_RESAMPLES, seed: int = SEED,
                     confidence_level: float = CONFIDENCE_LEVEL) -> pd.DataFrame:
    """The generic table builder: one row per (comparison, evaluated task) with label, task,
    META_KEYS (+ any other metadata), every IMPROVEMENTS value with its paired CI, and both
    models' metrics. The table wrappers below only select rows and columns."""
    rows = []
    for item in comparisons:
        c = item if isinstance(item, Comparison) else Comparison(*item)
        original = split_by_task(c.original)
        for task, recs in split_by_task(c.aligned).items():
            if task not in original:
                raise ValueError(f"{c.label}: no original-model records for task {task!r}")
            row: dict[str, Any] = {"label": c.label, "task": task}
            row.update({k: None for k in META_KEYS})
            row.update(c.meta)
            if row.get("train_task") is None:
                row["train_task"] = task
            row.update(improvements(task_data(original[task], n_bins), task_data(recs, n_bins),
                                    n_resamples, seed, confidence_level))
            rows.append(row)
    return pd.DataFrame(rows)


def _table(rows: pd.DataFrame, mask: pd.Series, lead: Sequence[str],
           metrics: Sequence[str] = TABLE_IMPROVEMENTS) -> pd.DataFrame:
    cols = [*lead, "n_questions"] + [f"{m}{s}" for m in metrics for s in ("", "_low", "_high")]
    return rows.loc[mask, cols].reset_index(drop=True)


def table2(rows: pd.DataFrame, preferences: Sequence[str] = WOW_PREFERENCES) -> pd.DataFrame:
    """Main results (the paper's Table 2): WoW preference types, evaluated on the training task."""
    mask = rows["preference"].isin(preferences) & (rows["train_task"] == rows["task"])
    return _table(rows, mask, ["task", "label", "preference", "trainer", "source"])


def table3(rows: pd.DataFrame, preferences: Sequence[str] = ROW_PREFERENCES) -> pd.DataFrame:
    """Right-over-wrong and its 50:50 mixes with WoW (the paper's Table 3)."""
    mask = rows["preference"].isin(preferences) & (rows["train_task"] == rows["task"])
    return _table(rows, mask, ["task", "label", "preference", "trainer", "source"])


def table4(rows: pd.DataFrame) -> pd.DataFrame:
    """Generalisation (the paper's Table 4): trained on one task, evaluated on another."""
    mask = rows["train_task"] != rows["task"]
    return _table(rows, mask, ["train_task", "task", "label", "preference", "trainer", "source"])


def control_table(rows: pd.DataFrame, preferences: Sequence[str] = CONTROL_PREFERENCES) -> pd.DataFrame:
    """Controls: preferences in a random direction, SFT on wrong answers."""
    mask = rows["preference"].isin(preferences)
    return _table(rows, mask, ["train_task", "task", "label", "preference", "trainer", "source"])


# ---------------------------------------------------------------------------- formatting

def format_ci(estimate: float, low: float, high: float, digits: int = 3, scale: float = 1.0) -> str:
    """"0.074 [0.031, 0.118]"; "n/a" for a NaN estimate, the estimate alone without a CI.
    ``scale=100`` gives percentage points."""
    if estimate is None or not np.isfinite(estimate):
        return "n/a"
    text = f"{estimate * scale:.{digits}f}"
    if low is None or high is None or not (np.isfinite(low) and np.isfinite(high)):
        return text
    return f"{text} [{low * scale:.{digits}f}, {high * scale:.{digits}f}]"


def format_table(table: pd.DataFrame, digits: int = 3, scale: float = 1.0) -> pd.DataFrame:
    """Replace every (name, name_low, name_high) triple by one "estimate [low, high]" column."""
    out = table.copy()
    for name in [c for c in table.columns if f"{c}_low" in table.columns and f"{c}_high" in table.columns]:
        out[name] = [format_ci(e, lo, hi, digits, scale)
                     for e, lo, hi in zip(table[name], table[f"{name}_low"], table[f"{name}_high"])]
        out = out.drop(columns=[f"{name}_low", f"{name}_high"])
    return out


def to_markdown(table: pd.DataFrame) -> str:
    """A GitHub Markdown table (no extra dependency); cells are written with str()."""
    def cell(v: Any) -> str:
        return "" if v is None or (isinstance(v, float) and math.isnan(v)) else str(v).replace("|", "\\|")
    lines = ["| " + " | ".join(map(str, table.columns)) + " |", "|" + "---|" * len(table.columns)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in table.itertuples(index=False)]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------- the stage

ORIGINAL = "original"            # the preference column of the un-aligned model
# Generalisation pairs that exist here (paper: COM2 -> HellaSwag is not reproducible, no COM2
# data; NLGraph shortest path -> max flow is).
GENERALISATION = {"nlgraph_shortest_path": ("nlgraph_flow",), "kc": ("mmlu_pro",)}


def generalisation_pairs(pairs: Sequence[str] = ()) -> dict[str, tuple[str, ...]]:
    """Train task -> unseen tasks, from ``"train->unseen"`` strings (all of ``GENERALISATION``
    when empty); a pair outside ``GENERALISATION`` is an error naming the known ones."""
    if not pairs:
        return dict(GENERALISATION)
    known = [f"{a}->{b}" for a, bs in GENERALISATION.items() for b in bs]
    out: dict[str, tuple[str, ...]] = {}
    for pair in pairs:
        train, _, unseen = pair.partition("->")
        if f"{train.strip()}->{unseen.strip()}" not in known:
            raise ValueError(f"generalisation pair {pair!r} is not one of {known}")
        out[train.strip()] = out.get(train.strip(), ()) + (unseen.strip(),)
    return out
GROUP = ("task", "prefs", "trainer")   # selection groups: one winner per preference set x trainer


@dataclass(frozen=True)
class EvalConfig:
    """Knobs of the evaluation: the Phase 1 protocol on D_val and D_test (paper values in comments)."""

    base_model: str = "smollm2-135m"
    splits: tuple[str, ...] = ("val", "test")
    n_questions: int | None = 20          # per task and split; paper: all (~60)
    n_samples: int = 10                   # paper: 10
    temperature: float = 1.0              # paper: 1.0
    max_new_tokens: int = 256
    extract_max_new_tokens: int = 32      # paper: 32, greedy
    stop_on_repeat: bool = False          # as in Phase 1 (wowlib.sample)
    extraction: str = "text"              # "text" | "constrained", as in Phase 1 (wowlib.sample)
    extraction_fallback: bool = False
    seed: int = 0                         # the same seed for every model: same option orders
    generalisation: Mapping[str, Sequence[str]] | None = None   # train task -> unseen tasks
    task_options: Mapping[str, dict] | None = None
    n_resamples: int = N_RESAMPLES

    def tasks_for(self, train_task: str) -> list[str]:
        """The tasks a model trained on ``train_task`` ("a+b" for several) is evaluated on."""
        own = train_task.split("+")
        extra = [t for own_task in own for t in (self.generalisation or {}).get(own_task, ())]
        return list(dict.fromkeys(own + extra))


def eval_params(config: EvalConfig, label: str, adapter: str | None, task: str, run=None) -> dict[str, Any]:
    """The manifest parameters of ``eval/<label>/<task>.jsonl``; their ``hash`` decides reuse.

    An adapter enters as its path relative to ``run`` (``models/<name>``; outside the run: its
    folder name), never a machine path, and as ``adapter_hash``, the hash of its verified files
    (``align.verify_adapter``: a damaged adapter is an error here, before any model is loaded), so
    a retrained adapter is evaluated again and a moved run directory is not."""
    params = {**asdict(config), "model": label, "adapter": adapter_ref(adapter, run), "task": task}
    params.pop("n_resamples")                  # bootstrap only: the answers do not depend on it
    if adapter is not None:
        from .align import verify_adapter
        params["adapter_hash"] = verify_adapter(adapter)
    return {**params, "hash": store.content_hash(params)}


def adapter_ref(adapter: str | Path | None, run=None) -> str | None:
    """``adapter`` as the reuse key and the manifests record it: relative to the run directory
    (``models/<name>``), else its folder name when it is an absolute path elsewhere."""
    if adapter is None:
        return None
    path = Path(adapter)
    if run is not None:
        try:
            return path.resolve().relative_to(Path(run.root).resolve()).as_posix()
        except ValueError:
            pass
    return path.name if path.is_absolute() else path.as_posix()


def eval_items(config: EvalConfig, task) -> list[tuple[str, Any]]:
    """The (split, question) items a model answers on ``task``, in record order: each split of
    ``config.splits`` in turn, its first ``n_questions``. Not materialised: a shard of the items
    completes only its own questions (``shard.run_evaluation_shard``)."""
    splits = task.splits()
    return [(split, q) for split in config.splits for q in splits[split][:config.n_questions]]


def answer_items(llm, config: EvalConfig, task, items: Sequence[tuple[str, Any]], label: str) -> list[dict]:
    """The Phase 1 protocol on (split, question) ``items`` (``eval_items`` or a contiguous range of
    them), split by split in their order; every record's ``generator`` is ``label``."""
    return answer_tasks(llm, config, [(task, items)], label)[0]


def answer_tasks(llm, config: EvalConfig, work: Sequence[tuple[Any, Sequence[tuple[str, Any]]]],
                 label: str) -> list[list[dict]]:
    """``answer_items`` for several (task, items) at once, all answered in one batch
    (``sample.answer_groups``): a model's tasks share one decoding tail. Returns each task's records."""
    from itertools import groupby

    from .llm.base import Decoding
    from .sample import answer_groups, extraction_mode
    decoding = Decoding(temperature=config.temperature, max_new_tokens=config.max_new_tokens,
                        stop_on_repeat=config.stop_on_repeat)
    extraction = Decoding(temperature=0.0, max_new_tokens=config.extract_max_new_tokens)
    mode = extraction_mode(llm, config.extraction, config.extraction_fallback)
    groups, owner = [], []
    for t, (task, items) in enumerate(work):
        for split, group in groupby(items, key=lambda item: item[0]):
            groups.append((task, task.materialise([q for _, q in group]), split))
            owner.append(t)
    out: list[list[dict]] = [[] for _ in work]
    for t, records in zip(owner, answer_groups(llm, groups, config.n_samples, decoding, extraction, config.seed, mode)):
        for r in records:
            r["generator"] = label
        out[t] += records
    return out


def write_eval(run, label: str, task: str, records: Sequence[dict], params: dict, model_key: str) -> None:
    """``eval/<label>/<task>.jsonl`` and its manifest entry (``params`` from ``eval_params``)."""
    path = run.eval(label, task)
    store.write_jsonl(path, records)
    store.write_manifest(path.parent, "evaluate", params, {"model": model_key}, [path], entry=task)


def answer_split(run, config: EvalConfig, label: str, adapter: str | None, tasks: Sequence[str],
                 llm=None, overwrite: bool | None = None) -> list[dict]:
    """One model (the base model, or the base model with an adapter) answers D_val and D_test of
    ``tasks`` with the Phase 1 protocol; writes ``eval/<label>/<task>.jsonl`` (cached calls, so a
    rerun or an interrupted run costs nothing twice) and returns the records. A file whose
    manifest entry has these parameters is reused as it is; one made with other settings is not
    overwritten unless ``overwrite=True`` (or ``WOW_OVERWRITE=1``); a retrained adapter (same
    settings, new ``adapter_hash``) is evaluated again. Holds the run's writer lock. ``llm``: a
    ``CachedLLM`` (default: the model behind the run's cache, loaded when a task needs answers)."""
    with run.writer("evaluate", overwrite=overwrite):
        return _answer_split(run, config, label, adapter, tasks, llm)


def _answer_split(run, config: EvalConfig, label: str, adapter: str | None, tasks: Sequence[str],
                  llm=None) -> list[dict]:
    from .llm.cache import CachedLLM
    from .llm.models import load_llm
    from .tasks import get_task
    records: dict[str, list[dict]] = {}
    todo = []                                  # (name, params) of the tasks to answer
    for name in tasks:
        path = run.eval(label, name)
        params = eval_params(config, label, adapter, name, run)
        recorded = store.manifest_params(path.parent, name)
        if path.exists() and recorded is not None and recorded.get("hash") == params["hash"]:
            records[name] = store.read_jsonl(path)
            continue
        store.refuse_overwrite(path, _portable_record(recorded, run), params, ignore=("hash", "adapter_hash"))
        todo.append((name, params))
    if todo:
        llm = llm if llm is not None else CachedLLM(load_llm(config.base_model, adapter=adapter), run.root / "cache")
        work = [(task, eval_items(config, task)) for task in
                (get_task(name, **(config.task_options or {}).get(name, {})) for name, _ in todo)]
        for (name, params), task_records in zip(todo, answer_tasks(llm, config, work, label)):
            write_eval(run, label, name, task_records, params, llm.key)
            records[name] = task_records
    return [r for name in tasks for r in records[name]]


def _portable_record(recorded: dict | None, run) -> dict | None:
    """Recorded parameters as ``eval_params`` now writes them: manifests written before adapters
    were recorded run-relative hold an absolute path, which is the same setting."""
    if recorded is None or not recorded.get("adapter"):
        return recorded
    return {**recorded, "adapter": adapter_ref(recorded["adapter"], run)}


def run_evaluation(run, config: EvalConfig, models: Sequence[Mapping[str, Any]],
                   overwrite: bool | None = None) -> dict[str, pd.DataFrame]:
    """Evaluate the original model and every adapter of ``models`` (rows of
    ``models/summary.csv``), select each group's config on D_val, and write the eval tables
    (``eval/metrics.csv``, ``selection.csv``, ``improvements.csv``, ``table2-4``, ``controls``,
    ``reliability.csv``, ``models.csv``). Returns them by name. Holds the run's writer lock;
    ``overwrite``: replace answers made with other settings (see ``answer_split``)."""
    with run.writer("evaluate", overwrite=overwrite):
        return _run_evaluation(run, config, models)


def _run_evaluation(run, config: EvalConfig, models: Sequence[Mapping[str, Any]]) -> dict[str, pd.DataFrame]:
    meta_cols = ("model", "prefs", "preference", "trainer", "source", "judge", "train_task", "config",
                 "elicitation_method", "elicitation_judge", "elicitation_margin")
    train_tasks = list(dict.fromkeys(m["train_task"] for m in models)) or []
    eval_tasks = list(dict.fromkeys(t for tt in train_tasks for t in config.tasks_for(tt)))
    original_meta = {k: None for k in meta_cols} | {"model": config.base_model, "preference": ORIGINAL}
    entries = [(original_meta, answer_split(run, config, config.base_model, None, eval_tasks))]
    for k, m in enumerate(models, 1):
        log.info("[%d/%d] evaluating %s", k, len(models), m["model"])
        meta = {c: m.get(c) for c in meta_cols}
        records = answer_split(run, config, m["model"], str(run.model(m["model"])), config.tasks_for(m["train_task"]))
        entries.append((meta, records))
    per_split = [(meta, [r for r in recs if r["split"] == split]) for meta, recs in entries for split in config.splits]
    metrics = metrics_table(per_split, n_resamples=config.n_resamples, seed=config.seed)
    described = [{"model": meta["model"], "base_model": config.base_model,
                  "adapter": None if meta["preference"] == ORIGINAL else f"models/{meta['model']}", **meta}
                 for meta, _ in entries]
    tables = {"metrics": metrics, "models": pd.DataFrame(described)}
    tables.update(_selected_comparisons(entries, metrics, config))
    for name, table in tables.items():
        store.write_csv(run.eval_dir / f"{name}.csv", table.to_dict("records"), list(table.columns))
        if name in ("table2", "table3", "table4", "controls"):
            (run.eval_dir / f"{name}.md").write_text(to_markdown(format_table(table)))
    return tables


def _selected_comparisons(entries, metrics: pd.DataFrame, config: EvalConfig) -> dict[str, pd.DataFrame]:
    """The paper's selection (best D_val mean proxy on the training task per preference set x
    trainer), then the selected adapters' improvements on D_test with paired CIs."""
    aligned = metrics[(metrics["preference"] != ORIGINAL) & (metrics["task"] == metrics["train_task"])]
    if aligned.empty:
        return {}
    if "val" not in config.splits:
        # Without D_val there is nothing to select on: allowed only when each group has one config.
        sizes = aligned.groupby(list(GROUP))["config"].nunique()
        if (sizes > 1).any():
            raise ValueError(f"EvalConfig.splits={config.splits}: a grid of several configs needs 'val' to "
                             f"select on (groups with several: {list(sizes[sizes > 1].index)})")
        selection = aligned[[*GROUP, "config"]].drop_duplicates().assign(
            selected=True, val_rank=1, note="one config per group: nothing to select, no D_val")
    else:
        selection = select_configs(aligned, group_by=list(GROUP))
    winners = {(r.prefs, r.trainer, r.config) for r in selected(selection).itertuples()}
    test = "test"
    original = [r for r in entries[0][1] if r["split"] == test]
    comparisons = [Comparison(meta["model"], {k: v for k, v in meta.items() if k != "model"}, original,
                              [r for r in recs if r["split"] == test])
                   for meta, recs in entries[1:] if (meta["prefs"], meta["trainer"], meta["config"]) in winners]
    rows = improvement_rows(comparisons, n_resamples=config.n_resamples, seed=config.seed)
    reliability = []
    for meta, recs in [entries[0]] + [e for e in entries[1:] if e[0]["model"] in {c.label for c in comparisons}]:
        for task, task_recs in split_by_task([r for r in recs if r["split"] == test]).items():
            frame = reliability_table(task_recs)
            frame.insert(0, "split", test)
            frame.insert(0, "task", task)
            frame.insert(0, "model", meta["model"])
            reliability.append(frame)
    return {"selection": selection, "improvements": rows, "table2": table2(rows), "table3": table3(rows),
            "table4": table4(rows), "controls": control_table(rows),
            "reliability": pd.concat(reliability, ignore_index=True)}


def plan_cost(config: EvalConfig, models: Sequence[Mapping[str, Any]], tokens_per_second: float | None) -> dict:
    """Calls and an upper bound on time before the evaluation starts."""
    from .tasks import get_task
    per_task = {}
    calls = 0
    every_task = "+".join(dict.fromkeys(t for model in models for t in model["train_task"].split("+")))
    for train_task in [every_task] + [model["train_task"] for model in models]:
        for name in config.tasks_for(train_task):
            if name not in per_task:
                splits = get_task(name, **(config.task_options or {}).get(name, {})).splits()
                per_task[name] = sum(len(splits[s][:config.n_questions]) for s in config.splits)
            calls += per_task[name] * config.n_samples
    tokens = calls * (config.max_new_tokens + config.extract_max_new_tokens)
    return {"models": len(models) + 1, "answer_calls": calls, "max_new_tokens_total": tokens,
            "minutes_upper_bound": round(tokens / tokens_per_second / 60, 1) if tokens_per_second else None}
