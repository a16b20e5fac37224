"""Run profiles (``configs/<profile>.yaml``): validation and a dry-run plan.

A profile is a flat mapping of papermill parameters; every key must be a parameter of at least one
notebook (a typo would otherwise be ignored by papermill) and have the type of its default. The
dry run then checks the names a run will need (models, tasks, trainers, preference types) and
prints what the run will cost: calls, generated tokens, training steps and a rough GPU-hour
estimate, without loading a model.

    python -m wowlib.config configs/paper.yaml          # validate and print the plan
    python -m wowlib.config configs/cpu.yaml --check    # validate only (run_all.sh does this)
"""
from __future__ import annotations

import argparse
import ast
import json
import math
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from . import paths

NOTEBOOKS = ("01_sample_wrong", "02_elicit", "03_align", "04_evaluate", "05_figures")
# Rough throughput for the GPU-hour estimate (stated assumptions, not measurements): an 8B model
# on one A100-80GB with vLLM, batched sampling; LoRA DPO on ~600-token pairs.
GPU_TOKENS_PER_SECOND = 2000.0
GPU_SECONDS_PER_PAIR = 1.0
PAPER_TRAIN_QUESTIONS = 500            # 625 sampled x 8:1:1; used when a dataset is not present
# Counts and caps where null means "all" (any other null would only fail later, inside a notebook).
NULLABLE = frozenset({"n_questions", "eval_n_questions", "text_cap", "logprob_cap"})


class ProfileError(ValueError):
    """A profile that cannot run; the message names the file and the key."""


def notebook_parameters() -> dict[str, dict[str, Any]]:
    """Each notebook's parameters cell as {name: default} (read from the committed notebooks)."""
    out = {}
    for name in NOTEBOOKS:
        path = paths.REPO_ROOT / "notebooks" / f"{name}.ipynb"
        if not path.exists():
            continue
        cells = json.loads(path.read_text())["cells"]
        cell = next(c for c in cells if "parameters" in c.get("metadata", {}).get("tags", []))
        tree = ast.parse("".join(cell["source"]))
        out[name] = {node.targets[0].id: ast.literal_eval(node.value) for node in tree.body
                     if isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Name)}
    return out


def _same_type(value: Any, default: Any) -> bool:
    """``value`` can stand where the notebook has ``default``: a float default takes an int, but an
    int default (a count, a length, a seed) takes only an int >= 0, and a list takes only elements
    like the default's (YAML reads ``5e-5`` without a dot as a string). Null only where the
    default is null (``NULLABLE`` keys are let through by the caller)."""
    if default is None:
        return True
    if value is None:
        return False
    if isinstance(default, bool) or isinstance(value, bool):
        return isinstance(default, bool) and isinstance(value, bool)
    if isinstance(default, int):
        return isinstance(value, int) and value >= 0
    if isinstance(default, float):
        return isinstance(value, (int, float))
    if isinstance(default, list) and isinstance(value, list) and default:
        return all(any(_same_type(v, d) for d in default) for v in value)
    return isinstance(value, type(default))


def load_profile(path: str | Path) -> dict[str, Any]:
    """The profile's parameters, checked against the notebooks' parameter cells."""
    path = Path(path)
    if not path.is_file():
        raise ProfileError(f"{path}: no such profile")
    try:
        profile = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ProfileError(f"{path}: not valid YAML ({e})") from e
    if not isinstance(profile, dict):
        raise ProfileError(f"{path}: expected a mapping of parameter: value")
    params = notebook_parameters()
    for key, value in profile.items():
        owners = [nb for nb, p in params.items() if key in p]
        if not owners:
            known = sorted({k for p in params.values() for k in p})
            raise ProfileError(f"{path}: {key!r} is not a parameter of any notebook (known: {', '.join(known)})")
        for nb in owners:
            default = params[nb][key]
            if not (value is None and key in NULLABLE) and not _same_type(value, default):
                kind = ("a whole number >= 0, " if isinstance(default, int) and not isinstance(default, bool)
                        else "a list with elements " if isinstance(default, list) else "")
                raise ProfileError(f"{path}: {key!r} = {value!r} should be {kind}like {default!r} "
                                   f"(the default in notebooks/{nb}.ipynb)")
    return profile


