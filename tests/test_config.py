"""Run profiles (wowlib.config): every committed profile validates, typos and wrong types are
refused with the file, key and notebook named, and the dry-run plan counts what a run will do.
Fast: no model is loaded, no notebook is run."""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from wowlib import config

REPO = Path(__file__).resolve().parent.parent
# A profile is a configs/*.yaml with a `run` key (run_all.sh reads it); the others are not profiles
# (align_example.yaml configures `python -m wowlib.scale.train`; configs/accelerate/ is not globbed).
PROFILES = sorted(p for p in (REPO / "configs").glob("*.yaml") if "run" in (yaml.safe_load(p.read_text()) or {}))


def _run(*args: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=60, check=False,
                          env={**os.environ, "HF_HUB_OFFLINE": "1", **env})


def _profile(tmp_path: Path, **changes) -> Path:
    """configs/smoke.yaml with ``changes`` applied, written to a temporary file."""
    profile = yaml.safe_load((REPO / "configs" / "smoke.yaml").read_text())
    profile.update(changes)
    path = tmp_path / "profile.yaml"
    path.write_text(yaml.safe_dump(profile))
    return path


def _fails(path: Path, capsys) -> str:
    """``python -m wowlib.config <path>`` (in-process) exits 2; returns its message."""
    assert config.main([str(path)]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.startswith("profile error: ")
    return captured.err


def test_committed_profiles_are_found() -> None:
    assert {p.stem for p in PROFILES} >= {"smoke", "cpu", "paper"}
    assert "run" not in yaml.safe_load((REPO / "configs" / "align_example.yaml").read_text())


@pytest.mark.parametrize("path", PROFILES, ids=lambda p: p.stem)
def test_every_committed_profile_validates(path: Path) -> None:
    profile = config.load_profile(path)
    assert profile["run"] == path.stem, "runs/<profile>/ is where run_all.sh and the README put the outputs"
    config.check_names(config.resolved(profile), str(path))
    assert config.main([str(path), "--check"]) == 0


def test_paper_dry_run_prints_the_plan() -> None:
    result = _run(sys.executable, "-m", "wowlib.config", "configs/paper.yaml")
    assert result.returncode == 0, result.stderr
    plan = json.loads(result.stdout)
    for key in ("sampling_calls", "adapters", "gpu_hours_estimate", "judge_calls_upper_bound",
                "training_steps_upper_bound", "evaluation_calls", "generated_tokens_upper_bound"):
        assert plan[key] > 0, key
    assert "tokens/s" in plan["assumptions"] and "GPU" in plan["assumptions"]
    assert set(plan["tasks"]) == set(yaml.safe_load((REPO / "configs" / "paper.yaml").read_text())["tasks"])


def test_check_prints_nothing(capsys) -> None:
    assert config.main(["configs/smoke.yaml", "--check"]) == 0
    assert capsys.readouterr().out == ""


def test_unknown_key_names_file_and_key(tmp_path: Path) -> None:
    path = _profile(tmp_path, n_sample=10)           # a typo of n_samples
    result = _run(sys.executable, "-m", "wowlib.config", str(path), "--check")
    assert result.returncode == 2
    assert str(path) in result.stderr and "'n_sample'" in result.stderr
    assert result.stdout == ""


@pytest.mark.parametrize("key, value, notebook", [
    ("n_samples", "ten", "01_sample_wrong"),
    ("n_samples", 2.5, "01_sample_wrong"),             # a count must be a whole number
    ("n_samples", -1, "01_sample_wrong"),
    ("n_samples", None, "01_sample_wrong"),            # null only where it means "all"
    ("tasks", "kc", "01_sample_wrong"),                # a list, not one name
    ("tasks", None, "01_sample_wrong"),
    ("learning_rates", ["5e-5"], "03_align"),          # YAML reads 5e-5 (no dot) as a string
    ("generalisation", 1, "04_evaluate"),
    ("temperature", "hot", "01_sample_wrong"),
    ("max_pairs", None, "03_align"),                   # no "all": the paper's cap is 4000, say so
    ("extra_sets", "mix oracle kc", "03_align"),       # a list of sets, not one
])
def test_wrong_type_names_key_and_notebook(tmp_path: Path, capsys, key, value, notebook) -> None:
    path = _profile(tmp_path, **{key: value})
    err = _fails(path, capsys)
    assert str(path) in err and repr(key) in err and f"notebooks/{notebook}.ipynb" in err and "should be" in err


@pytest.mark.parametrize("key, value", [
    ("temperature", 1), ("n_questions", None), ("eval_n_questions", None),
    ("text_cap", None), ("learning_rates", [1, 5.0e-5]), ("figures_dir", "figs"),
])
def test_compatible_values_pass(tmp_path: Path, capsys, key, value) -> None:
    assert config.main([str(_profile(tmp_path, **{key: value})), "--check"]) == 0, capsys.readouterr().err


@pytest.mark.parametrize("key, value", [
    ("generators", ["tiny", "gpt-5"]), ("judges", ["nobody"]),
    ("base_model", "no-such-model"), ("tasks", ["kc", "sudoku"]), ("trainers", ["dpo", "ppo"]),
    ("preference_types", ["oracle", "vibes"]), ("controls", ["coin"]), ("sources", ["other"]),
    ("pairwise_modes", ["telepathy"]), ("judge_mode", "guess"), ("eval_splits", ["dev"]),
    ("extraction", "regex"), ("extra_sets", ["mix vibes kc"]), ("align_tasks", ["chess"]),
])
def test_unknown_name_names_the_key(tmp_path: Path, capsys, key, value) -> None:
    path = _profile(tmp_path, **{key: value})
    err = _fails(path, capsys)
    assert str(path) in err and key in err
    bad = value if isinstance(value, str) else value[-1]
    assert bad in err


def test_openai_compatible_models_need_no_spec(tmp_path: Path) -> None:
    path = _profile(tmp_path, generators=["openai:served"], judges=["openai:served"])
    assert config.main([str(path), "--check"]) == 0


@pytest.mark.parametrize("model", ["gpt-4o", "openai:served"])
def test_base_model_must_be_trainable(tmp_path: Path, capsys, model) -> None:
    err = _fails(_profile(tmp_path, base_model=model), capsys)
    assert "base_model" in err and model in err


def test_missing_and_malformed_profiles(tmp_path: Path, capsys) -> None:
    assert "no such profile" in _fails(tmp_path / "nope.yaml", capsys)
    assert "no such profile" in _fails(tmp_path, capsys)          # a directory
    bad = tmp_path / "bad.yaml"
    bad.write_text("tasks: [kc\n")
    assert "not valid YAML" in _fails(bad, capsys)
    bad.write_text("- kc\n- chess\n")
    assert "mapping" in _fails(bad, capsys)


def test_plan_counts_a_small_profile(tmp_path: Path, capsys) -> None:
    # 2 tasks x 3 questions (fewer than any task has, so the same with or without the data),
    # 4 samples, 2 generators; each sample is one answer call plus one extraction call.
    path = _profile(tmp_path, tasks=["kc", "nlgraph_shortest_path"], n_questions=3, n_samples=4,
                    generators=["tiny", "smollm2-135m"], judges=["tiny"], sources=["self"],
                    preference_types=["oracle", "direct"], controls=["random"], trainers=["dpo", "ipo"],
                    learning_rates=[1.0e-5, 5.0e-5, 1.0e-4], lr_schedulers=["linear"], weight_decays=[0.0],
                    epochs=[1, 3], max_pairs=10, score_modes=[], extra_sets=["mix oracle kc"], align_tasks=["kc"],
                    eval_splits=["test"], eval_n_questions=4, eval_n_samples=3)
    assert config.main([str(path)]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert {t: v["train_questions"] for t, v in plan["tasks"].items()} == {"kc": 3, "nlgraph_shortest_path": 3}
    assert plan["sampling_calls"] == 2 * (2 * 3) * 4 * 2 == 96
    sets = 1 * 1 * 3 + 1                               # align tasks x sources x (types + controls) + extra
    grid = 3 * 1 * 1 * 2 * 2                           # lr x scheduler x weight decay x epochs x trainers
    assert plan["preference_sets"] == sets
    assert plan["adapters"] == sets * grid == 48
    assert plan["training_steps_upper_bound"] == sets * grid * 10 * 2   # mean of epochs [1, 3] = 2
    # the original model answers both tasks, kc's 36 adapters and the extra set's 12 answer kc: 4 test
    # questions x 3 samples, each an answer and an extraction call
    assert plan["evaluation_calls"] == (1 + 1 + 36 + 12) * 4 * 3 * 2 == 1200


def _setup_is_current() -> bool:
    """setup.sh's own test: the stamp in .venv matches the requirement files (then it does nothing)."""
    stamp = REPO / ".venv" / ".wowlib-setup"
    want = hashlib.sha256(b"".join((REPO / n).read_bytes() for n in
                                   ("requirements.txt", "requirements-nodeps.txt", "pyproject.toml"))).hexdigest()[:16]
    return stamp.exists() and stamp.read_text().strip() == want


def test_run_all_dry_run_runs_no_notebook(tmp_path: Path) -> None:
    if not _setup_is_current():
        pytest.skip("setup.sh would (re)install .venv: its stamp does not match the requirement files")
    runs = tmp_path / "runs"
    result = _run("./run_all.sh", "paper", "--dry-run", WOW_RUNS_DIR=str(runs))
    assert result.returncode == 0, result.stderr
    assert "setting up .venv" not in result.stdout
    plan = json.loads(result.stdout)                   # the plan and nothing else: no "[1/5] ..." lines
    assert plan["sampling_calls"] > 0 and plan["gpu_hours_estimate"] > 0
    assert not runs.exists()


def test_run_all_refuses_an_unknown_profile() -> None:
    result = _run("./run_all.sh", "no-such-profile", "--dry-run")
    assert result.returncode == 2 and "configs/no-such-profile.yaml" in result.stderr


def test_score_judging_needs_whole_batches_of_five(tmp_path: Path, capsys) -> None:
    """The score judge grades a question's samples in fixed batches of five: n_samples must divide."""
    err = _fails(_profile(tmp_path, n_samples=4, score_modes=["logprob"]), capsys)
    assert "n_samples = 4" in err and "score_modes" in err
    assert "n_samples = 7" in _fails(_profile(tmp_path, n_samples=7, score_modes=["logprob"]), capsys)
    assert config.main([str(_profile(tmp_path, n_samples=4, score_modes=[])), "--check"]) == 0


def test_smoke_is_the_defaults() -> None:
    """The defaults live in wowlib.config alone: configs/smoke.yaml only names its run, and a
    notebook opened as committed (profile "smoke", no overrides) runs them."""
    assert yaml.safe_load((REPO / "configs" / "smoke.yaml").read_text()) == {"run": "smoke"}
    assert config.stage("01_sample_wrong") == config.Sample()
    assert config.resolved({"run": "smoke"}) == config.defaults()


def test_stages_share_one_default_per_key() -> None:
    """A key several notebooks read (tasks, temperature, base_model, ...) has one type and one default."""
    seen: dict = {}
    for cls in config.STAGES.values():
        for f in dataclasses.fields(cls):
            default = f.default_factory() if f.default is dataclasses.MISSING else f.default
            assert seen.setdefault(f.name, (f.type, default)) == (f.type, default), f.name
    assert {"run", "tasks", "temperature", "base_model", "judges"} <= set(seen)


def test_each_stage_has_its_own_seed() -> None:
    """seed: 0 for sampling can never become the training seed (the paper trains with 42)."""
    seeds = {nb: [k for k in config.settings(cls) if k.endswith("seed")] for nb, cls in config.STAGES.items()}
    assert seeds == {"01_sample_wrong": ["sample_seed"], "02_elicit": ["judge_seed"], "03_align": ["align_seed"],
                     "04_evaluate": ["eval_seed"], "05_figures": []}
    assert config.Align().align_seed == 42


def test_stage_takes_overrides_and_checks_them(tmp_path: Path) -> None:
    cpu = config.stage("03_align", "cpu", {"max_pairs": 3})
    assert isinstance(cpu, config.Align) and cpu.max_pairs == 3 and cpu.base_model == "smollm2-135m"
    assert config.stage("04_evaluate", _profile(tmp_path, eval_n_samples=7)).eval_n_samples == 7
    with pytest.raises(config.ProfileError, match=r"overrides: 'n_samples' is not one of its settings"):
        config.stage("03_align", "smoke", {"n_samples": 3})              # a setting of notebook 01, not 03
    with pytest.raises(config.ProfileError, match=r"overrides: 'max_pairs' = None should be a whole number"):
        config.stage("03_align", "smoke", {"max_pairs": None})
    with pytest.raises(config.ProfileError, match=r"base_model.*'nobody'"):
        config.stage("04_evaluate", "smoke", {"base_model": "nobody"})
    with pytest.raises(config.ProfileError, match=r"no such profile"):
        config.stage("01_sample_wrong", "no-such-profile")
    with pytest.raises(config.ProfileError, match=r"no notebook '06_more'"):
        config.stage("06_more")


def _setup_cells(notebook: str) -> tuple[str, str]:
    """The notebook's parameters cell and the cell after it (which turns the settings into the
    objects the stage hands to the library)."""
    cells = [c for c in json.loads((REPO / "notebooks" / f"{notebook}.ipynb").read_text())["cells"]
             if c["cell_type"] == "code"]
    k = next(i for i, c in enumerate(cells) if "parameters" in c["metadata"].get("tags", []))
    return "".join(cells[k]["source"]), "".join(cells[k + 1]["source"])


def _notebook_with(notebook: str, overrides: dict, runs: Path, monkeypatch) -> dict:
    """Run the parameters cell, the cell papermill injects (``-y "overrides: {...}"``) and the
    setup cell, as papermill would; returns the notebook's variables."""
    monkeypatch.setenv("WOW_RUNS_DIR", str(runs))
    params, setup = _setup_cells(notebook)
    namespace: dict = {}
    exec(params, namespace)
    assert namespace["profile"] == "smoke" and namespace["overrides"] == {}
    namespace["overrides"] = overrides
    exec(setup, namespace)
    return namespace


def test_override_reaches_the_library_01(tmp_path, monkeypatch) -> None:
    ns = _notebook_with("01_sample_wrong", {"n_samples": 10, "sample_seed": 9, "chess_depth": 4}, tmp_path, monkeypatch)
    assert [(c.n_samples, c.seed, c.task_options["chess"]["depth"]) for c in ns["configs"]] == [(10, 9, 4)]


def test_override_reaches_the_library_02(tmp_path, monkeypatch) -> None:
    ns = _notebook_with("02_elicit", {"text_cap": 2, "judge_seed": 5, "pairwise_modes": ["text"]}, tmp_path, monkeypatch)
    args = ns["judge_args"]
    assert args["caps"]["text"] == 2 and args["seed"] == 5 and args["pairwise_modes"] == ["text"]
    import inspect
    from wowlib import judge
    assert set(args) <= set(inspect.signature(judge.run_judging).parameters)


def test_override_reaches_the_library_03(tmp_path, monkeypatch) -> None:
    ns = _notebook_with("03_align", {"max_pairs": 3, "align_seed": 7, "score_top_p": 0.1}, tmp_path, monkeypatch)
    assert {(s.cap, s.seed, s.top_p) for s in ns["specs"]} == {(3, 7, 0.1)}


def test_override_reaches_the_library_04(tmp_path, monkeypatch) -> None:
    ns = _notebook_with("04_evaluate", {"eval_n_samples": 2, "eval_seed": 3, "generalisation": False},
                        tmp_path, monkeypatch)
    c = ns["config"]
    assert (c.n_samples, c.seed, c.generalisation) == (2, 3, None)


def test_override_reaches_the_library_05(tmp_path, monkeypatch) -> None:
    ns = _notebook_with("05_figures", {"figures_dir": str(tmp_path / "mine"), "run": "other"}, tmp_path, monkeypatch)
    assert ns["out"] == tmp_path / "mine" and ns["run_dir"].root == tmp_path / "other"


@pytest.mark.parametrize("notebook", config.NOTEBOOKS)
def test_a_bad_override_stops_the_first_cell(notebook, tmp_path, monkeypatch) -> None:
    with pytest.raises(config.ProfileError, match=r"'no_such_key' is not one of its settings"):
        _notebook_with(notebook, {"no_such_key": 1}, tmp_path, monkeypatch)


def test_papermill_shows_the_typed_parameters() -> None:
    result = _run(sys.executable, "-m", "papermill", "--help-notebook", "notebooks/03_align.ipynb")
    assert result.returncode == 0, result.stderr
    assert "profile: str" in result.stdout and "overrides: dict" in result.stdout, result.stdout


def test_notebook_05_reads_the_committed_results(tmp_path, monkeypatch) -> None:
    """The README's "Just look": notebook 05 with overrides {"run": "../results/cpu"} reads the
    committed results, whether or not runs/ exists."""
    monkeypatch.delenv("WOW_RUNS_DIR", raising=False)
    params, setup = _setup_cells("05_figures")
    namespace: dict = {}
    exec(params, namespace)
    namespace["overrides"] = {"run": "../results/cpu"}
    exec(setup, namespace)
    assert namespace["run_dir"].root == REPO / "results" / "cpu"
    assert (namespace["run_dir"].root / "eval" / "improvements.csv").is_file()
