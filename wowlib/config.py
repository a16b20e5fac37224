"""Run settings: one typed dataclass per stage, filled from a profile (``configs/<profile>.yaml``).

A profile is a flat YAML mapping (as trl's recipe files are): each key is a field of one or more
stage dataclasses below (``Sample`` for notebook 01, ``Elicit`` 02, ``Align`` 03, ``Evaluate`` 04,
``Figures`` 05; a key several stages read, like ``tasks``, is one field of a shared base), and
every value is checked against the field's type before any notebook runs: an unknown key, a
wrong type, a null where the field takes none and an unknown name (model, task, trainer, ...) are
refused with the profile, the key and what was expected. The defaults below are the only ones:
they are the smoke setting (``configs/smoke.yaml`` sets nothing else), so a notebook opened in
JupyterLab runs in minutes. A notebook's parameters cell names a profile and its own overrides;
``stage(notebook, profile, overrides)`` returns its settings.

    python -m wowlib.config configs/paper.yaml          # validate and print the plan
    python -m wowlib.config configs/cpu.yaml --check    # validate only (run_all.sh does this)
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from . import paths


Mode = Literal["logprob", "text"]


class ProfileError(ValueError):
    """A profile that cannot run; the message names the file and the key."""


def _list(*values: Any) -> Any:
    return field(default_factory=lambda: list(values))


# ---------------------------------------------------------------------------- settings, by stage
# Shared bases first: a key that several stages read is declared (with its default) once.

@dataclass(frozen=True)
class _Run:
    run: str = "smoke"                       # runs/<run>/ holds every output of the run


@dataclass(frozen=True)
class _Answers(_Run):
    generators: list[str] = _list("tiny")   # each samples its own answers (paper: Llama-3-8B, GPT-3.5, GPT-4o)
    tasks: list[str] = _list("kc", "nlgraph_shortest_path")


@dataclass(frozen=True)
class _Decoding(_Run):
    temperature: float = 1.0                 # paper: 1.0
    max_new_tokens: int = 64                 # paper: 1024
    stop_on_repeat: bool = True              # end a reply that loops (one span over and over; paper: no such rule)
    extraction: Literal["text", "constrained"] = "constrained"   # final answer: "text" (the paper's: the
    # free reply parsed) or "constrained" (the answer's form forced, wowlib.sample)


@dataclass(frozen=True)
class _Judges(_Run):
    judges: list[str] = _list("tiny")       # every judge sees every generator's answers


@dataclass(frozen=True)
class _BaseModel(_Run):
    base_model: str = "tiny"                 # the model that is aligned and evaluated


@dataclass(frozen=True)
class Sample(_Decoding, _Answers):
    """Notebook 01: sample answers to D_train."""
    n_questions: int | None = 6              # per task, from D_train (None: all; paper: all)
    n_samples: int = 5                       # per question and generator (paper: 10)
    chess_depth: int = 8                     # Stockfish depth for the chess proxy (paper: 2 s per position)
    sample_seed: int = 0                     # sampling draws and option orders


@dataclass(frozen=True)
class Elicit(_Judges, _Answers):
    """Notebook 02: judge the wrong-over-wrong pairs, score the elicitation methods (Table 1)."""
    pairwise_modes: list[Mode] = _list("logprob", "text")   # logprob: "1"/"2" from next-token log-probs;
    score_modes: list[Mode] = _list("logprob", "text")      # text: a reply with a parsed verdict
    text_cap: int | None = 6                 # WoW pairs per (generator, judge, task) judged in text mode (paper: 10,000)
    logprob_cap: int | None = None           # the same in log-prob mode (None: all)
    judge_max_new_tokens: int = 64           # text-mode pairwise reply length (official code: 256)
    score_max_new_tokens: int = 160          # text-mode score reply, five reasonings (official code: 1024)
    margins: list[float] = _list(1.0, 0.5, 0.1)
    judge_seed: int = 0                      # which pairs a cap keeps; the intervals' resamples


@dataclass(frozen=True)
class Align(_BaseModel, _Judges):
    """Notebook 03: build the preference sets and train one LoRA adapter per set and config."""
    align_tasks: list[str] = _list("kc", "nlgraph_shortest_path")   # tasks with preference sets and adapters
    judge_mode: Mode = "logprob"             # which of notebook 02's judgments label the direct/score sets
    preference_types: list[str] = _list("oracle", "direct", "score", "row")
    controls: list[str] = _list("random", "sft_wrong")
    sources: list[Literal["self", "mix"]] = _list("self")   # "mix": every generator's answers
    # more sets, each "<self|mix> <type>[@<judge>] <task>": e.g. "mix oracle kc", "self score@gemma3-270m kc"
    extra_sets: list[str] = _list("self row+oracle kc", "mix oracle kc", "self score@tiny:text kc",
                                  "self score@tiny:text nlgraph_shortest_path", "self direct kc unfiltered",
                                  "self direct nlgraph_shortest_path unfiltered")
    score_top_p: float = 0.5                 # score sets: share of pairs kept, largest gap first (paper: 0.5, 0.1)
    max_pairs: int = 16                      # per preference set, a seeded sample (paper: 4000)
    trainers: list[str] = _list("dpo")      # dpo ipo rso sppo cpo simpo orpo
    learning_rates: list[float] = _list(5e-5, 5e-4)   # the grid: lr x scheduler x weight decay x epochs
    lr_schedulers: list[str] = _list("linear")
    weight_decays: list[float] = _list(0.0)
    epochs: list[int] = _list(1)            # paper: 3
    beta: float = 0.1                        # paper: 0.1
    max_length: int = 1024                   # prompt + answer tokens (trl drops pairs whose prompt alone is longer)
    activation_checkpointing: bool = False   # recompute activations in backward: less memory, more time
    precision: Literal["auto", "bf16", "fp32"] = "auto"   # auto: bf16 autocast where the CPU or GPU has bf16
    seconds_per_pair: float = 0.3            # measured training speed, for the cost estimate only
    align_seed: int = 42                     # preference-set sampling and training (the paper's: 42)


@dataclass(frozen=True)
class Evaluate(_Decoding, _BaseModel):
    """Notebook 04: every model answers D_val / D_test with the protocol of notebook 01."""
    eval_splits: list[Literal["train", "val", "test"]] = _list("val", "test")
    eval_n_questions: int | None = 6         # per task and split (None: all; paper: all, ~60)
    eval_n_samples: int = 5                  # per question and model (paper: 10)
    generalisation: bool = True              # also an unseen task of the same domain (shortest path -> max flow)
    generalisation_pairs: list[str] = _list()   # "train->unseen" ([]: all known pairs)
    n_resamples: int = 1000                  # bootstrap resamples for every interval
    tokens_per_second: int = 2000            # measured decoding speed, for the cost estimate only
    eval_seed: int = 0                       # sampling draws and option orders (the same for every model)


@dataclass(frozen=True)
class Figures(_Run):
    """Notebook 05: every table and figure from the run directory."""
    figures_dir: str | None = None           # None: runs/<run>/figures; relative: from the repository root


STAGES: dict[str, type] = {"01_sample_wrong": Sample, "02_elicit": Elicit, "03_align": Align,
                           "04_evaluate": Evaluate, "05_figures": Figures}
NOTEBOOKS = tuple(STAGES)


def settings(cls: type) -> dict[str, Any]:
    """A stage's fields with their types (resolved annotations)."""
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def defaults() -> dict[str, Any]:
    """Every key's default (the smoke setting)."""
    return {k: v for cls in STAGES.values() for k, v in dataclasses.asdict(cls()).items()}