def resolved(profile: Mapping[str, Any]) -> dict[str, Any]:
    """Every parameter a run will use: the notebooks' defaults overridden by the profile."""
    merged: dict[str, Any] = {}
    for p in notebook_parameters().values():
        merged.update(p)
    merged.update(profile)
    return merged


def check_names(p: Mapping[str, Any], where: str) -> None:
    """Models, tasks, trainers and preference types exist (no model is loaded)."""
    from .align import TRAINERS
    from .llm.models import get_spec
    from .prefs import TYPES
    from .tasks.base import SPLITS
    from .tasks.registry import task_names
    _model(p["base_model"], f"{where}: base_model", get_spec)
    base = p["base_model"]
    if base.startswith("openai:") or get_spec(base).backend == "openai":
        raise ProfileError(f"{where}: base_model: {base!r} is served over an API; notebook 03 trains LoRA "
                           "adapters on local weights (a named hf model)")
    for key in ("generators", "judges"):
        for name in p[key]:
            _model(name, f"{where}: {key}", get_spec)
    for name in p["tasks"]:
        if name not in task_names():
            raise ProfileError(f"{where}: tasks: unknown task {name!r} (known: {', '.join(task_names())})")
    for key, allowed in (("trainers", TRAINERS), ("preference_types", TYPES), ("controls", TYPES),
                         ("sources", ("self", "mix")), ("pairwise_modes", ("logprob", "text")),
                         ("score_modes", ("logprob", "text")), ("eval_splits", SPLITS)):
        bad = [v for v in p[key] if v not in allowed]
        if bad:
            raise ProfileError(f"{where}: {key}: {bad} not in {list(allowed)}")
    from .evaluate import generalisation_pairs
    try:
        generalisation_pairs(p["generalisation_pairs"])
    except ValueError as err:
        raise ProfileError(f"{where}: generalisation_pairs: {err}") from None
    if bad := [t for t in p["align_tasks"] if t not in p["tasks"]]:
        raise ProfileError(f"{where}: align_tasks: {bad} are not sampled (tasks: {p['tasks']})")
    from .prefs import plan_sets
    try:
        specs = plan_sets(p["align_tasks"], p["preference_types"] + p["controls"], p["judges"][0] if p["judges"]
                          else None, p["extra_sets"], p["sources"], judge_mode=p["judge_mode"])
    except ValueError as err:
        raise ProfileError(f"{where}: extra_sets: {err}") from None
    for spec in specs:
        if bad := [t for t in spec.tasks if t not in p["tasks"]]:
            raise ProfileError(f"{where}: extra_sets: {spec.name} needs tasks {bad} that are not sampled")
    if p["judge_mode"] not in ("logprob", "text"):
        raise ProfileError(f"{where}: judge_mode must be 'logprob' or 'text', got {p['judge_mode']!r}")
    from .sample import EXTRACTIONS
    if p["extraction"] not in EXTRACTIONS:
        raise ProfileError(f"{where}: extraction must be one of {list(EXTRACTIONS)}, got {p['extraction']!r}")
    from .judge import BATCH
    if p["score_modes"] and p["n_samples"] % BATCH:
        raise ProfileError(f"{where}: n_samples = {p['n_samples']}: the score judge grades the samples of a question "
                           f"in fixed batches of {BATCH}, so score_modes {p['score_modes']} need n_samples divisible "
                           f"by {BATCH} (or score_modes: [])")


def _model(name: str, where: str, get_spec) -> None:
    if name.startswith("openai:"):
        return
    try:
        get_spec(name)
    except KeyError as e:
        raise ProfileError(f"{where}: {e.args[0]}") from None


def _train_questions(task: str, n: int | None) -> tuple[int, bool]:
    """Questions per task in D_train (from the data when present, else the paper's ~500)."""
    from .tasks import get_task
    try:
        available = len(get_task(task).splits()["train"])
    except (FileNotFoundError, OSError, KeyError):
        return (min(n, PAPER_TRAIN_QUESTIONS) if n else PAPER_TRAIN_QUESTIONS), False
    return (min(n, available) if n else available), True


