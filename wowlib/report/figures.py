"""The paper's figures from a run directory: accuracy by shade of wrong, Figure 2 (elicitation
accuracy vs alignment gain), reliability diagrams, reward-margin curves."""
from __future__ import annotations

import logging
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from .. import stats, store
from .common import (
    N_RESAMPLES, RANDOM, SEED, aligned_by_task, Artifact, as_run, in_domain, is_blank, line_handle,
    method_label, missing_inputs, new_figure, original_of, palette_of, preference_colours,
    preference_sorted, read_table, row_label, RunLike, save_figure, save_table, skip_item,
)

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------- shades of wrong

def _level(label: str) -> float:
    """The sort key of a shade-bin label: "0.333" or "[0.2,0.4)" -> its first number."""
    found = re.search(r"-?\d+(\.\d+)?(e-?\d+)?", str(label))
    return float(found.group()) if found else math.inf


def _short_level(label: str) -> str:
    """A compact tick label: an interval bin "[0.2,0.4)" becomes its midpoint "0.3"."""
    numbers = re.findall(r"-?\d+(?:\.\d+)?", str(label))
    if str(label).startswith("[") and len(numbers) == 2:
        return f"{(float(numbers[0]) + float(numbers[1])) / 2:.2g}"
    return str(label)


def shade_bins(run: RunLike, out_dir: Path) -> Artifact:
    """Accuracy by (proxy of the less wrong, proxy of the more wrong answer), one panel per
    task/generator, one colour per method, with 95% CIs: are distant shades easier to order?"""
    run, name = as_run(run), "shade_bins"
    table = read_table(run, "elicitation/shade_bins.csv")
    if table is None:
        return skip_item(name, missing_inputs(run, "elicitation/shade_bins.csv"))
    table = table.assign(panel=table["task"] + " / " + table["generator"],
                         series=[method_label(m, j) for m, j in zip(table["method"], table["judge"])])
    panels = sorted(table["panel"].unique())
    n_cats = max(len(g.groupby(["less_wrong", "more_wrong"])) for _, g in table.groupby("panel"))
    n_cols = 1 if n_cats > 6 else min(2, len(panels))
    n_rows = math.ceil(len(panels) / n_cols)
    fig = new_figure(max(7.0, 0.8 * n_cats + 2.0) * n_cols + 3.0, 4.8 * n_rows)
    axes = np.atleast_1d(fig.subplots(n_rows, n_cols, squeeze=False)).ravel()
    series = sorted(table["series"].unique())
    colours = dict(zip(series, palette_of(len(series))))
    for ax, panel in zip(axes, panels):
        _shade_panel(ax, table[table["panel"] == panel], series, colours)
        ax.set_title(panel)
    for ax in axes[len(panels):]:
        ax.set_visible(False)
    handles = [line_handle(colours[s], s) for s in series]
    fig.legend(handles=handles, loc="outside right upper", title="method [judge]")
    fig.suptitle("Accuracy by shade of wrong (all pairs, 95% CI)")
    return Artifact(name, save_figure(fig, out_dir, name), table.drop(columns=["panel", "series"]))


def _shade_panel(ax, table: pd.DataFrame, series: Sequence[str], colours: dict) -> None:
    pairs = sorted({(lw, mw) for lw, mw in zip(table["less_wrong"], table["more_wrong"])},
                   key=lambda p: (_level(p[1]), _level(p[0])))
    x_of = {p: k for k, p in enumerate(pairs)}
    width = 0.7 / max(len(series), 1)
    for k in range(0, len(pairs), 2):
        ax.axvspan(k - 0.5, k + 0.5, color="0.94", zorder=0, linewidth=0)
    for k, s in enumerate(series):
        rows = table[table["series"] == s]
        if rows.empty:
            continue
        x = np.array([x_of[(lw, mw)] for lw, mw in zip(rows["less_wrong"], rows["more_wrong"])]) \
            - 0.35 + width * (k + 0.5)
        acc = rows["accuracy"].to_numpy(float)
        err = np.abs(np.vstack([acc - rows["ci_low"].to_numpy(float), rows["ci_high"].to_numpy(float) - acc]))
        ax.errorbar(x, acc, yerr=np.nan_to_num(err), fmt="o", color=colours[s], capsize=2, markersize=6)
    ax.axhline(RANDOM, color="grey", linestyle="--", linewidth=1)
    ax.grid(axis="x", visible=False)
    ax.set_xlim(-0.5, len(pairs) - 0.5)
    ax.set_xticks(range(len(pairs)), [f"{_short_level(lw)}\nvs {_short_level(mw)}" for lw, mw in pairs])
    ax.set_ylim(-0.05, 1.05)
    ax.set_xlabel("proxy (bin midpoint): less wrong vs more wrong")
    ax.set_ylabel("accuracy")


