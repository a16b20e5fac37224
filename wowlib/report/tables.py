"""The paper's tables from a run directory: Table 1 (elicitation accuracy, with its heatmap), the
plain summaries, Tables 2-4 and the controls (with forest plots), the power analysis, Table 5."""
from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from .. import paths, stats, store
from ..evaluate import ROW_PREFERENCES, WOW_PREFERENCES
from .common import (
    METRIC_LABELS, PERCENT_METRICS, RANDOM, TEXT_CHARS, aligned_by_task, Artifact, as_run, in_domain,
    line_handle, method_label, missing_inputs, new_figure, original_of, preference_colours,
    preference_sorted, read_table, row_label, RunLike, save_figure, save_table, skip_item,
)

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------- Table 1

def table1_frame(run: store.Run) -> pd.DataFrame | None:
    """Table 1 as written by ``wowlib.elicit.write_elicitation`` (rows = method, margin, judge)."""
    return read_table(run, "elicitation/table1.csv")


def _significance(rows: pd.DataFrame | None) -> dict[tuple[str, float, str, str], bool]:
    """(method, margin, judge, "task/generator") -> the 95% CI lies above 50%."""
    if rows is None:
        return {}
    return {(r.method, float(r.margin), str(r.judge), f"{r.task}/{r.generator}"): bool(r.ci_low > RANDOM)
            for r in rows.itertuples() if not pd.isna(r.ci_low)}


def table1(run: RunLike, out_dir: Path) -> Artifact:
    """Table 1: elicitation accuracy per method (rows) and task/generator (columns) + overall, as
    a heatmap centred on 50% (random) and as CSV/MD; * marks a 95% CI above 50%."""
    run, name = as_run(run), "table1_elicitation"
    table = table1_frame(run)
    if table is None:
        return skip_item(name, missing_inputs(run, "elicitation/table1.csv"))
    sig = _significance(read_table(run, "elicitation/rows.csv"))
    cells = [c for c in table.columns if c not in ("method", "margin", "judge")]
    labels = [method_label(m, j, float(p)) for m, p, j in zip(table["method"], table["margin"], table["judge"])]
    values = table[cells].astype(float).set_axis(labels)
    stars = pd.DataFrame([["*" if sig.get((m, float(p), str(j), c)) else "" for c in cells]
                          for m, p, j in zip(table["method"], table["margin"], table["judge"])],
                         index=labels, columns=cells)
    fig = _heatmap(values, stars)
    md = table[["method", "margin", "judge"]].copy()
    for c in cells:
        md[c] = [("" if pd.isna(v) else f"{100 * v:.1f}{s}") for v, s in zip(values[c], stars[c])]
    caption = ("**Table 1.** Elicitation accuracy (%) on wrong-over-wrong pairs; random = 50. "
               "`p` = share of pairs kept, largest score gap first; * = 95% bootstrap CI above 50%; "
               "`overall` = pair-weighted mean over the columns; empty = no pair. A `_consistent` row keeps "
               "only the verdicts that follow the answers when the two are shown in the other order: empty "
               "there means every verdict named the same position in both orders (the judge answered by "
               "position, so its plain row measures the order the pairs were shown in).")
    written = save_figure(fig, out_dir, name) + save_table(table, out_dir, name, md, caption)
    return Artifact(name, written, table)


def _draw_heatmap(sns, ax, values: pd.DataFrame, annot: list[list[str]]) -> None:
    sns.heatmap(values, ax=ax, cmap="RdBu", center=RANDOM, vmin=0.2, vmax=0.8, annot=np.array(annot), fmt="",
                annot_kws={"fontsize": 14}, linewidths=0.5, linecolor="white",
                cbar_kws={"label": "accuracy (0.5 = random)", "shrink": 0.8})


