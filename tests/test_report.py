"""wowlib.report and notebook 05: every table and figure from a synthetic run directory.

The run directory is built here from hand-made records through the library's own writers
(``elicit.write_elicitation``, ``evaluate.metrics_table`` / ``select_configs`` /
``improvement_rows`` / ``table2``...), following the contract of docs/design.md, so the
report is tested on the same file shapes the pipeline writes. Planted facts: the headline aligned
model on kc moves question ``kc-t3`` from proxy 0 to 2/3 (Table 5 must pick it).
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from wowlib import elicit, paths, prefs, report, store
from wowlib import evaluate as ev

TASKS = ("kc", "nlgraph_shortest_path")
GEN = JUDGE = "tiny"
NR = 40                                     # bootstrap resamples in the fixture
PLANT = ("kc", "kc-t3")                     # Table 5's planted question
EXPECTED = [f"{stem}.{ext}" for stem, exts in (
    ("table1_elicitation", "png pdf csv md"), ("shade_bins", "png pdf"), ("dataset_stats", "csv md"),
    ("prefs_summary", "csv md"), ("training_summary", "csv md"), ("table2_main", "csv md"),
    ("table2_forest", "png pdf"), ("table3_row_mixes", "csv md"), ("table4_generalisation", "csv md"),
    ("controls", "csv md"), ("figure2_elicitation_vs_gain", "png pdf csv md"),
    ("reliability_kc", "png pdf"), ("reliability_nlgraph_shortest_path", "png pdf"),
    ("reward_margins", "png pdf"), ("table5_examples", "csv md"), ("power_analysis", "csv md"), ("index", "md"),
) for ext in exts.split()]
PHASE1 = [f for f in EXPECTED if f.split(".")[0] in ("table1_elicitation", "shade_bins", "dataset_stats", "index")]


# ---------------------------------------------------------------------------- Phase 1 records

def _levels(task: str, rng: np.random.Generator, n: int) -> np.ndarray:
    """Proxies: thirds for kc (0..3 blanks right), continuous for shortest path; 1 = correct."""
    if task == "kc":
        return rng.choice([0.0, 1 / 3, 2 / 3, 1.0], size=n, p=[0.3, 0.3, 0.25, 0.15])
    return np.where(rng.random(n) < 0.15, 1.0, np.round(rng.uniform(0.0, 0.95, n), 3))


def answer(task: str, qid: str, idx: int, proxy: float | None, split: str, generator: str = GEN,
           status: str = "ok", conf: float = 0.5) -> dict:
    """One answer record of the samples contract."""
    ok = status == "ok"
    return {"task": task, "split": split, "question_id": qid, "sample_idx": idx, "option_order": None,
            "prompt": paths.prompt_text("cot") + f"Question {qid} of {task}?", "n_tokens": 20 + int(40 * (proxy or 0)),
            "response": f"Step 1 ... so the answer to {qid} is {proxy if ok else '?'} (sample {idx}).",
            "mean_logprob": math.log(conf), "extraction": "x", "answer": (proxy if ok else None),
            "proxy": proxy if ok else None, "correct": bool(ok and proxy == 1.0), "status": status,
            "generator": generator}


def phase1_samples(seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)
    out = []
    for task in TASKS:
        for q in range(6):
            for i, p in enumerate(_levels(task, rng, 6)):
                status = "unparsed" if (q + i) % 11 == 0 else "ok"
                out.append(answer(task, f"{task[:2]}-q{q}", i, float(p), "train", status=status,
                                  conf=float(rng.uniform(0.2, 0.9))))
    return out


def judgments(samples: list[dict], seed: int = 1) -> tuple[list[dict], list[dict]]:
    """Log-prob-mode pairwise verdicts (right 70% of the time, swap-checked) and score batches."""
    rng = np.random.default_rng(seed)
    pairwise = []
    for p in elicit.wow_pairs(samples):
        right = 1 if p.proxy_i > p.proxy_j else 2
        verdict = right if rng.random() < 0.7 else 3 - right
        swapped = 3 - verdict if rng.random() < 0.8 else verdict
        lp = -float(rng.uniform(0.1, 2.0))
        pairwise.append({"task": p.task, "question_id": p.question_id, "generator": p.generator, "judge": JUDGE,
                         "mode": "logprob", "i": p.i, "j": p.j, "proxy_i": p.proxy_i, "proxy_j": p.proxy_j,
                         "text": None, "verdict": verdict, "status": "ok", "swapped_verdict": swapped,
                         "swapped_status": "ok", "logprob_1": lp if verdict == 1 else lp - 1,
                         "logprob_2": lp if verdict == 2 else lp - 1})
    score = []
    by_q: dict[tuple, list[dict]] = {}
    for r in samples:
        by_q.setdefault((r["task"], r["question_id"]), []).append(r)
    for (task, qid), rs in sorted(by_q.items()):
        batch = rs[:5]
        score.append({"task": task, "question_id": qid, "generator": GEN, "judge": JUDGE, "mode": "logprob",
                      "samples": [r["sample_idx"] for r in batch], "text": None, "status": "ok",
                      "scores": [round(5 * (r["proxy"] or 0) * 0.6 + float(rng.uniform(0, 2)), 3) for r in batch]})
    return pairwise, score


# ---------------------------------------------------------------------------- Phase 2 records

SPECS = {   # preference type -> (judge of the PrefSpec, aligned strength)
    "oracle": (None, 0.6), "direct": ("tiny-logprob", 0.35), "score": ("tiny-logprob", 0.2),
    "row+score": ("tiny-logprob", 0.3), "random": (None, 0.0),
}


def original_answers(task: str, seed: int) -> list[dict]:
    rng = np.random.default_rng(seed)
    out = []
    for split, n_q in (("val", 6), ("test", 8)):
        for q in range(n_q):
            qid = f"{task[:2]}-{split[0]}{q}"
            proxies = _levels(task, rng, 5)
            if (task, qid) == PLANT:
                proxies = np.zeros(5)
            for i, p in enumerate(proxies):
                out.append(answer(task, qid, i, float(p), split, conf=float(rng.uniform(0.3, 0.95))))
    return out


def aligned_answers(original: list[dict], model: str, strength: float, seed: int, plant: bool) -> list[dict]:
    """The original's answers, each moved one shade up with probability ``strength``; the planted
    question (if ``plant``) jumps from 0 to 2/3 on every sample."""
    rng = np.random.default_rng(seed)
    out = []
    for r in original:
        p = r["proxy"] if r["proxy"] is not None else 0.0
        if plant and (r["task"], r["question_id"]) == PLANT:
            p = 2 / 3
        elif rng.random() < strength:
            p = min(1.0, p + (1 / 3 if r["task"] == "kc" else 0.2))
        new = answer(r["task"], r["question_id"], r["sample_idx"], round(p, 6), r["split"],
                     conf=math.exp(r["mean_logprob"]) * float(rng.uniform(0.8, 1.0)))
        out.append(dict(new, response=f"[{model}] " + new["response"]))
    return out


def train_log(trainer: str, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    history = []
    for k, step in enumerate(range(5, 45, 5)):
        entry = {"step": step, "epoch": step / 40, "loss": 0.69 - 0.03 * k, "learning_rate": 5e-5}
        if trainer == "dpo":
            entry.update({"rewards/margins": 0.05 * k + float(rng.normal(0, 0.02)),
                          "rewards/accuracies": min(1.0, 0.5 + 0.05 * k), "rewards/chosen": 0.01 * k})
        history.append(entry)
    history.append({"step": 40, "train_runtime": 12.5, "train_loss": 0.6})   # the summary entry: no loss
    return {"history": history, "config": {"trainer": trainer, "learning_rate": 5e-5}, "train_loss": 0.6}


def build_phase2(run: store.Run) -> None:
    """prefs/, models/ and eval/ of the contract, through the library's table builders."""
    originals = {t: original_answers(t, seed=10 + k) for k, t in enumerate(TASKS)}
    models, summary, pref_rows, entries, answers = [], [], [], [], {}
    models.append({"model": GEN, "base_model": GEN, "adapter": "", "preference": "original", "trainer": "",
                   "source": "", "judge": "", "train_task": "", "config": ""})
    for t, recs in originals.items():
        answers[(GEN, t)] = recs
        entries += by_split({"model": GEN, "preference": "original"}, recs)
    seed = 100
    jobs = [(pt, "dpo", t) for t in TASKS for pt in SPECS if pt != "random" or t == "kc"] + [("direct", "orpo", "kc")]
    for pref_type, trainer, task in jobs:
        judge, strength = SPECS[pref_type]
        spec = prefs.PrefSpec(pref_type, "self", (task,), judge=judge)
        key = prefs.elicitation_key(spec)
        elic = dict(zip(report.ELICITATION_COLUMNS, key or (None, None, None)))
        if trainer == "dpo":
            pref_rows.append({"name": spec.name, "type": pref_type, "source": "self", "judge": judge, "tasks": task,
                              "candidates": 120, "degenerate": 2, "capped": 0, "kept": 118, **elic})
        eval_tasks = TASKS if (pref_type, trainer) == ("oracle", "dpo") and task == "kc" else (task,)
        for config in ("c0", "c1"):
            seed += 1
            model = f"{GEN}-{trainer}-{spec.name}-{config}"
            meta = {"preference": pref_type, "trainer": trainer, "source": "self", "judge": judge,
                    "train_task": task, "config": config}
            models.append({"model": model, "base_model": GEN, "adapter": f"models/{model}", **meta})
            log = train_log(trainer, seed)
            store.write_json(run.model(model) / "train_log.json", log)
            summary.append({"model": model, "prefs": spec.name, **meta, "n_pairs": 118, "train_seconds": 12.5,
                            "train_loss": 0.6, "final_margin": log["history"][-2].get("rewards/margins"),
                            "final_accuracy": log["history"][-2].get("rewards/accuracies"), **elic})
            for t in eval_tasks:
                plant = (pref_type, trainer, config, t) == ("oracle", "dpo", "c1", "kc")
                recs = aligned_answers(originals[t], model, strength + (0.1 if config == "c1" else 0), seed, plant)
                answers[(model, t)] = recs
                entries += by_split({"model": model, **meta, **elic}, recs)
    for (model, task), recs in answers.items():
        store.write_jsonl(run.eval(model, task), recs)
    store.write_csv(run.root / "prefs" / "summary.csv", pref_rows)
    store.write_csv(run.root / "models" / "summary.csv", summary)
    store.write_csv(run.eval_dir / "models.csv", models)
    write_eval_tables(run, entries, answers)


