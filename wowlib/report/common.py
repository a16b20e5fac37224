"""What every table and figure shares: the style, saving figures and tables, the ``Artifact``
record of one item, reading a run directory, and the colours of the preference types."""
from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from .. import store
from ..evaluate import CONTROL_PREFERENCES, ROW_PREFERENCES, WOW_PREFERENCES, to_markdown

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


def skip_item(name: str, reason: str) -> Artifact:
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


def missing_inputs(run: store.Run, *relative: str) -> str:
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


def is_blank(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value)) or str(value) in ("", "nan", "None")


def in_domain(rows: pd.DataFrame) -> pd.Series:
    """Rows evaluated on (one of) the task(s) the model was trained on (``train_task`` may join
    several tasks with "+")."""
    return pd.Series([str(t) in str(tt).split("+") for t, tt in zip(rows["task"], rows["train_task"])],
                     index=rows.index, dtype=bool)



def palette_of(n: int) -> list:
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
    return dict(zip(known, palette_of(len(known))))


def line_handle(colour, label: str):
    from matplotlib.lines import Line2D
    return Line2D([], [], color=colour, marker="o", linestyle="-", label=label)


def method_label(method: str, judge: str, margin: float | None = None) -> str:
    label = method if is_blank(judge) or judge == "-" else f"{method} [{judge}]"
    return label if margin is None else f"{label}  p={margin:g}"


def row_label(row: pd.Series, with_task: bool = True) -> str:
    parts = [str(row[k]) for k in ("trainer", "source") if k in row and not is_blank(row[k])]
    head = str(row.get("preference", row.get("label")))
    head = f"{row['task']}: {head}" if with_task else head
    return head + (f" ({', '.join(parts)})" if parts else "")


def aligned_by_task(improvements: pd.DataFrame) -> dict[str, pd.DataFrame]:
    """In-domain improvement rows (the selected aligned models) per evaluated task."""
    imp = improvements[in_domain(improvements)]
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
