"""Every table and figure of the paper, in our setting, from a run directory alone (no model).

Reads the files of the run directory (docs/design.md: ``elicitation/``, ``prefs/``, ``models/``, ``eval/``) and
writes into an output folder (default: the repository's ``figures/``) PNG + PDF for figures and
CSV + Markdown for tables, under fixed names:

============================  ===============================================================
``table1_elicitation``        Table 1 as a heatmap (methods x task/generator + overall) + CSV/MD
``shade_bins``                elicitation accuracy by the proxy levels of the two wrong answers
``dataset_stats``             per (task, generator): questions, samples, accuracy, WoW pairs...
``prefs_summary``             the preference sets: candidates, degenerate, kept pairs
``training_summary``          one row per trained adapter (time, loss, final reward margin)
``table2_main``               Table 2 (WoW preferences, in-domain) with 95% CIs + a forest plot
``table3_row_mixes``          Table 3 (right-over-wrong and its mixes)
``table4_generalisation``     Table 4 (trained on one task, evaluated on another)
``controls``                  random-direction preferences, SFT on wrong answers
``figure2_elicitation_vs_gain``  Figure 2: elicitation accuracy vs Δp_wrong, Pearson r + CI
``reliability_<task>``        reliability diagrams, original vs each selected aligned model
``reward_margins``            DPO-family reward margins (and accuracies) over training steps
``table5_examples``           Table 5: qualitative examples chosen by a rule
``index.md``                  what was written and what was skipped, and why
============================  ===============================================================

A partial run (no ``eval/`` or ``models/`` yet) gives what its files allow: every other item is
skipped with a logged note (and a line in ``index.md``), never invented. Each item is one
function ``item(run, out_dir) -> Artifact`` that a notebook can call on its own; ``write_report``
calls them all. Figures are built on ``matplotlib.figure.Figure`` (no pyplot state), in one style
(``set_style``), and saved deterministically (no PDF creation date).
"""
from __future__ import annotations

import json
import logging
import math
import re
import sys
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from . import paths, stats, store
from .evaluate import CONTROL_PREFERENCES, ROW_PREFERENCES, WOW_PREFERENCES, to_markdown

log = logging.getLogger(__name__)

DPI = 150
RANDOM = 0.5                     # elicitation accuracy of a coin flip
TEXT_CHARS = 320                 # Table 5: characters kept of each response
N_RESAMPLES = 2000               # bootstrap resamples for the CI of Pearson's r
SEED = 0
METRIC_LABELS = {"delta_p_wrong": "Δp_wrong", "delta_accuracy": "ΔAcc (points)", "neg_delta_ece": "−ΔECE"}
PERCENT_METRICS = ("delta_accuracy",)    # reported in percentage points, as in the paper

RunLike = store.Run | str | Path


# ---------------------------------------------------------------------------- style and output

def set_style() -> None:
    """The one style of every figure: seaborn whitegrid, colour-blind palette, fonts legible on a
    slide. The font is matplotlib's own DejaVu Sans, so that a machine with other fonts installed
    (seaborn would prefer Arial) renders the same files."""
    import seaborn as sns
    sns.set_theme(context="notebook", style="whitegrid", palette="colorblind", font="DejaVu Sans", font_scale=1.3,
                  rc={"figure.dpi": 100, "savefig.dpi": DPI,
                      "axes.titleweight": "bold", "legend.frameon": False})


def new_figure(width: float, height: float):
    """A figure in the house style, outside pyplot (nothing is shown or kept alive by accident)."""
    from matplotlib.figure import Figure
    set_style()
    return Figure(figsize=(width, height), layout="constrained")


def save_figure(fig, out_dir: Path, name: str) -> list[Path]:
    """``<name>.png`` and ``<name>.pdf``; the PDF without a creation date, so reruns are identical."""
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for ext, metadata in (("png", {}), ("pdf", {"CreationDate": None})):
        path = out_dir / f"{name}.{ext}"
        fig.savefig(path, format=ext, dpi=DPI, metadata=metadata)
        written.append(path)
        fig.set_layout_engine("none")      # the layout is done: the PDF reuses it (half the time)
    return written


