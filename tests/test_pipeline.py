"""End to end: ``run_all.sh smoke`` on a fresh run directory (every notebook through papermill),
its outputs, its resumability, its failure message, and the notebooks under nbval."""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from wowlib import report

pytestmark = pytest.mark.slow          # run_all.sh end to end (minutes): not in the fast lane

REPO = Path(__file__).resolve().parent.parent
EXPECTED = [
    "samples/tiny/kc.jsonl", "samples/tiny/nlgraph_shortest_path.jsonl",
    "judgments/tiny/tiny-logprob/kc.pairwise.jsonl", "judgments/tiny/tiny/kc.score.jsonl",
    "elicitation/rows.csv", "elicitation/table1.csv", "elicitation/shade_bins.csv", "elicitation/dataset_stats.csv",
    "prefs/summary.csv", "prefs/self-oracle-kc.jsonl", "models/summary.csv",
    "eval/metrics.csv", "eval/selection.csv", "eval/improvements.csv", "eval/table2.csv", "eval/table2.md",
    "eval/table3.csv", "eval/table4.csv", "eval/controls.csv", "eval/reliability.csv", "eval/tiny/kc.jsonl",
    *[f"notebooks/{nb}.ipynb" for nb in ("01_sample_wrong", "02_elicit", "03_align", "04_evaluate", "05_figures")],
]
FIGURES = ["table1_elicitation.png", "table1_elicitation.pdf", "table2_main.csv", "table2_main.md"]


def _run_all(runs: Path, *args: str, **env: str) -> tuple[subprocess.CompletedProcess, float]:
    start = time.perf_counter()
    result = subprocess.run(["./run_all.sh", *args], cwd=REPO, capture_output=True, text=True, timeout=1800, check=False,
                            env={**os.environ, "WOW_RUNS_DIR": str(runs), **env})
    return result, time.perf_counter() - start


def _snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.suffix in (".csv", ".md", ".jsonl") and "cache" not in p.parts}


@pytest.fixture(scope="module")
def smoke(tmp_path_factory) -> dict:
    runs = tmp_path_factory.mktemp("runs")
    first, first_s = _run_all(runs, "smoke")
    assert first.returncode == 0, first.stdout[-4000:] + first.stderr[-4000:]
    snapshot = _snapshot(runs / "smoke")
    second, second_s = _run_all(runs, "smoke")
    assert second.returncode == 0, second.stdout[-4000:] + second.stderr[-4000:]
    return {"root": runs / "smoke", "runs": runs, "first": first, "first_s": first_s, "second_s": second_s,
            "snapshot": snapshot}


def test_every_stage_writes_its_outputs(smoke) -> None:
    root = smoke["root"]
    missing = [f for f in EXPECTED if not (root / f).is_file() or not (root / f).stat().st_size]
    assert not missing, f"missing or empty: {missing}"
    figures = [f for f in FIGURES if not (root / "figures" / f).is_file() or not (root / "figures" / f).stat().st_size]
    assert not figures, f"missing or empty figures: {figures}"
    adapters = list((root / "models").glob("*/adapter_model.safetensors"))
    assert adapters, "no adapter trained"




def test_every_table_and_figure_of_the_paper_is_written(smoke) -> None:
    """figures/index.md of the smoke run lists every item of the paper's design (the smoke profile
    takes the cpu profile's code paths), none skipped, and Figure 2 has points from both tasks and
    both elicitation families (at least five: the score sets and the unfiltered direct sets; the tiny
    model's swap-consistent and text-judged sets are often empty)."""
    missing = report.unwritten_items(smoke["root"] / "figures")
    assert not missing, f"not written: {missing}\n" + (smoke["root"] / "figures" / "index.md").read_text()
    points = (smoke["root"] / "figures" / "figure2_elicitation_vs_gain.csv").read_text().strip().splitlines()
    assert len(points) - 1 >= 5, points
    assert {"kc", "nlgraph_shortest_path"} <= {line.split(",")[0] for line in points[1:]}, points


def test_progress_lines_name_every_stage_and_the_total(smoke) -> None:
    out = smoke["first"].stdout
    for k, nb in enumerate(("01_sample_wrong", "02_elicit", "03_align", "04_evaluate", "05_figures"), 1):
        assert f"[{k}/5] {nb} done in" in out
    assert "finished in" in out


def test_rerun_reuses_everything_and_changes_nothing(smoke) -> None:
    """The second run finds every call cached and every adapter trained: faster, and identical
    tables (the runs are seeded end to end)."""
    assert smoke["second_s"] < smoke["first_s"], (smoke["first_s"], smoke["second_s"])
    after = _snapshot(smoke["root"])
    changed = [k for k in smoke["snapshot"] if after.get(k) != smoke["snapshot"][k]]
    assert not changed, f"a rerun changed {changed}"


def test_missing_data_stops_before_any_notebook(tmp_path) -> None:
    result, _ = _run_all(tmp_path, "smoke", WOW_DATA_DIR=str(tmp_path / "no-data"))
    assert result.returncode != 0
    assert "knowledge_crosswords/MC_medi.jsonl" in result.stdout + result.stderr
    assert "python -m wowlib.data fetch" in result.stdout + result.stderr
    assert "01_sample_wrong ..." not in result.stdout


def test_a_failing_stage_is_named(tmp_path) -> None:
    """Another process holds the run directory: notebook 01 cannot write, and run_all.sh names the
    notebook that failed (its executed copy keeps the error)."""
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time, wowlib.store as s\n"
        f"with s.Run(__import__('pathlib').Path({str(tmp_path / 'smoke')!r})).writer('sample'):\n"
        "    print('locked', flush=True); time.sleep(600)")], stdout=subprocess.PIPE, text=True, cwd=REPO)
    try:
        assert holder.stdout.readline().strip() == "locked"
        result, _ = _run_all(tmp_path, "smoke")
    finally:
        holder.kill()
    assert result.returncode != 0
    assert "FAILED in notebooks/01_sample_wrong.ipynb" in result.stderr


def test_unknown_profile_is_refused(tmp_path) -> None:
    result, _ = _run_all(tmp_path, "nope")
    assert result.returncode == 2 and "no profile 'nope'" in result.stderr


def test_notebooks_run_clean_under_nbval(smoke) -> None:
    """The committed notebooks with their default (smoke) parameters, as a reader opens them; the
    run directory is the one above, so every slow step is cached."""
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--nbval-lax",
                             "--nbval-current-env", "notebooks/"], cwd=REPO, capture_output=True, text=True,
                            timeout=900, check=False, env={**os.environ, "WOW_RUNS_DIR": str(smoke["runs"])})
    assert result.returncode == 0, result.stdout[-4000:]
