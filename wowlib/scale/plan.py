"""What a run will cost, before any answer exists: calls, generated tokens, training steps and a
rough GPU-hour estimate from a profile's settings (``python -m wowlib.config <profile>`` prints it;
``./run_all.sh <profile> --dry-run`` too). No model is loaded."""
from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

# Rough throughput for the GPU-hour estimate (stated assumptions, not measurements): an 8B model
# on one A100-80GB with vLLM, batched sampling; LoRA DPO on ~600-token pairs.
GPU_TOKENS_PER_SECOND = 2000.0
GPU_SECONDS_PER_PAIR = 1.0
PAPER_TRAIN_QUESTIONS = 500            # 625 sampled x 8:1:1; used when a dataset is not present


def _train_questions(task: str, n: int | None) -> tuple[int, bool]:
    """Questions per task in D_train (from the data when present, else the paper's ~500)."""
    from ..tasks import get_task
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
    from ..judge import BATCH
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