def save_table(table: pd.DataFrame, out_dir: Path, name: str, markdown: pd.DataFrame | None = None,
               caption: str = "") -> list[Path]:
    """``<name>.csv`` (full precision, 6 significant digits) and ``<name>.md`` (``markdown`` if
    given, else the table itself, with ``caption`` above it)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    csv_path, md_path = out_dir / f"{name}.csv", out_dir / f"{name}.md"
    csv_path.write_text(table.to_csv(index=False, float_format="%.6g", lineterminator="\n"), encoding="utf-8")
    body = to_markdown(_rounded(markdown if markdown is not None else table))
    md_path.write_text((f"{caption}\n\n" if caption else "") + body, encoding="utf-8")
    return [csv_path, md_path]


def _rounded(table: pd.DataFrame, digits: int = 3) -> pd.DataFrame:
    """Floats with ``digits`` decimals for Markdown; margins (a share of pairs) as written ("0.5")."""
    out = table.copy()
    for col in out.columns:
        if pd.api.types.is_float_dtype(out[col]):
            spec = "g" if "margin" in str(col) and "final" not in str(col) else f".{digits}f"
            out[col] = [("" if pd.isna(v) else format(v, spec)) for v in out[col]]
    return out


@dataclass
class Artifact:
    """What one report item produced: the files written, the table behind it, and a note (why it
    was skipped, or a remark such as Figure 2's correlation). In a notebook it displays itself."""

    name: str
    paths: list[Path] = field(default_factory=list)
    table: pd.DataFrame | None = None
    note: str = ""

    @property
    def skipped(self) -> bool:
        return not self.paths

    @property
    def images(self) -> list[Path]:
        return [p for p in self.paths if p.suffix == ".png"]

    def _ipython_display_(self) -> None:
        from IPython.display import Image, Markdown, display
        if self.note:
            display(Markdown(f"**{self.name}**: {self.note}"))
        for png in self.images:
            display(Image(filename=str(png)))
        if self.table is not None and not self.table.empty:
            display(self.table)


def _skip(name: str, reason: str) -> Artifact:
    log.info("report: %s skipped: %s", name, reason)
    return Artifact(name, note=f"skipped: {reason}")


# ---------------------------------------------------------------------------- reading the run

def as_run(run: RunLike) -> store.Run:
    """A ``store.Run`` from a Run, a run name (``runs/<name>``) or a path."""
    if isinstance(run, store.Run):
        return run
    return store.Run(Path(run)) if Path(run).is_absolute() else store.Run.named(str(run))


def read_table(run: store.Run, relative: str) -> pd.DataFrame | None:
    """A CSV of the run (``relative`` to its root); None if it is missing or empty."""
    path = run.root / relative
    if not path.exists() or path.stat().st_size == 0:
        return None
    try:
        table = pd.read_csv(path)
    except pd.errors.EmptyDataError:
        return None
    return table if not table.empty else None


def _missing(run: store.Run, *relative: str) -> str:
    """Why an item is skipped, with paths relative to the run (index.md stays machine-independent)."""
    log.debug("report: missing in %s: %s", run.root, relative)
    return ", ".join(f"`{r}`" for r in relative) + " not in the run directory (or empty)"


INVENTORY = ("elicitation/rows.csv", "elicitation/table1.csv", "elicitation/shade_bins.csv",
             "elicitation/dataset_stats.csv", "prefs/summary.csv", "models/summary.csv", "eval/models.csv",
             "eval/metrics.csv", "eval/selection.csv", "eval/improvements.csv", "eval/table2.csv",
             "eval/table3.csv", "eval/table4.csv", "eval/controls.csv", "eval/reliability.csv")


def inventory(run: RunLike) -> pd.DataFrame:
    """Which of the files the report reads this run has (rows per file)."""
    run = as_run(run)
    rows = []
    for rel in INVENTORY:
        table = read_table(run, rel)
        rows.append({"file": rel, "present": table is not None, "rows": 0 if table is None else len(table)})
    logs = sorted(p for p in (run.root / "models").glob("*/train_log.json") if not p.parent.name.startswith("."))
    rows.append({"file": "models/*/train_log.json", "present": bool(logs), "rows": len(logs)})
    return pd.DataFrame(rows)


def _is_blank(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value)) or str(value) in ("", "nan", "None")


