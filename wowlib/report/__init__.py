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

``tables.py`` writes the tables (Table 1 with its heatmap, Tables 2-5, the controls, the power
analysis, the plain summaries), ``figures.py`` the figures (shades of wrong, Figure 2, reliability,
reward margins), both from what ``common.py`` shares (style, saving, reading a run); this module
assembles the whole report and the committed results bundle.
"""
from __future__ import annotations

import json
import logging
import re
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from .. import paths, store
# The items and helpers notebooks and tests call as ``wowlib.report.<name>``:
from .common import Artifact, as_run, inventory, RunLike
from .tables import (
    controls, dataset_stats, pick_example, power_analysis, prefs_summary, table1, table2, table3,
    table4, table5, training_summary,
)
from .figures import (
    ELICITATION_COLUMNS, figure2, figure2_points, pearson, reliability, reward_margins, shade_bins,
    train_curves,
)

log = logging.getLogger(__name__)


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
                "notebooks/*.ipynb")    # the executed notebooks, stripped: the code and parameters that ran


class BundleError(ValueError):
    """A run's report inputs hold something a committed bundle must not (machine paths)."""


def portable_notebook(text: str, run_root: Path) -> str:
    """An executed notebook's JSON as a bundle keeps it: the code as it ran (the parameters papermill
    injected, the run's parameters and timing in the notebook's metadata) without outputs, execution
    counts, per-cell timing or widget state (the executed copy with its outputs stays in
    ``runs/<run>/notebooks/``; the numbers are the bundle's tables and ``figures/``), and this
    machine's folders replaced: the environment (``sys.prefix``, also resolved) by ``<venv>``, the
    run directory by ``runs/<run>``, the repository the run was made from (the run directory's
    grandparent) and this one by ``.``."""
    notebook = json.loads(text)
    notebook.get("metadata", {}).pop("widgets", None)
    for cell in notebook.get("cells", []):
        for key in ("execution", "papermill"):
            cell.get("metadata", {}).pop(key, None)
        if cell.get("cell_type") == "code":
            cell["outputs"], cell["execution_count"] = [], None
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

    The files are copied byte for byte, never rewritten, except the executed notebooks: they are
    committed without their outputs, and the machine's folders in them become ``.``,
    ``runs/<run>`` and ``<venv>`` (``portable_notebook``). A bundle is committed, so a file that
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