# ---------------------------------------------------------------------------- Figure 2

ELICITATION_COLUMNS = ("elicitation_method", "elicitation_judge", "elicitation_margin")


def _with_elicitation(improvements: pd.DataFrame, models: pd.DataFrame | None) -> pd.DataFrame:
    """Fill the elicitation_* columns of improvement rows from models/summary.csv (by model name)
    where the improvements file lacks them."""
    imp = improvements.copy()
    for col in ELICITATION_COLUMNS:
        if col not in imp.columns:
            imp[col] = np.nan
    if models is None or not set(ELICITATION_COLUMNS) <= set(models.columns):
        return imp
    by_model = models.drop_duplicates("model").set_index("model")
    for col in ELICITATION_COLUMNS:
        fallback = imp["label"].map(by_model[col])
        imp[col] = imp[col].where(~imp[col].map(is_blank), fallback)
    return imp


def _generators_of(row: pd.Series, eval_models: pd.DataFrame | None, known: Sequence[str]) -> list[str]:
    """Whose answers a preference set was built from: all generators for source "mix", else the
    aligned model's base model (eval/models.csv), else the only generator there is."""
    if str(row.get("source")) == "mix":
        return list(known)
    if eval_models is not None and "base_model" in eval_models.columns:
        base = eval_models.loc[eval_models["model"] == row["label"], "base_model"]
        if len(base) and str(base.iloc[0]) in known:
            return [str(base.iloc[0])]
    return list(known) if len(known) == 1 else []


def elicitation_accuracy(rows: pd.DataFrame, task: str, generators: Sequence[str], method: str, judge: str,
                         margin: float) -> tuple[float, int, float, float] | None:
    """The accuracy (pair-weighted over ``generators``), pairs and 95% interval of one elicitation
    row of ``elicitation/rows.csv``; None if there is no such row. The interval is the row's own
    (questions resampled) for one generator; pooled over several it is not in the table: NaN."""
    hit = rows[(rows["task"] == task) & rows["generator"].isin(list(generators)) & (rows["method"] == method)
               & (rows["judge"].astype(str) == str(judge)) & np.isclose(rows["margin"].astype(float), margin)]
    hit = hit[hit["n_pairs"] > 0]
    if hit.empty:
        return None
    n = hit["n_pairs"].to_numpy(float)
    low, high = (float(hit["ci_low"].iloc[0]), float(hit["ci_high"].iloc[0])) if len(hit) == 1 else (math.nan, math.nan)
    return float((hit["accuracy"].to_numpy(float) * n).sum() / n.sum()), int(n.sum()), low, high


def _pick_trainer(imp: pd.DataFrame, trainer: str | None) -> str | None:
    if trainer is not None or imp.empty or "trainer" not in imp.columns:
        return trainer
    counts = imp["trainer"].astype(str).value_counts()
    return "dpo" if "dpo" in counts.index else min(counts.index, key=lambda t: (-counts[t], t))