def _in_domain(rows: pd.DataFrame) -> pd.Series:
    """Rows evaluated on (one of) the task(s) the model was trained on (``train_task`` may join
    several tasks with "+")."""
    return pd.Series([str(t) in str(tt).split("+") for t, tt in zip(rows["task"], rows["train_task"])],
                     index=rows.index, dtype=bool)


# ---------------------------------------------------------------------------- Table 1

def _method_label(method: str, judge: str, margin: float | None = None) -> str:
    label = method if _is_blank(judge) or judge == "-" else f"{method} [{judge}]"
    return label if margin is None else f"{label}  p={margin:g}"


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
        return _skip(name, _missing(run, "elicitation/table1.csv"))
    sig = _significance(read_table(run, "elicitation/rows.csv"))
    cells = [c for c in table.columns if c not in ("method", "margin", "judge")]
    labels = [_method_label(m, j, float(p)) for m, p, j in zip(table["method"], table["margin"], table["judge"])]
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
               "`overall` = pair-weighted mean over the columns.")
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
        return _skip(name, _missing(run, "elicitation/shade_bins.csv"))
    table = table.assign(panel=table["task"] + " / " + table["generator"],
                         series=[_method_label(m, j) for m, j in zip(table["method"], table["judge"])])
    panels = sorted(table["panel"].unique())
    n_cats = max(len(g.groupby(["less_wrong", "more_wrong"])) for _, g in table.groupby("panel"))
    n_cols = 1 if n_cats > 6 else min(2, len(panels))
    n_rows = math.ceil(len(panels) / n_cols)
    fig = new_figure(max(7.0, 0.8 * n_cats + 2.0) * n_cols + 3.0, 4.8 * n_rows)
    axes = np.atleast_1d(fig.subplots(n_rows, n_cols, squeeze=False)).ravel()
    series = sorted(table["series"].unique())
    colours = dict(zip(series, _palette(len(series))))
    for ax, panel in zip(axes, panels):
        _shade_panel(ax, table[table["panel"] == panel], series, colours)
        ax.set_title(panel)
    for ax in axes[len(panels):]:
        ax.set_visible(False)
    handles = [_line_handle(colours[s], s) for s in series]
    fig.legend(handles=handles, loc="outside right upper", title="method [judge]")
    fig.suptitle("Accuracy by shade of wrong (all pairs, 95% CI)")
    return Artifact(name, save_figure(fig, out_dir, name), table.drop(columns=["panel", "series"]))


def _palette(n: int) -> list:
    import seaborn as sns
    return sns.color_palette("colorblind", n) if n <= 10 else sns.color_palette("husl", n)


PREFERENCE_ORDER = (*WOW_PREFERENCES, *ROW_PREFERENCES, *CONTROL_PREFERENCES)


def preference_sorted(preferences: Sequence[Any]) -> list[str]:
    """Distinct preference types in the paper's order (unknown ones last, alphabetically)."""
    rank = {p: k for k, p in enumerate(PREFERENCE_ORDER)}
    return sorted(set(map(str, preferences)), key=lambda p: (rank.get(p, len(rank)), p))


def preference_colours(preferences: Sequence[str]) -> dict[str, Any]:
    """One colour per preference type, the same in every figure (known types first, in the
    paper's order; unknown ones after them)."""
    known = list(PREFERENCE_ORDER) + sorted(set(map(str, preferences)) - set(PREFERENCE_ORDER))
    return dict(zip(known, _palette(len(known))))


def _line_handle(colour, label: str):
    from matplotlib.lines import Line2D
    return Line2D([], [], color=colour, marker="o", linestyle="-", label=label)


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


# ---------------------------------------------------------------------------- plain tables

def dataset_stats(run: RunLike, out_dir: Path) -> Artifact:
    """Per (task, generator): questions, samples, accuracy, confidence, unparsed, WoW pairs and
    the judges' parse failures."""
    run, name = as_run(run), "dataset_stats"
    table = read_table(run, "elicitation/dataset_stats.csv")
    if table is None:
        return _skip(name, _missing(run, "elicitation/dataset_stats.csv"))
    caption = ("**Dataset statistics.** Per task and generator: questions, samples, share correct, mean "
               "confidence exp(mean token log-prob), share unparsed, failed calls, WoW pairs, and the share "
               "of judge replies that did not parse.")
    return Artifact(name, save_table(table, out_dir, name, caption=caption), table)