def plan(p: Mapping[str, Any]) -> dict[str, Any]:
    """Upper bounds on the work of a run (before any answer exists, WoW pairs are bounded by
    every pair of samples)."""
    q_train = {t: _train_questions(t, p["n_questions"]) for t in p["tasks"]}
    q_eval = {t: max(1, (q + 7) // 8) if p["eval_n_questions"] is None else p["eval_n_questions"]
              for t, (q, _) in q_train.items()}
    from .judge import BATCH
    n, gens, judges = p["n_samples"], len(p["generators"]), len(p["judges"])
    answers = sum(q for q, _ in q_train.values()) * n * gens
    pairs = sum(q for q, _ in q_train.values()) * math.comb(n, 2)
    text_pairs = sum(min(q * math.comb(n, 2), p["text_cap"] or math.inf) for q, _ in q_train.values())
    judge_calls = judges * gens * (2 * (pairs * ("logprob" in p["pairwise_modes"])
                                        + text_pairs * ("text" in p["pairwise_modes"]))
                                   + math.ceil(answers / gens / BATCH) * len(p["score_modes"]))
    grid = (len(p["learning_rates"]) * len(p["lr_schedulers"]) * len(p["weight_decays"]) * len(p["epochs"])
            * len(p["trainers"]))
    sets_per_task = len(p["sources"]) * len(set(p["preference_types"]) | set(p["controls"]))
    sets = len(p["align_tasks"]) * sets_per_task + len(p["extra_sets"])
    steps = sets * grid * p["max_pairs"] * sum(p["epochs"]) / len(p["epochs"])
    # each adapter answers its own task's evaluation splits (the original model every task's), answer +
    # extraction; the extra sets are counted on one task each
    models_on = {t: 1 + sets_per_task * grid * (t in p["align_tasks"]) for t in q_eval}
    questions = sum(models_on[t] * q for t, q in q_eval.items()) \
        + len(p["extra_sets"]) * grid * max(q_eval.values(), default=0)
    eval_calls = questions * len(p["eval_splits"]) * p["eval_n_samples"] * 2
    gen_tokens = (answers + eval_calls) * (p["max_new_tokens"] + 32) + judge_calls * 64
    return {
        "tasks": {t: {"train_questions": q, "from_data": ok} for t, (q, ok) in q_train.items()},
        "sampling_calls": 2 * answers, "judge_calls_upper_bound": judge_calls,
        "preference_sets": sets, "adapters": sets * grid, "training_steps_upper_bound": int(steps),
        "evaluation_calls": int(eval_calls), "generated_tokens_upper_bound": int(gen_tokens),
        "gpu_hours_estimate": round((gen_tokens / GPU_TOKENS_PER_SECOND + steps * GPU_SECONDS_PER_PAIR) / 3600, 1),
        "assumptions": f"{GPU_TOKENS_PER_SECOND:g} generated tokens/s and {GPU_SECONDS_PER_PAIR:g} s per "
                       "training pair on one A100-class GPU (rough; API judges not counted as GPU time)",
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m wowlib.config", description=__doc__.split("\n\n")[0])
    parser.add_argument("profile", help="configs/<profile>.yaml")
    parser.add_argument("--check", action="store_true", help="validate only, print nothing on success")
    parser.add_argument("--notebook", help="print (as YAML) only the profile keys this notebook takes")
    args = parser.parse_args(argv)
    try:
        profile = load_profile(args.profile)
        p = resolved(profile)
        check_names(p, args.profile)
    except ProfileError as e:
        print(f"profile error: {e}", file=sys.stderr)
        return 2
    if args.notebook:
        own = notebook_parameters().get(args.notebook)
        if own is None:
            print(f"profile error: no notebook {args.notebook!r} (known: {', '.join(NOTEBOOKS)})", file=sys.stderr)
            return 2
        print(yaml.safe_dump({k: v for k, v in profile.items() if k in own}, sort_keys=False), end="")
    elif not args.check:
        print(json.dumps(plan(p), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