# ---------------------------------------------------------------------------- type checks

def _expected(hint: Any) -> str:
    """What a value of type ``hint`` looks like, in words."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(["null" if a is type(None) else _expected(a) for a in args])
    if origin is Literal:
        return "one of " + ", ".join(map(repr, args))
    if origin is list:
        return f"a list, each {_expected(args[0])}"
    return {bool: "true or false", int: "a whole number >= 0", float: "a number", str: "a string"}[hint]


def _fits(value: Any, hint: Any) -> bool:
    """``value`` (as YAML read it) has type ``hint``: an int field takes only a whole number >= 0 (a
    count, a length, a seed), a float field also an int, never a bool or a string (YAML reads
    ``5e-5`` without a dot as a string); null only where the field is optional."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_fits(value, a) for a in args)
    if hint is type(None):
        return value is None
    if origin is Literal:
        return isinstance(value, str) and value in args
    if origin is list:
        return isinstance(value, list) and all(_fits(v, args[0]) for v in value)
    if isinstance(value, bool) or hint is bool:
        return hint is bool and isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and value >= 0
    if hint is float:
        return isinstance(value, (int, float))
    return isinstance(value, hint)


def _check(where: str, key: str, value: Any, hint: Any, notebook: str) -> None:
    if not _fits(value, hint):
        raise ProfileError(f"{where}: {key!r} = {value!r} should be {_expected(hint)} "
                           f"(a setting of notebooks/{notebook}.ipynb, wowlib.config.{STAGES[notebook].__name__})")