def _heatmap(values: pd.DataFrame, stars: pd.DataFrame):
    import seaborn as sns
    n_rows, n_cols = values.shape
    longest = max((len(str(label)) for label in values.index), default=10)
    fig = new_figure(2.5 + 0.13 * longest + 1.7 * n_cols, 2.0 + 0.45 * n_rows)
    ax = fig.subplots()
    annot = [[("" if pd.isna(v) else f"{100 * v:.0f}{s}") for v, s in zip(vr, sr)]
             for vr, sr in zip(values.to_numpy(), stars.to_numpy())]
    with warnings.catch_warnings():   # seaborn 0.13 calls a colormap method matplotlib 3.11 deprecates
        warnings.simplefilter("ignore", PendingDeprecationWarning)
        _draw_heatmap(sns, ax, values, annot)
    if "overall" in values.columns:
        ax.axvline(list(values.columns).index("overall"), color="black", linewidth=2)
    methods = [str(label).split()[0] for label in values.index]
    for k in range(1, n_rows):
        if methods[k] != methods[k - 1]:
            ax.axhline(k, color="white", linewidth=4)
    ax.set_xticks(np.arange(n_cols) + 0.5, [str(c).replace("/", "\n") for c in values.columns], rotation=0)
    ax.xaxis.tick_top()
    ax.set_xlabel("")
    ax.set_ylabel("")
    ax.set_title("Elicitation accuracy (%), * = CI above 50", loc="left")
    return fig


# ---------------------------------------------------------------------------- plain tables

def dataset_stats(run: RunLike, out_dir: Path) -> Artifact:
    """Per (task, generator): questions, samples, accuracy, confidence, unparsed, WoW pairs and
    the judges' parse failures."""
    run, name = as_run(run), "dataset_stats"
    table = read_table(run, "elicitation/dataset_stats.csv")
    if table is None:
        return skip_item(name, missing_inputs(run, "elicitation/dataset_stats.csv"))
    caption = ("**Dataset statistics.** Per task and generator: questions, samples, share correct, mean "
               "confidence exp(mean token log-prob), share unparsed, failed calls, WoW pairs, and the share "
               "of judge replies that did not parse.")
    return Artifact(name, save_table(table, out_dir, name, caption=caption), table)


def prefs_summary(run: RunLike, out_dir: Path) -> Artifact:
    """The preference sets: type, source, judge, candidate, degenerate, capped and kept pairs."""
    run, name = as_run(run), "prefs_summary"
    table = read_table(run, "prefs/summary.csv")
    if table is None:
        return skip_item(name, missing_inputs(run, "prefs/summary.csv"))
    caption = ("**Preference sets.** Candidate pairs, pairs with identical texts removed (degenerate), "
               "pairs cut by the cap, pairs kept; and the elicitation row that measures each set's labels.")
    return Artifact(name, save_table(table, out_dir, name, caption=caption), table)


def training_summary(run: RunLike, out_dir: Path) -> Artifact:
    """One row per trained adapter: preference set, trainer, config, pairs, time, loss, final
    reward margin and accuracy."""
    run, name = as_run(run), "training_summary"
    table = read_table(run, "models/summary.csv")
    if table is None:
        return skip_item(name, missing_inputs(run, "models/summary.csv"))
    caption = "**Training runs.** One LoRA adapter per row; margin/accuracy of the rewards at the last logged step."
    return Artifact(name, save_table(table, out_dir, name, caption=caption), table)


# ---------------------------------------------------------------------------- Tables 2-4, controls

def format_improvements(table: pd.DataFrame) -> pd.DataFrame:
    """"estimate [low, high]" cells for each improvement with a CI (accuracy in points), with
    readable column names."""
    from ..evaluate import format_ci
    out = table.copy()
    for metric in [c for c in table.columns if f"{c}_low" in table.columns and f"{c}_high" in table.columns]:
        scale, digits = (100.0, 1) if metric in PERCENT_METRICS else (1.0, 3)
        out[metric] = [format_ci(e, lo, hi, digits, scale)
                       for e, lo, hi in zip(table[metric], table[f"{metric}_low"], table[f"{metric}_high"])]
        out = out.drop(columns=[f"{metric}_low", f"{metric}_high"])
    return out.rename(columns=METRIC_LABELS)


TABLES = {   # name -> (source file, caption)
    "table2_main": ("eval/table2.csv", (
        "**Table 2.** Alignment with wrong-over-wrong preferences, evaluated on the training task (D_test). "
        "Improvements over the original model with 95% paired bootstrap CIs over questions; > 0 is better "
        "(less wrong, more correct, better calibrated).")),
    "table3_row_mixes": ("eval/table3.csv", (
        "**Table 3.** Right-over-wrong preferences and their 50:50 mixes with wrong-over-wrong, on D_test, "
        "with 95% CIs.")),
    "table4_generalisation": ("eval/table4.csv", (
        "**Table 4.** Generalisation: trained on `train_task`, evaluated on `task` (D_test), with 95% CIs.")),
    "controls": ("eval/controls.csv", (
        "**Controls.** Preferences in a random direction and SFT on wrong answers, with 95% CIs: what an "
        "uninformative signal does.")),
}