def by_split(meta: dict, records: list[dict]) -> list[tuple[dict, list[dict]]]:
    """metrics_table entries: one per split (metrics_table groups by task only)."""
    return [(meta, [r for r in records if r["split"] == split]) for split in ("val", "test")]


def write_eval_tables(run: store.Run, entries: list, answers: dict) -> None:
    metrics = ev.metrics_table(entries, n_resamples=NR)
    store.write_csv(run.eval_dir / "metrics.csv", metrics.to_dict("records"))
    aligned = metrics[metrics["preference"] != "original"]
    selection = ev.select_configs(aligned, group_by=["task", "source", "preference", "trainer", "train_task"])
    store.write_csv(run.eval_dir / "selection.csv", selection.to_dict("records"))
    chosen = ev.selected(selection)
    by_model = metrics.drop_duplicates("model").set_index("model")
    comparisons = []
    for _, row in chosen.iterrows():
        model = by_model.index[(by_model["preference"] == row["preference"]) & (by_model["trainer"] == row["trainer"])
                               & (by_model["train_task"] == row["train_task"]) & (by_model["config"] == row["config"])][0]
        meta = {k: by_model.loc[model, k] for k in ("preference", "trainer", "source", "train_task", "config", "judge",
                                                    *report.ELICITATION_COLUMNS)}
        test = [r for r in answers[(model, row["task"])] if r["split"] == "test"]
        orig = [r for r in answers[(GEN, row["task"])] if r["split"] == "test"]
        comparisons.append(ev.Comparison(model, {k: (None if pd.isna(v) else v) for k, v in meta.items()}, orig, test))
    rows = ev.improvement_rows(comparisons, n_resamples=NR)
    store.write_csv(run.eval_dir / "improvements.csv", rows.to_dict("records"))
    for name, builder in (("table2", ev.table2), ("table3", ev.table3), ("table4", ev.table4),
                          ("controls", ev.control_table)):
        table = builder(rows)
        store.write_csv(run.eval_dir / f"{name}.csv", table.to_dict("records"), list(table.columns))
        (run.eval_dir / f"{name}.md").write_text(ev.to_markdown(ev.format_table(table)))
    bins = []
    for model in [GEN, *rows["label"]]:
        for task in TASKS:
            test = [r for r in answers.get((model, task), []) if r["split"] == "test"]
            if test:
                bins += [{"model": model, "task": task, "split": "test", **b}
                         for b in ev.reliability_table(test).to_dict("records")]
    store.write_csv(run.eval_dir / "reliability.csv", bins)