def figure2_points(rows: pd.DataFrame, improvements: pd.DataFrame, eval_models: pd.DataFrame | None = None,
                   models: pd.DataFrame | None = None, trainer: str | None = None) -> pd.DataFrame:
    """One point per preference set with elicited labels: the accuracy of its label source on
    WoW pairs (the ``elicitation/rows.csv`` row with method = elicitation_method, judge =
    elicitation_judge, margin = elicitation_margin, on the evaluated task and the set's
    generators) against its alignment gain Δp_wrong (in-domain, one trainer: ``trainer``, else
    "dpo", else the most frequent). Sets without elicited labels (oracle, row, controls) and
    sets without a matching elicitation row are left out (logged)."""
    imp = _with_elicitation(improvements, models)
    imp = imp[in_domain(imp) & ~imp["elicitation_method"].map(is_blank)]
    chosen = _pick_trainer(imp, trainer)
    if chosen is not None and "trainer" in imp.columns:
        imp = imp[imp["trainer"].astype(str) == chosen]
    points = []
    for _, r in imp.iterrows():
        known = sorted(rows.loc[rows["task"] == r["task"], "generator"].astype(str).unique())
        gens = _generators_of(r, eval_models, known)
        found = elicitation_accuracy(rows, r["task"], gens, r["elicitation_method"], r["elicitation_judge"],
                                     float(r["elicitation_margin"])) if gens else None
        if found is None:
            log.info("figure 2: no elicitation row for %s (%s, %s, %s on %s/%s): left out", r["label"],
                     r["elicitation_method"], r["elicitation_judge"], r["elicitation_margin"], r["task"], gens)
            continue
        points.append({"task": r["task"], "label": r["label"], "preference": r.get("preference"),
                       "trainer": r.get("trainer"), "source": r.get("source"),
                       **{c: r[c] for c in ELICITATION_COLUMNS}, "generators": "+".join(gens),
                       "elicitation_accuracy": found[0], "elicitation_pairs": found[1],
                       "elicitation_low": found[2], "elicitation_high": found[3],
                       **{k: r.get(k, np.nan) for k in ("delta_p_wrong", "delta_p_wrong_low", "delta_p_wrong_high")}})
    columns = ["task", "label", "preference", "trainer", "source", *ELICITATION_COLUMNS, "generators",
               "elicitation_accuracy", "elicitation_pairs", "elicitation_low", "elicitation_high", "delta_p_wrong",
               "delta_p_wrong_low", "delta_p_wrong_high"]
    out = pd.DataFrame(points, columns=columns)
    return out.sort_values(["task", "label"], kind="mergesort").reset_index(drop=True)


@dataclass(frozen=True)
class Correlation:
    n: int
    r: float
    ci_low: float
    ci_high: float

    def describe(self) -> str:
        if self.n < 3:
            return f"too few points (n = {self.n}) for a correlation"
        if not math.isfinite(self.r):
            return f"no correlation defined (n = {self.n}: one axis does not vary)"
        ci = f" [{self.ci_low:.2f}, {self.ci_high:.2f}]" if math.isfinite(self.ci_low) else ""
        return f"Pearson r = {self.r:.2f}{ci} (95% bootstrap CI), n = {self.n}"


def pearson(x: Sequence[float], y: Sequence[float], n_resamples: int = N_RESAMPLES, seed: int = SEED,
            level: float = 0.95) -> Correlation:
    """Pearson's r with a percentile bootstrap interval over points (``wowlib.stats``: the points,
    preference sets, are the unit resampled). Fewer than 3 points, or an axis that does not vary:
    NaN; a resample with a constant axis leaves the interval undefined (NaN)."""
    x, y = np.asarray(x, float), np.asarray(y, float)
    if len(x) < 3 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return Correlation(len(x), math.nan, math.nan, math.nan)
    r = stats.pearson_interval(x, y, n_resamples=n_resamples, seed=seed, confidence=level)
    return Correlation(len(x), r.estimate, r.low, r.high)