def prefs_summary(run: RunLike, out_dir: Path) -> Artifact:
    """The preference sets: type, source, judge, candidate, degenerate, capped and kept pairs."""
    run, name = as_run(run), "prefs_summary"
    table = read_table(run, "prefs/summary.csv")
    if table is None:
        return _skip(name, _missing(run, "prefs/summary.csv"))
    caption = ("**Preference sets.** Candidate pairs, pairs with identical texts removed (degenerate), "
               "pairs cut by the cap, pairs kept; and the elicitation row that measures each set's labels.")
    return Artifact(name, save_table(table, out_dir, name, caption=caption), table)


def training_summary(run: RunLike, out_dir: Path) -> Artifact:
    """One row per trained adapter: preference set, trainer, config, pairs, time, loss, final
    reward margin and accuracy."""
    run, name = as_run(run), "training_summary"
    table = read_table(run, "models/summary.csv")
    if table is None:
        return _skip(name, _missing(run, "models/summary.csv"))
    caption = "**Training runs.** One LoRA adapter per row; margin/accuracy of the rewards at the last logged step."
    return Artifact(name, save_table(table, out_dir, name, caption=caption), table)


# ---------------------------------------------------------------------------- Tables 2-4, controls

def format_improvements(table: pd.DataFrame) -> pd.DataFrame:
    """"estimate [low, high]" cells for each improvement with a CI (accuracy in points), with
    readable column names."""
    from .evaluate import format_ci
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
        return _skip(name, _missing(run, source))
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


def _row_label(row: pd.Series, with_task: bool = True) -> str:
    parts = [str(row[k]) for k in ("trainer", "source") if k in row and not _is_blank(row[k])]
    head = str(row.get("preference", row.get("label")))
    head = f"{row['task']}: {head}" if with_task else head
    return head + (f" ({', '.join(parts)})" if parts else "")