def build_run(root: Path, phase2: bool = True) -> store.Run:
    run = store.Run(root)
    samples = phase1_samples()
    pairwise, score = judgments(samples)
    elicit.write_elicitation(run, samples, pairwise, score)
    if phase2:
        build_phase2(run)
    return run


# ---------------------------------------------------------------------------- fixtures

@pytest.fixture(scope="module")
def runs_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("runs")


@pytest.fixture(scope="module")
def full_run(runs_root) -> store.Run:
    return build_run(runs_root / "synthetic")


@pytest.fixture(scope="module")
def rendered(full_run, tmp_path_factory) -> tuple[Path, list[Path]]:
    out = tmp_path_factory.mktemp("figures")
    return out, report.write_report(full_run, out)


# ---------------------------------------------------------------------------- tests

def test_full_run_writes_every_file(rendered):
    out, written = rendered
    names = sorted(p.name for p in written)
    assert names == sorted(EXPECTED), set(names) ^ set(EXPECTED)
    for name in EXPECTED:
        assert (out / name).stat().st_size > 0, name
    index = (out / "index.md").read_text()
    assert "skipped" not in index
    assert (out / "table1_elicitation.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (out / "table2_forest.pdf").read_bytes()[:5] == b"%PDF-"
    assert "CreationDate" not in (out / "table2_forest.pdf").read_bytes().decode("latin-1")


def test_tables_carry_the_run_numbers(full_run, rendered):
    out, _ = rendered
    t1 = pd.read_csv(out / "table1_elicitation.csv")
    src = pd.read_csv(full_run.elicitation / "table1.csv")
    assert t1.shape == src.shape and np.allclose(t1["overall"], src["overall"], atol=1e-5)
    md = (out / "table2_main.md").read_text()
    assert "Δp_wrong" in md and "[" in md           # "estimate [low, high]" cells
    t2 = pd.read_csv(out / "table2_main.csv")
    assert set(t2["preference"]) == {"oracle", "direct", "score"}
    assert set(pd.read_csv(out / "table4_generalisation.csv")["train_task"]) == {"kc"}


def test_partial_run_gives_phase1_only(tmp_path):
    run = build_run(tmp_path / "partial", phase2=False)
    out = tmp_path / "out"
    written = report.write_report(run, out)
    assert sorted(p.name for p in written) == sorted(PHASE1)
    index = (out / "index.md").read_text()
    for item in ("table2_main", "figure2_elicitation_vs_gain", "reliability", "reward_margins", "table5_examples"):
        assert f"**{item}**: skipped" in index
    assert not list(out.glob("table2*")) and not list(out.glob("reliability*"))


def test_figure2_correlation_equals_numpy(full_run):
    rows = pd.read_csv(full_run.elicitation / "rows.csv")
    imp = pd.read_csv(full_run.eval_dir / "improvements.csv")
    points = report.figure2_points(rows, imp, pd.read_csv(full_run.eval_dir / "models.csv"),
                                   pd.read_csv(full_run.root / "models" / "summary.csv"))
    # one point per elicited preference set (direct, score, row+score) per task, DPO only
    assert len(points) == 6 and set(points["trainer"]) == {"dpo"}
    assert set(points["preference"]) == {"direct", "score", "row+score"}
    for _, p in points.iterrows():   # the x value is the joined elicitation row, looked up by hand
        [acc] = rows.loc[(rows["task"] == p["task"]) & (rows["method"] == p["elicitation_method"])
                         & (rows["judge"] == p["elicitation_judge"])
                         & np.isclose(rows["margin"], p["elicitation_margin"]), "accuracy"]
        assert p["elicitation_accuracy"] == pytest.approx(acc)
    corr = report.pearson(points["elicitation_accuracy"], points["delta_p_wrong"])
    expected = np.corrcoef(points["elicitation_accuracy"], points["delta_p_wrong"])[0, 1]
    assert corr.n == 6 and corr.r == pytest.approx(expected)
    assert corr.ci_low <= corr.r <= corr.ci_high
    few = report.pearson([0.5, 0.6], [0.1, 0.2])
    assert math.isnan(few.r) and "too few points" in few.describe()


def test_table5_picks_the_planted_question(full_run, rendered):
    out, _ = rendered
    table = pd.read_csv(out / "table5_examples.csv")
    kc = table[table["task"] == "kc"].iloc[0]
    assert kc["question_id"] == PLANT[1]
    assert kc["model"].startswith(f"{GEN}-dpo-self-oracle-kc")
    assert kc["original_proxy"] == 0 and kc["aligned_proxy"] == pytest.approx(2 / 3)
    assert kc["original_mean_proxy"] == 0 and kc["aligned_mean_proxy"] == pytest.approx(2 / 3)
    # the rule itself, on two hand-made questions
    orig = [answer("kc", "a", i, p, "test") for i, p in enumerate([0, 1 / 3])] + \
           [answer("kc", "b", i, 0.0, "test") for i in range(2)]
    new = [answer("kc", "a", i, p, "test") for i, p in enumerate([1 / 3, 1 / 3])] + \
          [answer("kc", "b", i, p, "test") for i, p in enumerate([1.0, 0.0])]
    example = report.pick_example(orig, new)
    assert example["question_id"] == "b" and example["rise"] == pytest.approx(0.5)
    assert example["aligned_proxy"] == 1.0 and example["aligned_correct"]
    assert report.pick_example(new, orig) is None             # nothing rose
    assert report.pick_example(orig, orig) is None


def test_reward_margins_skip_trainers_without_rewards(full_run):
    curves = report.train_curves(full_run)
    assert set(curves["trainer"]) == {"dpo"}                  # orpo logs carry no rewards/*
    assert set(curves["metric"]) == {"rewards/margins", "rewards/accuracies"}
    per_model = curves[curves["metric"] == "rewards/margins"].groupby("model")["step"].apply(list)
    assert all(steps == list(range(5, 45, 5)) for steps in per_model)   # the summary entry adds no point


@pytest.fixture(scope="module")
def notebook(full_run, runs_root, tmp_path_factory) -> tuple[subprocess.CompletedProcess, Path]:
    """notebooks/05_figures.ipynb executed by papermill on the synthetic run (its default output
    folder: runs/<run>/figures), as run_all.sh does."""
    executed = tmp_path_factory.mktemp("nb") / "05_figures.ipynb"
    env = dict(os.environ, WOW_RUNS_DIR=str(runs_root), HF_HUB_OFFLINE="1", MPLBACKEND="Agg")
    cmd = [sys.executable, "-m", "papermill", str(paths.REPO_ROOT / "notebooks" / "05_figures.ipynb"),
           str(executed), "-y", f"overrides: {{run: {full_run.root.name}}}", "-k", "python3", "--cwd",
           str(paths.REPO_ROOT / "notebooks"), "--log-level", "WARNING"]
    return subprocess.run(cmd, check=False, env=env, capture_output=True, text=True, timeout=300), executed


@pytest.mark.slow
def test_notebook_05_renders_the_run(full_run, rendered, notebook):
    proc, executed = notebook
    assert proc.returncode == 0, proc.stderr[-3000:]
    nb = json.loads(executed.read_text())
    assert not any(o.get("output_type") == "error" for c in nb["cells"] for o in c.get("outputs", []))
    assert any("image/png" in o.get("data", {}) for c in nb["cells"] for o in c.get("outputs", []))
    figures = full_run.root / "figures"
    _, written = rendered
    assert sorted(p.name for p in figures.iterdir()) == sorted(p.name for p in written)


@pytest.mark.slow
def test_rendering_twice_gives_identical_files(full_run, rendered, notebook):
    """write_report here and notebook 05 in another process render the same bytes (tables and PDFs)."""
    assert notebook[0].returncode == 0, notebook[0].stderr[-3000:]
    _, written = rendered
    for p in written:
        again = full_run.root / "figures" / p.name
        assert again.stat().st_size > 0, p.name
        if p.suffix in (".csv", ".md", ".pdf"):
            assert again.read_bytes() == p.read_bytes(), p.name


def test_a_results_bundle_renders_what_the_run_renders(full_run, rendered, tmp_path):
    """The committed results bundle (report inputs only) gives the same tables and figures as the
    whole run directory, with no model: what the repository's figures/ are re-rendered from."""
    bundle = tmp_path / "bundle"
    copied = report.write_bundle(full_run, bundle)
    assert copied and all(p.stat().st_size > 0 for p in copied)
    assert not list(bundle.glob("samples")) and not list(bundle.rglob("*.safetensors"))
    out = tmp_path / "out"
    assert report.main([str(bundle), "--out", str(out)]) == 0
    _, written = rendered
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in written)
    for p in written:
        if p.suffix in (".csv", ".md", ".pdf"):
            assert (out / p.name).read_bytes() == p.read_bytes(), p.name
    assert report.main([str(tmp_path / "nope")]) == 2