# ---------------------------------------------------------------------------- profiles

def profile_path(profile: str | Path) -> Path:
    """A profile name (configs/<name>.yaml) or a path to a YAML file."""
    candidate = Path(profile).expanduser()
    if candidate.suffix in (".yaml", ".yml") or candidate.parent != Path("."):
        return candidate if candidate.is_absolute() or candidate.exists() else paths.REPO_ROOT / candidate
    return paths.REPO_ROOT / "configs" / f"{profile}.yaml"


def load_profile(path: str | Path) -> dict[str, Any]:
    """The profile's keys, each checked against the type of the stage field it sets."""
    path = Path(path)
    if not path.is_file():
        raise ProfileError(f"{path}: no such profile")
    try:
        profile = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ProfileError(f"{path}: not valid YAML ({e})") from e
    if not isinstance(profile, dict):
        raise ProfileError(f"{path}: expected a mapping of setting: value")
    by_stage = {nb: settings(cls) for nb, cls in STAGES.items()}
    for key, value in profile.items():
        owners = [nb for nb, hints in by_stage.items() if key in hints]
        if not owners:
            known = sorted({k for hints in by_stage.values() for k in hints})
            raise ProfileError(f"{path}: {key!r} is not a setting of any stage (known: {', '.join(known)})")
        _check(str(path), key, value, by_stage[owners[0]][key], owners[0])
    return profile


def resolved(profile: Mapping[str, Any]) -> dict[str, Any]:
    """Every setting a run will use: the defaults overridden by the profile."""
    return {**defaults(), **profile}


def stage(notebook: str, profile: str | Path = "smoke", overrides: Mapping[str, Any] | None = None) -> Any:
    """The settings of ``notebook`` (e.g. "01_sample_wrong"): the profile's values for its fields,
    then ``overrides`` (the notebook's own parameters cell), each checked; the whole profile is
    checked too (names of models, tasks, trainers, ...), so a bad value fails here, in the first
    cell, not in the middle of a stage."""
    if notebook not in STAGES:
        raise ProfileError(f"no notebook {notebook!r} (known: {', '.join(STAGES)})")
    cls, path = STAGES[notebook], profile_path(profile)
    values = load_profile(path)
    hints = settings(cls)
    overrides = dict(overrides or {})
    for key, value in overrides.items():
        if key not in hints:
            raise ProfileError(f"notebooks/{notebook}.ipynb: overrides: {key!r} is not one of its settings "
                               f"(they are: {', '.join(hints)})")
        _check(f"notebooks/{notebook}.ipynb: overrides", key, value, hints[key], notebook)
    check_names(resolved({**values, **overrides}), str(path) + (" with the overrides" if overrides else ""))
    return cls(**{k: v for k, v in {**values, **overrides}.items() if k in hints})


def check_names(p: Mapping[str, Any], where: str) -> None:
    """Models, tasks, trainers and preference types exist, and the stages agree (no model is
    loaded); the fixed choices (modes, splits, extraction, ...) are the fields' types."""
    from .align import TRAINERS
    from .llm.models import get_spec
    from .prefs import TYPES
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
    for key, allowed in (("trainers", TRAINERS), ("preference_types", TYPES), ("controls", TYPES)):
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m wowlib.config", description=__doc__.split("\n\n")[0])
    parser.add_argument("profile", help="configs/<profile>.yaml")
    parser.add_argument("--check", action="store_true", help="validate only, print nothing on success")
    args = parser.parse_args(argv)
    try:
        profile = load_profile(args.profile)
        p = resolved(profile)
        check_names(p, args.profile)
    except ProfileError as e:
        print(f"profile error: {e}", file=sys.stderr)
        return 2
    if not args.check:
        from .scale.plan import plan
        print(json.dumps(plan(p), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