def improvement_table(run: RunLike, out_dir: Path, name: str) -> Artifact:
    """One of Tables 2-4 or the controls (see ``TABLES``) as CSV (raw, with CI columns) and
    Markdown ("estimate [low, high]")."""
    run = as_run(run)
    source, caption = TABLES[name]
    table = read_table(run, source)
    if table is None:
        return skip_item(name, missing_inputs(run, source))
    return Artifact(name, save_table(table, out_dir, name, format_improvements(table), caption), table)


def table2(run: RunLike, out_dir: Path) -> Artifact:
    """Table 2 (CSV/MD) and its forest plot of Δp_wrong, ΔAcc and −ΔECE with 95% CIs."""
    art = improvement_table(run, out_dir, "table2_main")
    if art.skipped:
        return art
    art.paths += save_figure(forest_plot(art.table, "Table 2: improvement over the original model (95% CI)"),
                             out_dir, "table2_forest")
    return art


def table3(run: RunLike, out_dir: Path) -> Artifact:
    return improvement_table(run, out_dir, "table3_row_mixes")


def table4(run: RunLike, out_dir: Path) -> Artifact:
    return improvement_table(run, out_dir, "table4_generalisation")


def controls(run: RunLike, out_dir: Path) -> Artifact:
    return improvement_table(run, out_dir, "controls")


def forest_plot(table: pd.DataFrame, title: str):
    """One panel per improvement (Δp_wrong, ΔAcc in points, −ΔECE): a point and its 95% CI per
    row, a line at 0 (no change); colour = preference type."""
    metrics = [m for m in METRIC_LABELS if m in table.columns]
    labels = [row_label(r) for _, r in table.iterrows()]
    prefs = preference_sorted(table["preference"]) if "preference" in table else ["-"]
    colours = preference_colours(prefs)
    fig = new_figure(4.5 * len(metrics) + 3.0, 1.5 + 0.5 * len(table))
    axes = np.atleast_1d(fig.subplots(1, len(metrics), sharey=True, squeeze=False)).ravel()
    y = np.arange(len(table))[::-1]
    for ax, metric in zip(axes, metrics):
        scale = 100.0 if metric in PERCENT_METRICS else 1.0
        est = table[metric].to_numpy(float) * scale
        low = table.get(f"{metric}_low", pd.Series(np.nan, index=table.index)).to_numpy(float) * scale
        high = table.get(f"{metric}_high", pd.Series(np.nan, index=table.index)).to_numpy(float) * scale
        for k, pref in enumerate(table.get("preference", pd.Series("-", index=table.index)).astype(str)):
            err = np.nan_to_num(np.abs([[est[k] - low[k]], [high[k] - est[k]]]))
            ax.errorbar(est[k], y[k], xerr=err, fmt="o", color=colours[pref], capsize=4, markersize=7)
        ax.axvline(0.0, color="grey", linestyle="--", linewidth=1)
        ax.set_xlabel(METRIC_LABELS[metric])
    axes[0].set_yticks(y, labels)
    handles = [line_handle(colours[p], p) for p in prefs]
    fig.legend(handles=handles, loc="outside lower center", ncols=min(len(prefs), 6), title="preference")
    fig.suptitle(title)
    return fig


# ---------------------------------------------------------------------------- power

# The paper's average gains (its Table 2): the effects a reproduction should be able to see.
PAPER_EFFECTS = {"delta_p_wrong": 0.074, "delta_accuracy": 0.045, "neg_delta_ece": 0.044}
POWER_TARGETS = {"delta_p_wrong": 0.05, "delta_accuracy": 0.045, "neg_delta_ece": 0.044}