def test_committed_figures_rerender_from_the_committed_bundle(tmp_path):
    """figures/ (the cpu run's) is what results/cpu renders to, with no model and no run."""
    bundle, committed = paths.REPO_ROOT / "results" / "cpu", paths.REPO_ROOT / "figures"
    out = tmp_path / "figures"
    assert report.main([str(bundle), "--out", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in committed.iterdir())
    for p in committed.iterdir():
        if p.suffix in (".csv", ".md", ".pdf"):
            assert (out / p.name).read_bytes() == p.read_bytes(), p.name


def test_a_bundle_refuses_machine_paths_naming_file_and_line(tmp_path, capsys):
    """A bundle is committed: a report input holding an absolute path (here a training log written
    before logs named the base model portably) is refused before anything is copied."""
    run = store.Run(tmp_path / "run")
    store.write_csv(run.root / "models" / "summary.csv", [{"model": "m", "base_model": "smollm2-135m"}])
    store.write_json(run.model("m") / "train_log.json",
                     {"base_model": "/home/alice/.cache/wowlib/models/smollm2-135m-b179c9523d0e6a0f", "history": []})
    dest = tmp_path / "bundle"
    with pytest.raises(report.BundleError, match=r"models/m/train_log.json:2: /home/alice/\.cache/wowlib/models/"):
        report.write_bundle(run, dest)
    assert not dest.exists()
    assert report.main([str(run.root), "--bundle", str(dest)]) == 2
    assert "machine-local absolute paths" in capsys.readouterr().err
    store.write_json(run.model("m") / "train_log.json", {"base_model": "smollm2-135m", "history": []})
    assert sorted(p.relative_to(dest).as_posix() for p in report.write_bundle(run, dest)) == [
        "models/m/train_log.json", "models/summary.csv"]


def test_committed_results_and_figures_hold_no_machine_paths():
    """Every tracked file under results/ and figures/ (git ls-files) is free of absolute paths that
    name a user or this machine's layout (/root/, /home/, /tmp/, /Users/, the repository, ...)."""
    import shutil
    if shutil.which("git") is None or not (paths.REPO_ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    tracked = subprocess.run(["git", "ls-files", "-z", "results", "figures"], cwd=paths.REPO_ROOT, check=True,
                             capture_output=True).stdout.decode().split("\0")
    tracked = [name for name in tracked if name]
    assert tracked, "no tracked files under results/ and figures/"
    found = [f"{name}:{lineno}: {text}" for name in tracked if (paths.REPO_ROOT / name).is_file()
             for lineno, text in store.absolute_paths((paths.REPO_ROOT / name).read_bytes().decode("utf-8", "replace"),
                                                      store.local_roots())]
    assert not found, "machine paths in committed files:\n" + "\n".join(found[:20])


@pytest.mark.parametrize("bundle", ["cpu", "cpu-full"])
def test_committed_executed_notebooks_are_stripped_and_hold_no_secrets(bundle):
    """results/<profile>/notebooks/ holds the run's five executed notebooks as the code and
    parameters that ran, without outputs, execution counts or widget state (the executed copies
    stay in runs/<profile>/notebooks/), with no API key or token (machine paths: the test above)."""
    import re
    folder = paths.REPO_ROOT / "results" / bundle / "notebooks"
    found = sorted(p.name for p in folder.glob("*.ipynb"))
    assert found == [f"{nb}.ipynb" for nb in ("01_sample_wrong", "02_elicit", "03_align", "04_evaluate", "05_figures")]
    for path in folder.glob("*.ipynb"):
        text = path.read_text(encoding="utf-8")
        nb = json.loads(text)
        code = [c for c in nb["cells"] if c["cell_type"] == "code"]
        assert all(not c.get("outputs") and c.get("execution_count") is None for c in code), path.name
        assert "widgets" not in nb["metadata"], path.name
        assert any("injected-parameters" in c["metadata"].get("tags", []) for c in code), path.name
        secrets = re.findall(r"sk-[A-Za-z0-9_-]{16,}|hf_[A-Za-z0-9]{20,}|OPENAI_API_KEY\s*=\s*\S+", text)
        assert not secrets, f"{path.name}: {secrets[:3]}"


def test_a_bundle_strips_executed_notebooks(tmp_path):
    """portable_notebook keeps the code, the injected parameters and papermill's run metadata, and
    drops outputs, execution counts, per-cell timing and widget state; machine folders become short."""
    run_root = tmp_path / "repo" / "runs" / "cpu"
    executed = {"metadata": {"papermill": {"parameters": {"profile": "cpu"}, "output_path": f"{run_root}/notebooks/x"},
                             "widgets": {"state": {}}},
                "cells": [{"cell_type": "code", "execution_count": 3, "source": ["profile = \"cpu\"\n"],
                           "metadata": {"tags": ["injected-parameters"], "execution": {"t": 1}, "papermill": {"d": 2}},
                           "outputs": [{"output_type": "stream", "text": ["hello\n"]},
                                       {"output_type": "display_data", "data": {"image/png": "iVBOR"}}]},
                          {"cell_type": "markdown", "metadata": {}, "source": ["# title"]}]}
    kept = json.loads(report.portable_notebook(json.dumps(executed), run_root))
    code, markdown = kept["cells"]
    assert code["outputs"] == [] and code["execution_count"] is None
    assert code["metadata"] == {"tags": ["injected-parameters"]} and code["source"] == ["profile = \"cpu\"\n"]
    assert markdown == executed["cells"][1]
    assert kept["metadata"] == {"papermill": {"parameters": {"profile": "cpu"}, "output_path": "runs/cpu/notebooks/x"}}


def test_the_default_run_shows_every_item_of_the_paper():
    """figures/ (the committed cpu run) lists every table and figure of the paper's design, none
    skipped, and Figure 2 has at least five points, each with both intervals (the score sets and
    the unfiltered direct sets: the swap-consistent direct sets of the 135M/270M judges are empty)."""
    assert not report.unwritten_items(paths.REPO_ROOT / "figures"), (paths.REPO_ROOT / "figures" / "index.md").read_text()
    points = pd.read_csv(paths.REPO_ROOT / "figures" / "figure2_elicitation_vs_gain.csv")
    assert len(points) >= 5, points
    assert points[["elicitation_low", "elicitation_high", "delta_p_wrong_low", "delta_p_wrong_high"]].notna().all().all(), points