def forest_plot(table: pd.DataFrame, title: str):
    """One panel per improvement (Δp_wrong, ΔAcc in points, −ΔECE): a point and its 95% CI per
    row, a line at 0 (no change); colour = preference type."""
    metrics = [m for m in METRIC_LABELS if m in table.columns]
    labels = [_row_label(r) for _, r in table.iterrows()]
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
    handles = [_line_handle(colours[p], p) for p in prefs]
    fig.legend(handles=handles, loc="outside lower center", ncols=min(len(prefs), 6), title="preference")
    fig.suptitle(title)
    return fig


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
        imp[col] = imp[col].where(~imp[col].map(_is_blank), fallback)
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
    imp = imp[_in_domain(imp) & ~imp["elicitation_method"].map(_is_blank)]
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
        return _skip(name, _missing(run, *[f for f, t in (("elicitation/rows.csv", rows),
                                                          ("eval/improvements.csv", imp)) if t is None]))
    points = figure2_points(rows, imp, read_table(run, "eval/models.csv"), read_table(run, "models/summary.csv"),
                            trainer)
    if points.empty:
        return _skip(name, "no in-domain preference set with elicited labels (direct/score types) matches a row "
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
    handles = [_line_handle(colours[p], p) for p in prefs]
    handles += [Line2D([], [], color="grey", marker=m, linestyle="", label=t) for t, m in markers.items()]
    if handles:
        ax.legend(handles=handles, loc="lower right", fontsize=12)
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
    imp = improvements[_in_domain(improvements)]
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
        return _skip(name, _missing(run, "eval/improvements.csv"))
    frame = power_frame(imp)
    if frame.empty:
        return _skip(name, "no in-domain improvement row with an interval")
    caption = ("**Power.** Minimum detectable effect (80% power, two-sided 5% level) from the width of this run's "
               "question-level intervals, and the test questions a target effect needs (SE ~ 1/sqrt(questions)).")
    return Artifact(name, save_table(frame, out_dir, name, caption=caption), frame)


# ---------------------------------------------------------------------------- reliability

def _aligned_by_task(improvements: pd.DataFrame) -> dict[str, pd.DataFrame]:
    """In-domain improvement rows (the selected aligned models) per evaluated task."""
    imp = improvements[_in_domain(improvements)]
    return {str(t): g.sort_values("label", kind="mergesort") for t, g in imp.groupby("task", sort=True)}


def original_of(model: str, eval_models: pd.DataFrame | None) -> str | None:
    """The original model an aligned model is compared with: the eval/models.csv row with
    preference "original" and the same base model (or the only original)."""
    if eval_models is None:
        return None
    originals = eval_models[eval_models["preference"].astype(str) == "original"]
    if originals.empty:
        return None
    base = eval_models.loc[eval_models["model"] == model, "base_model"]
    if len(base):
        same = originals[(originals["base_model"] == base.iloc[0]) | (originals["model"] == base.iloc[0])]
        if len(same):
            return str(same["model"].iloc[0])
    return str(originals["model"].iloc[0]) if len(originals) == 1 else None


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
    from .evaluate import reliability_table
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
        return _skip(name, _missing(run, *[f for f, t in (("eval/improvements.csv", imp),
                                                          ("eval/models.csv", eval_models)) if t is None]))
    written, summary, notes = [], [], []
    for task, rows in _aligned_by_task(imp).items():
        panels = []
        for _, r in rows.iterrows():
            original = original_of(r["label"], eval_models)
            before = reliability_data(run, original, task) if original else None
            after = reliability_data(run, r["label"], task)
            if before is None or after is None:
                notes.append(f"{task}/{r['label']}: no reliability data")
                continue
            panels.append((_row_label(r, with_task=False), original, before, after))
            summary.append({"task": task, "model": r["label"], "original": original,
                            "ece_original": ece_of(before), "ece_aligned": ece_of(after)})
        if panels:
            written += save_figure(_reliability_figure(task, panels), out_dir, f"reliability_{task}")
    for note in notes:
        log.info("reliability: %s", note)
    if not written:
        return _skip(name, "; ".join(notes) or "no in-domain aligned model in eval/improvements.csv")
    return Artifact(name, written, pd.DataFrame(summary), note="; ".join(notes))


def _reliability_figure(task: str, panels: list[tuple[str, str, pd.DataFrame, pd.DataFrame]]):
    """One panel per aligned model: accuracy per confidence bin, original (grey) beside aligned
    (colour), the diagonal = perfect calibration; both ECEs in the panel title."""
    from matplotlib.patches import Patch
    n_cols = min(3, len(panels))
    n_rows = math.ceil(len(panels) / n_cols)
    fig = new_figure(5.0 * n_cols, 4.8 * n_rows + 0.8)
    axes = np.atleast_1d(fig.subplots(n_rows, n_cols, squeeze=False)).ravel()
    colours = ["#8c8c8c", _palette(1)[0]]                   # original grey, aligned in colour
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
                    rows.append({"model": model, "preference": str(preference if not _is_blank(preference) else "-"),
                                 "trainer": str(trainer), "step": entry.get("step", k), "metric": metric,
                                 "value": float(entry[metric])})
    return pd.DataFrame(rows, columns=["model", "preference", "trainer", "step", "metric", "value"])


def reward_margins(run: RunLike, out_dir: Path) -> Artifact:
    """DPO-family training curves: reward margin (chosen minus rejected implicit reward) and
    reward accuracy per logged step, one line per adapter, colour = preference type."""
    run, name = as_run(run), "reward_margins"
    curves = train_curves(run)
    if curves.empty:
        return _skip(name, "no `models/*/train_log.json` with `rewards/margins` in the run directory")
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
    handles = [_line_handle(colours[p], p) for p in hue_order]
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
    for task, rows in _aligned_by_task(improvements).items():
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
        return _skip(name, _missing(run, *[f for f, t in (("eval/improvements.csv", imp),
                                                          ("eval/models.csv", eval_models)) if t is None]))
    table, notes = table5_frame(run, imp, eval_models)
    for note in notes:
        log.info("table 5: %s", note)
    if table.empty:
        return _skip(name, "; ".join(notes) or "no example")
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


# ---------------------------------------------------------------------------- the whole report

# What a run of the paper's design shows (the artefact names in figures/index.md); the power analysis
# and the loss comparison are extras of this reproduction.
PAPER_ITEMS = ("table1_elicitation", "shade_bins", "dataset_stats", "prefs_summary", "training_summary",
               "table2_main", "table3_row_mixes", "table4_generalisation", "controls",
               "figure2_elicitation_vs_gain", "reliability", "reward_margins", "table5_examples")

def unwritten_items(figures_dir: Path | str) -> list[str]:
    """The items of ``PAPER_ITEMS`` that ``figures_dir/index.md`` lists without a file (skipped) or
    not at all."""
    index = (Path(figures_dir) / "index.md").read_text(encoding="utf-8")
    written = dict(re.findall(r"^- \*\*(\w+)\*\*: (.*)$", index, flags=re.M))
    return [name for name in PAPER_ITEMS if "](" not in written.get(name, "")]


ITEMS: dict[str, Callable[[RunLike, Path], Artifact]] = {
    "table1": table1, "shade_bins": shade_bins, "dataset_stats": dataset_stats, "prefs_summary": prefs_summary,
    "training_summary": training_summary, "table2": table2, "table3": table3, "table4": table4,
    "controls": controls, "figure2": figure2, "reliability": reliability, "reward_margins": reward_margins,
    "table5": table5, "power": power_analysis,
}


def default_out_dir() -> Path:
    """The repository's ``figures/`` (where the committed figures of the default run live)."""
    return paths.REPO_ROOT / "figures"


def output_dir(run: RunLike, figures_dir: str | Path | None = None) -> Path:
    """Where notebook 05 writes: ``figures_dir`` (a relative path is taken from the repository
    root, e.g. the cpu profile's ``figures``), else the run's own ``runs/<run>/figures``."""
    if figures_dir is None or str(figures_dir) == "":
        return as_run(run).root / "figures"
    path = Path(figures_dir).expanduser()
    return path if path.is_absolute() else paths.REPO_ROOT / path


def write_index(out_dir: Path, artifacts: Sequence[Artifact]) -> Path:
    """``index.md``: every item with its files, or why it was skipped (no dates: reruns are identical)."""
    lines = ["# Figures and tables", "", "Written by `wowlib.report` from one run directory.", ""]
    for art in artifacts:
        if art.skipped:
            lines.append(f"- **{art.name}**: {art.note}")
        else:
            files = ", ".join(f"[{p.name}]({p.name})" for p in art.paths)
            lines.append(f"- **{art.name}**: {files}" + (f" ({art.note})" if art.note else ""))
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "index.md"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def write_report(run: RunLike, out_dir: Path | str | None = None) -> list[Path]:
    """Every table and figure the run's files allow, into ``out_dir`` (default: the repository's
    ``figures/``); returns the files written (index.md last)."""
    run = as_run(run)
    out = Path(out_dir) if out_dir is not None else default_out_dir()
    if not run.root.exists():
        raise FileNotFoundError(f"no run directory {run.root}")
    log.info("report: %s -> %s", run.root, out)
    artifacts = [item(run, out) for item in ITEMS.values()]
    written = [p for art in artifacts for p in art.paths] + [write_index(out, artifacts)]
    log.info("report: %d files written, %d items skipped", len(written),
             sum(art.skipped for art in artifacts))
    return written


# ---------------------------------------------------------------------------- results bundle

# What the report reads (everything above), relative to a run directory: a few MB of CSV/JSON,
# no adapters, no caches, no Phase 1 samples.
BUNDLE_FILES = ("elicitation/*.csv", "prefs/summary.csv", "models/summary.csv", "models/*/train_log.json",
                "eval/*.csv", "eval/*/*.jsonl",
                "notebooks/*.ipynb")    # the executed notebooks, to read without running anything


class BundleError(ValueError):
    """A run's report inputs hold something a committed bundle must not (machine paths)."""


FIGURE_NOTE = "[figure left out of the committed copy: figures/ holds it]"


def portable_notebook(text: str, run_root: Path) -> str:
    """An executed notebook's JSON as a bundle keeps it: every text output, but no embedded image
    (the figures are the bundle's own files, ``figures/``; the note ``FIGURE_NOTE`` stands in), and
    this machine's folders in the outputs replaced: the environment (``sys.prefix``, also resolved)
    by ``<venv>``, the run directory by ``runs/<run>``, the repository the run was made from (the run
    directory's grandparent) and this one by ``.``."""
    notebook = json.loads(text)
    for cell in notebook.get("cells", []):
        for output in cell.get("outputs", []):
            data = output.get("data", {})
            if any(key.startswith("image/") for key in data):
                output["data"] = {k: v for k, v in data.items() if not k.startswith("image/")} | {"text/plain": FIGURE_NOTE}
    text = json.dumps(notebook, indent=1, ensure_ascii=False) + "\n"
    run_root = Path(run_root).resolve()
    swaps = [(Path(sys.prefix).resolve(), "<venv>"), (Path(sys.prefix), "<venv>"),
             (run_root, f"runs/{run_root.name}"), (run_root.parent.parent, "."), (paths.REPO_ROOT, ".")]
    for root, short in sorted(swaps, key=lambda pair: -len(str(pair[0]))):       # the longest first
        text = text.replace(str(root) + "/", short + "/").replace(str(root), short)
    return text


def write_bundle(run: RunLike, dest: Path | str) -> list[Path]:
    """Copy the report's inputs from ``run`` into ``dest`` (same layout), so that the tables and
    figures can be re-rendered with no model and no run: ``write_report(dest, out)``.

    The files are copied byte for byte, never rewritten, except the executed notebooks: their
    embedded images are left out (the figures are files of their own) and the machine's folders in
    their outputs (a library warning's file, the run directory) become ``.``, ``runs/<run>`` and
    ``<venv>`` (``portable_notebook``). A bundle is committed, so a file that
    holds a machine-local absolute path (a user name, the machine's layout: ``store.absolute_paths``)
    is refused (``BundleError`` naming the file, the line and the path) before anything is copied."""
    run, dest = as_run(run), Path(dest)
    if not run.root.exists():
        raise FileNotFoundError(f"no run directory {run.root}")
    sources = [path for pattern in BUNDLE_FILES for path in sorted(run.root.glob(pattern))
               if not any(part.startswith(".") for part in path.relative_to(run.root).parts)]   # temporary folders
    roots = [run.root, *store.local_roots()]
    contents = {path: (portable_notebook(path.read_text(encoding="utf-8"), run.root).encode("utf-8")
                       if path.suffix == ".ipynb" else path.read_bytes()) for path in sources}
    found = [(path, lineno, text) for path in sources
             for lineno, text in store.absolute_paths(contents[path].decode("utf-8", "replace"), roots)]
    if found:
        shown = "; ".join(f"{path.relative_to(run.root)}:{lineno}: {text}" for path, lineno, text in found[:5])
        more = f" (and {len(found) - 5} more)" if len(found) > 5 else ""
        raise BundleError(
            f"{run.root}: the report inputs hold machine-local absolute paths, which a committed bundle must "
            f"not: {shown}{more}. Training logs written before wowlib recorded portable names get them when "
            "notebook 03 (wowlib.align.run_alignment) is rerun on this run (it does not retrain); otherwise "
            "remove the paths from these files")
    copied = []
    for path in sources:
        target = dest / path.relative_to(run.root)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(contents[path])
        copied.append(target)
    log.info("bundle: %d files from %s -> %s", len(copied), run.root, dest)
    return copied


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m wowlib.report RUN_DIR [--out DIR] [--bundle DEST]``."""
    import argparse
    parser = argparse.ArgumentParser(prog="python -m wowlib.report", description="Tables and figures of a run "
                                     "directory (or of a results bundle), with no model.")
    parser.add_argument("run", help="a run directory (runs/<profile>) or a results bundle (results/<profile>)")
    parser.add_argument("--out", default=None, help="where to write (default: the repository's figures/)")
    parser.add_argument("--bundle", default=None, help="instead, copy the report's inputs into this folder")
    args = parser.parse_args(argv)
    run = store.Run(Path(args.run).resolve())
    try:
        if args.bundle:
            print(f"{len(write_bundle(run, args.bundle))} files copied into {args.bundle}")
        else:
            print(f"{len(write_report(run, args.out))} files written")
    except (FileNotFoundError, BundleError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