def power_frame(improvements: pd.DataFrame) -> pd.DataFrame:
    """Per task and metric: the run's questions, the standard error of an improvement (from the
    width of its 95% question-level interval, median over the in-domain rows), the minimum effect
    detectable at 80% power and the 5% level, and the questions needed to detect the target
    (Δp_wrong 0.05; the paper's average ΔAcc 4.5 points and -ΔECE 0.044)."""
    rows = []
    imp = improvements[in_domain(improvements)]
    for task, part in imp.groupby("task", sort=True):
        n = int(part["n_questions"].median())
        for metric, target in POWER_TARGETS.items():
            widths = (part[f"{metric}_high"] - part[f"{metric}_low"]).astype(float).dropna()
            if widths.empty:
                continue
            se = float(widths.median()) / (2 * 1.959964)
            rows.append({"task": task, "metric": metric, "questions": n, "standard_error": se,
                         "minimum_detectable_effect": stats.minimum_detectable_effect(se), "target": target,
                         "paper_average": PAPER_EFFECTS[metric],
                         "questions_for_target": stats.questions_needed(se, n, target)})
    return pd.DataFrame(rows, columns=["task", "metric", "questions", "standard_error", "minimum_detectable_effect",
                                       "target", "paper_average", "questions_for_target"])


def power_analysis(run: RunLike, out_dir: Path) -> Artifact:
    """How large an effect this run could detect, and how many questions the target needs."""
    run, name = as_run(run), "power_analysis"
    imp = read_table(run, "eval/improvements.csv")
    if imp is None:
        return skip_item(name, missing_inputs(run, "eval/improvements.csv"))
    frame = power_frame(imp)
    if frame.empty:
        return skip_item(name, "no in-domain improvement row with an interval")
    caption = ("**Power.** Minimum detectable effect (80% power, two-sided 5% level) from the width of this run's "
               "question-level intervals, and the test questions a target effect needs (SE ~ 1/sqrt(questions)).")
    return Artifact(name, save_table(frame, out_dir, name, caption=caption), frame)


# ---------------------------------------------------------------------------- Table 5

def _mean_proxy(records: Sequence[dict]) -> dict[str, float]:
    """Per question, the mean proxy over its samples (unparsed/error = 0, as in mean_proxy)."""
    sums: dict[str, list[float]] = {}
    for r in records:
        proxy = r.get("proxy") if r.get("status") == "ok" else None
        sums.setdefault(str(r["question_id"]), []).append(0.0 if proxy is None else float(proxy))
    return {q: float(np.mean(v)) for q, v in sums.items()}


def _proxy(record: dict) -> float:
    return float(record["proxy"]) if record.get("status") == "ok" and record.get("proxy") is not None else 0.0


def truncate(text: Any, max_chars: int = TEXT_CHARS) -> str:
    """One line (whitespace collapsed); longer texts keep their head and tail around " … "."""
    text = " ".join(str(text or "").split())
    if len(text) <= max_chars:
        return text
    half = (max_chars - 3) // 2
    return f"{text[:half]} … {text[-half:]}"


def _question_text(prompt: Any) -> str:
    text = str(prompt or "")
    try:
        prefix = paths.prompt_text("cot")
    except FileNotFoundError:
        return text
    return text.removeprefix(prefix)


def pick_example(original: Sequence[dict], aligned: Sequence[dict]) -> dict[str, Any] | None:
    """Table 5's rule on one task's D_test records: the question whose mean proxy over samples
    rose most from the original to the aligned model (ties: the smallest question id); from it
    the original's answer with the LOWEST proxy and the aligned model's with the HIGHEST (ties:
    the smallest sample index). None when no shared question improved."""
    before, after = _mean_proxy(original), _mean_proxy(aligned)
    rises = sorted(((after[q] - before[q], q) for q in before if q in after), key=lambda t: (-t[0], t[1]))
    if not rises or rises[0][0] <= 0:
        return None
    rise, qid = rises[0]
    orig = min((r for r in original if str(r["question_id"]) == qid), key=lambda r: (_proxy(r), r["sample_idx"]))
    new = min((r for r in aligned if str(r["question_id"]) == qid), key=lambda r: (-_proxy(r), r["sample_idx"]))
    return {"question_id": qid, "question": truncate(_question_text(orig.get("prompt"))),
            "original_mean_proxy": before[qid], "aligned_mean_proxy": after[qid], "rise": rise,
            "original_answer": truncate(orig.get("response")), "original_proxy": _proxy(orig),
            "original_correct": bool(orig.get("correct")),
            "aligned_answer": truncate(new.get("response")), "aligned_proxy": _proxy(new),
            "aligned_correct": bool(new.get("correct"))}