def figure2(run: RunLike, out_dir: Path, trainer: str | None = None) -> Artifact:
    """Figure 2: does better elicitation give better alignment? Elicitation accuracy of each
    preference set's labels vs its Δp_wrong, with Pearson r and its 95% bootstrap CI."""
    run, name = as_run(run), "figure2_elicitation_vs_gain"
    rows, imp = read_table(run, "elicitation/rows.csv"), read_table(run, "eval/improvements.csv")
    if rows is None or imp is None:
        return skip_item(name, missing_inputs(run, *[f for f, t in (("elicitation/rows.csv", rows),
                                                          ("eval/improvements.csv", imp)) if t is None]))
    points = figure2_points(rows, imp, read_table(run, "eval/models.csv"), read_table(run, "models/summary.csv"),
                            trainer)
    if points.empty:
        return skip_item(name, "no in-domain preference set with elicited labels (direct/score types) matches a row "
                           "of elicitation/rows.csv")
    finite = points[np.isfinite(points["elicitation_accuracy"].astype(float))
                    & np.isfinite(points["delta_p_wrong"].astype(float))]
    corr = pearson(finite["elicitation_accuracy"], finite["delta_p_wrong"])
    log.info("figure 2: %s", corr.describe())
    fig = _scatter(finite, corr)
    caption = (f"**Figure 2.** Elicitation accuracy of each preference set's labels vs its alignment gain "
               f"Δp_wrong (D_test, in-domain). {corr.describe()}.")
    written = save_figure(fig, out_dir, name) + save_table(points, out_dir, name, caption=caption)
    return Artifact(name, written, points, note=corr.describe())


def _scatter(points: pd.DataFrame, corr: Correlation):
    fig = new_figure(10.0, 7.0)
    ax = fig.subplots()
    prefs = preference_sorted(points["preference"])
    colours = preference_colours(prefs)
    markers = dict(zip(sorted(points["task"].astype(str).unique()), "osD^vP*X"))
    for _, p in points.iterrows():
        est, acc = float(p["delta_p_wrong"]), float(p["elicitation_accuracy"])
        yerr = np.nan_to_num(np.abs([[est - float(p["delta_p_wrong_low"])], [float(p["delta_p_wrong_high"]) - est]]))
        xerr = np.nan_to_num(np.abs([[acc - float(p["elicitation_low"])], [float(p["elicitation_high"]) - acc]]))
        ax.errorbar(acc, est, xerr=xerr, yerr=yerr, fmt=markers[str(p["task"])],
                    color=colours[str(p["preference"])], capsize=4, markersize=10)
    if corr.n >= 3 and math.isfinite(corr.r):
        slope, intercept = np.polyfit(points["elicitation_accuracy"].astype(float),
                                      points["delta_p_wrong"].astype(float), 1)
        xs = np.linspace(points["elicitation_accuracy"].min(), points["elicitation_accuracy"].max(), 2)
        ax.plot(xs, slope * xs + intercept, color="black", linewidth=1.5, alpha=0.6)
    ax.axvline(RANDOM, color="grey", linestyle=":", linewidth=1)
    ax.axhline(0.0, color="grey", linestyle="--", linewidth=1)
    ax.set_xlabel("elicitation accuracy of the labels (0.5 = random)")
    ax.set_ylabel("Δp_wrong after alignment (> 0: less wrong)")
    ax.set_title("Does better elicitation give better alignment?")
    ax.text(0.02, 0.98, corr.describe(), transform=ax.transAxes, va="top", fontsize=13)
    from matplotlib.lines import Line2D
    handles = [line_handle(colours[p], p) for p in prefs]
    handles += [Line2D([], [], color="grey", marker=m, linestyle="", label=t) for t, m in markers.items()]
    if handles:
        ax.legend(handles=handles, loc="lower right", fontsize=12)
    return fig


# ---------------------------------------------------------------------------- reliability

def reliability_data(run: store.Run, model: str, task: str) -> pd.DataFrame | None:
    """Reliability bins of ``model`` on ``task`` (D_test): eval/reliability.csv, else computed
    from eval/<model>/<task>.jsonl."""
    table = read_table(run, "eval/reliability.csv")
    if table is not None:
        hit = table[(table["model"] == model) & (table["task"] == task) & (table["split"] == "test")]
        if not hit.empty:
            return hit.sort_values("bin").reset_index(drop=True)
    records = [r for r in store.read_jsonl(run.eval(model, task)) if r.get("split") == "test"]
    if not records:
        return None
    from ..evaluate import reliability_table
    return reliability_table(records)