def headline_order(rows: pd.DataFrame) -> pd.DataFrame:
    """The aligned models of one task in the order Table 5 tries them: among in-domain rows, the WoW
    preferences (Table 2) first, then right-over-wrong mixes, then the rest; within those the
    largest Δp_wrong first (ties: the first label)."""
    tier = rows["preference"].map(lambda p: 0 if p in WOW_PREFERENCES else 1 if p in ROW_PREFERENCES else 2)
    gain = rows["delta_p_wrong"].astype(float).fillna(-math.inf)
    return rows.assign(_tier=tier, _gain=-gain).sort_values(["_tier", "_gain", "label"], kind="mergesort")


def _test_records(run: store.Run, model: str, task: str) -> list[dict]:
    return [r for r in store.read_jsonl(run.eval(model, task)) if r.get("split") == "test"]


def table5_frame(run: store.Run, improvements: pd.DataFrame, eval_models: pd.DataFrame | None,
                 ) -> tuple[pd.DataFrame, list[str]]:
    """One example per task (see ``headline_order`` and ``pick_example``) and notes on tasks
    without one."""
    examples, notes = [], []
    for task, rows in aligned_by_task(improvements).items():
        tried = []
        for rank, (_, row) in enumerate(headline_order(rows).iterrows()):
            original = original_of(row["label"], eval_models)
            if original is None:
                continue
            example = pick_example(_test_records(run, original, task), _test_records(run, row["label"], task))
            if example is None:
                tried.append(row["label"])
                continue
            if tried:
                notes.append(f"{task}: no D_test question where {', '.join(tried)} has a higher mean proxy; "
                             f"shown: {row['label']} (rank {rank + 1} of {len(rows)})")
            examples.append({"task": task, "model": row["label"], "rank": rank + 1,
                             "preference": row.get("preference"), "trainer": row.get("trainer"),
                             "original": original, **example})
            break
        else:
            notes.append(f"{task}: no aligned model has a D_test question with a higher mean proxy"
                         if tried else f"{task}: no original model in eval/models.csv")
    return pd.DataFrame(examples), notes


def table5(run: RunLike, out_dir: Path) -> Artifact:
    """Table 5: per task, the D_test question the headline aligned model improved most on (by
    mean proxy over samples), with the original's worst and the aligned model's best answer."""
    run, name = as_run(run), "table5_examples"
    imp, eval_models = read_table(run, "eval/improvements.csv"), read_table(run, "eval/models.csv")
    if imp is None or eval_models is None:
        return skip_item(name, missing_inputs(run, *[f for f, t in (("eval/improvements.csv", imp),
                                                          ("eval/models.csv", eval_models)) if t is None]))
    table, notes = table5_frame(run, imp, eval_models)
    for note in notes:
        log.info("table 5: %s", note)
    if table.empty:
        return skip_item(name, "; ".join(notes) or "no example")
    md = pd.DataFrame({
        "task": table["task"], "model": table["model"], "question": table["question_id"] + ": " + table["question"],
        "original (lowest proxy)": [f"{a} (proxy {p:.2f})" for a, p in zip(table["original_answer"], table["original_proxy"])],
        "aligned (highest proxy)": [f"{a} (proxy {p:.2f})" for a, p in zip(table["aligned_answer"], table["aligned_proxy"])],
        "mean proxy before → after": [f"{b:.2f} → {a:.2f}" for b, a in
                                      zip(table["original_mean_proxy"], table["aligned_mean_proxy"])]})
    caption = ("**Table 5.** Qualitative examples, chosen by a rule: per task, the aligned model with the best "
               "Δp_wrong among WoW preferences (then right-over-wrong mixes, then the rest; the next one when a "
               "model improved on no question), and the D_test question on which its mean proxy over samples "
               "rose most over the original model's; shown are the original's lowest-proxy answer and the aligned "
               f"model's highest-proxy answer (texts truncated to {TEXT_CHARS} characters).")
    return Artifact(name, save_table(table, out_dir, name, md, caption), table, note="; ".join(notes))