def ece_of(bins: pd.DataFrame) -> float:
    """The ECE of reliability bins: sum over bins of count/n * |accuracy - mean confidence|."""
    full = bins[bins["count"] > 0]
    n = full["count"].sum()
    if n == 0:
        return math.nan
    return float((full["count"] * (full["accuracy"] - full["mean_confidence"]).abs()).sum() / n)


def reliability(run: RunLike, out_dir: Path) -> Artifact:
    """Reliability diagrams before/after: per task, one panel per selected aligned model (from
    eval/improvements.csv), its accuracy per confidence bin beside the original model's."""
    run, name = as_run(run), "reliability"
    imp, eval_models = read_table(run, "eval/improvements.csv"), read_table(run, "eval/models.csv")
    if imp is None or eval_models is None:
        return skip_item(name, missing_inputs(run, *[f for f, t in (("eval/improvements.csv", imp),
                                                          ("eval/models.csv", eval_models)) if t is None]))
    written, summary, notes = [], [], []
    for task, rows in aligned_by_task(imp).items():
        panels = []
        for _, r in rows.iterrows():
            original = original_of(r["label"], eval_models)
            before = reliability_data(run, original, task) if original else None
            after = reliability_data(run, r["label"], task)
            if before is None or after is None:
                notes.append(f"{task}/{r['label']}: no reliability data")
                continue
            panels.append((row_label(r, with_task=False), original, before, after))
            summary.append({"task": task, "model": r["label"], "original": original,
                            "ece_original": ece_of(before), "ece_aligned": ece_of(after)})
        if panels:
            written += save_figure(_reliability_figure(task, panels), out_dir, f"reliability_{task}")
    for note in notes:
        log.info("reliability: %s", note)
    if not written:
        return skip_item(name, "; ".join(notes) or "no in-domain aligned model in eval/improvements.csv")
    return Artifact(name, written, pd.DataFrame(summary), note="; ".join(notes))


def _reliability_figure(task: str, panels: list[tuple[str, str, pd.DataFrame, pd.DataFrame]]):
    """One panel per aligned model: accuracy per confidence bin, original (grey) beside aligned
    (colour), the diagonal = perfect calibration; both ECEs in the panel title."""
    from matplotlib.patches import Patch
    n_cols = min(3, len(panels))
    n_rows = math.ceil(len(panels) / n_cols)
    fig = new_figure(5.0 * n_cols, 4.8 * n_rows + 0.8)
    axes = np.atleast_1d(fig.subplots(n_rows, n_cols, squeeze=False)).ravel()
    colours = ["#8c8c8c", palette_of(1)[0]]                   # original grey, aligned in colour
    for k, (ax, (label, _, before, after)) in enumerate(zip(axes, panels)):
        for side, bins in enumerate((before, after)):
            full = bins[bins["count"] > 0]
            width = (full["upper"] - full["lower"]).to_numpy(float) / 2.2
            centre = ((full["lower"] + full["upper"]) / 2).to_numpy(float)
            ax.bar(centre + (side - 0.5) * width, full["accuracy"].to_numpy(float), width=width,
                   color=colours[side], alpha=0.9)
        ax.plot([0, 1], [0, 1], color="black", linestyle="--", linewidth=1)
        ax.set(xlim=(0, 1), ylim=(0, 1), xlabel="confidence", ylabel="accuracy" if k % n_cols == 0 else "")
        ax.set_xticks([0.25, 0.5, 0.75])           # no 0/1 labels to collide between panels
        ax.set_title(f"{label}\nECE {ece_of(before):.3f} → {ece_of(after):.3f}", fontsize=13)
        if k % n_cols:
            ax.tick_params(labelleft=False)
    for ax in axes[len(panels):]:
        ax.set_visible(False)
    originals = ", ".join(sorted({p[1] for p in panels}))
    fig.legend(handles=[Patch(color=colours[0], label=f"original ({originals})"),
                        Patch(color=colours[1], label="aligned")], loc="outside lower center", ncols=2)
    fig.suptitle(f"Reliability before and after alignment: {task} (D_test)")
    return fig


# ---------------------------------------------------------------------------- reward margins

def train_curves(run: store.Run) -> pd.DataFrame:
    """Every logged training step with a reward margin, from models/*/train_log.json: model,
    preference, trainer, step, metric ("rewards/margins" | "rewards/accuracies"), value."""
    summary = read_table(run, "models/summary.csv")
    meta = summary.drop_duplicates("model").set_index("model") if summary is not None else None
    rows = []
    for path in sorted((run.root / "models").glob("*/train_log.json")):
        model = path.parent.name
        if model.startswith("."):
            continue
        try:
            train_log = store.read_json(path)
        except (OSError, ValueError) as err:
            log.warning("reward margins: %s unreadable (%s): left out", path, err)
            continue
        trainer = (train_log.get("config") or {}).get("trainer")
        preference = None
        if meta is not None and model in meta.index:
            trainer = meta.loc[model].get("trainer", trainer)
            preference = meta.loc[model].get("preference")
        for k, entry in enumerate(train_log.get("history") or []):
            for metric in ("rewards/margins", "rewards/accuracies"):
                if isinstance(entry.get(metric), (int, float)):
                    rows.append({"model": model, "preference": str(preference if not is_blank(preference) else "-"),
                                 "trainer": str(trainer), "step": entry.get("step", k), "metric": metric,
                                 "value": float(entry[metric])})
    return pd.DataFrame(rows, columns=["model", "preference", "trainer", "step", "metric", "value"])


def reward_margins(run: RunLike, out_dir: Path) -> Artifact:
    """DPO-family training curves: reward margin (chosen minus rejected implicit reward) and
    reward accuracy per logged step, one line per adapter, colour = preference type."""
    run, name = as_run(run), "reward_margins"
    curves = train_curves(run)
    if curves.empty:
        return skip_item(name, "no `models/*/train_log.json` with `rewards/margins` in the run directory")
    metrics = [m for m in ("rewards/margins", "rewards/accuracies") if (curves["metric"] == m).any()]
    fig = new_figure(7.5 * len(metrics) + 2.0, 5.5)
    axes = np.atleast_1d(fig.subplots(1, len(metrics), squeeze=False)).ravel()
    hue_order = preference_sorted(curves["preference"])
    colours = preference_colours(hue_order)
    dashes = dict(zip(sorted(curves["trainer"].unique()), ["-", "--", ":", "-.", (0, (5, 1)), (0, (1, 3))] * 3))
    for ax, metric in zip(axes, metrics):
        for model, part in curves[curves["metric"] == metric].groupby("model", sort=True):
            part = part.sort_values("step")
            colour = colours[str(part["preference"].iloc[0])]
            ax.plot(part["step"], part["value"], "o", color=colour, alpha=0.18, markersize=3)      # raw, faint
            ax.plot(part["step"], smoothed(part["value"].to_numpy(float)), color=colour, linewidth=2,
                    linestyle=dashes[str(part["trainer"].iloc[0])])
        ax.set_ylabel(metric.split("/")[1].replace("margins", "reward margin").replace("accuracies", "reward accuracy"))
        ax.set_xlabel("training step")
    if "rewards/margins" in metrics:
        axes[0].axhline(0.0, color="grey", linestyle="--", linewidth=1)
    handles = [line_handle(colours[p], p) for p in hue_order]
    if len(dashes) > 1:
        from matplotlib.lines import Line2D
        handles += [Line2D([], [], color="grey", linestyle=d, label=t) for t, d in dashes.items()]
    axes[len(metrics) - 1].legend(handles=handles, loc="center left", bbox_to_anchor=(1.02, 0.5))
    fig.suptitle("Reward margins during preference optimisation (lines: running mean; dots: each logged step)")
    return Artifact(name, save_figure(fig, out_dir, name), curves)


def smoothed(values: np.ndarray, share: float = 0.15) -> np.ndarray:
    """A centred running mean over ``share`` of the curve's points (at least 1, odd): the trend,
    with the step-to-step noise of batch-1 training averaged out."""
    window = max(1, int(len(values) * share) // 2 * 2 + 1)
    return pd.Series(values).rolling(window, center=True, min_periods=1).mean().to_numpy()


