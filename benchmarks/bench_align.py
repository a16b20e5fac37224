"""Alignment throughput, side by side in ONE run: today's path against each change and all together.

    .venv/bin/python benchmarks/bench_align.py                  # SmolLM2-135M, 64 NLGraph pairs (~25 min, 2 cores)
    .venv/bin/python benchmarks/bench_align.py --pairs 8 --quick  # a smoke check of the script (minutes)

Every row trains the same LoRA DPO adapter (r=16, one epoch, batch 1: the paper's) on the same pairs, in a
fresh process (so the peak RSS is the row's own), and reports pairs/s, the ratio to the first row, the peak
RSS and the model FLOPs utilisation: (6 N T_policy + 2 N T_reference) / seconds over the matmul rate of the
row's precision measured in the same run. N counts the parameters a token is multiplied by: the layers, and
the LM head (tied to the 28M-parameter embedding) only for the tokens projected through it (every position
in trl's forward, the answers' tokens when packed); T: the tokens the row computes (both sequences of each
pair as trl builds them, or, packed, each prompt once; padding not counted). Rows, cumulative:

1. ``baseline``: the cpu profile before this benchmark: fp32, activation checkpointing, trl's two
   sequences per pair, the reference log-probs computed by the run itself;
2. without activation checkpointing;
3. packed pairs (``align.pack_pairs``): the prompt once per pair, only the answers through the LM head;
4. bf16 autocast (fp32 LoRA master weights);
5. a second configuration on the same data reading the reference log-probs the first one computed
   (``align.ReferenceCache``): what every configuration of a grid after the first costs, and every other
   DPO-family loss;
6. bf16 and packed pairs WITH activation checkpointing: the memory floor.

Then the reward-margin curves of the fp32 and the bf16 run (same data, seed and steps): the largest
difference of their smoothed curves against the spread of the fp32 curve's raw points.
Rows are appended to ``benchmarks/results_align.csv`` with the CPU name and library versions.
"""
from __future__ import annotations

import argparse
import csv
import json
import multiprocessing
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")

RESULTS = REPO / "benchmarks" / "results_align.csv"
VARIANTS = {                       # name -> (AlignConfig changes, reuse the reference of a first run)
    "baseline": ({"precision": "fp32", "activation_checkpointing": True, "packed": False}, False),
    "fp32, no checkpointing": ({"precision": "fp32", "packed": False}, False),
    "fp32, no checkpointing, packed pairs": ({"precision": "fp32"}, False),
    "bf16, no checkpointing, packed pairs": ({"precision": "bf16"}, False),
    "bf16, no checkpointing, packed pairs, shared reference": ({"precision": "bf16"}, True),
    "bf16, checkpointing, packed pairs": ({"precision": "bf16", "activation_checkpointing": True}, False),
}


def bench_pairs(model: str, n_pairs: int, max_new_tokens: int, seed: int = 0) -> list[dict]:
    """WoW-shaped pairs on NLGraph shortest path: the paper's prompt and two of the model's own
    sampled answers (so lengths are the pipeline's), cached under the cache directory."""
    from wowlib import paths, store
    from wowlib.llm.base import Decoding
    from wowlib.llm.models import load_llm
    from wowlib.sample import answer_requests
    from wowlib.tasks import get_task
    cache = paths.cache_dir() / "bench" / f"align-pairs-{model}-{n_pairs}-{max_new_tokens}-{seed}.json"
    if cache.exists():
        return json.loads(cache.read_text())
    task = get_task("nlgraph_shortest_path")
    questions = task.questions("train", n_pairs)
    requests, meta = answer_requests(task, questions, 2, Decoding(temperature=1.0, max_new_tokens=max_new_tokens), seed)
    answers = load_llm(model).run_batch(requests)
    pairs = [{"prompt": task.prompt(q), "chosen": answers[2 * k].text, "rejected": answers[2 * k + 1].text}
             for k, q in enumerate(questions)]
    store.write_json(cache, pairs)
    return pairs


def token_counts(model_dir, pairs: list[dict]) -> tuple[int, int, int, int]:
    """(tokens of every chosen and rejected sequence as trl builds them, the padding that batch-1
    steps add to them, the tokens of the packed sequences: each prompt once, the answers' tokens)."""
    from wowlib.align import load_tokenizer
    tokenizer = load_tokenizer(model_dir)
    total = padding = packed = answers = 0
    for p in pairs:
        prompt = [{"role": "user", "content": p["prompt"]}]
        head = len(tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True,
                                                 return_dict=True)["input_ids"])
        lengths = [len(tokenizer.apply_chat_template(prompt + [{"role": "assistant", "content": p[k]}], tokenize=True,
                                                     return_dict=True)["input_ids"]) for k in ("chosen", "rejected")]
        total += sum(lengths)
        padding += 2 * max(lengths) - sum(lengths)
        packed += sum(lengths) - head
        answers += sum(lengths) - 2 * head
    return total, padding, packed, answers


def run_variant(name: str, args, model_dir: str, pairs: list[dict], work: str) -> dict:
    """One row, in its own process: train, time it, read the peak RSS."""
    import resource

    import torch

    from wowlib import align
    torch.set_num_threads(args.threads)
    changes, reuse = VARIANTS[name]
    config = align.AlignConfig(trainer="dpo", num_train_epochs=1, learning_rate=args.lr, logging_steps=1,
                               max_length=args.max_length, **changes)
    slug = name.replace(", ", "-").replace(" ", "_")
    cache = align.ReferenceCache(Path(work) / slug / ".reference")      # each row its own: nothing shared by accident
    if reuse:      # the reference computed by a first configuration on the same data (not timed)
        first = align.AlignConfig(**{**config.to_dict(), "learning_rate": args.lr * 2})
        align.train(first, model_dir, pairs, Path(work) / slug / "first", reference_cache=cache)
    start = time.perf_counter()
    out = align.train(config, model_dir, pairs, Path(work) / slug / "adapter", reference_cache=cache)
    seconds = time.perf_counter() - start
    train_log = align.read_log(out)
    return {"variant": name, "seconds": seconds, "train_seconds": train_log["train_seconds"],
            "precision": train_log["precision"], "reference": train_log["reference"],
            "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 ** 2,
            "margins": align.history(train_log, "rewards/margins")}


def matmul_gflops(threads: int, dtype: str = "fp32", n: int = 2048, reps: int = 10) -> float:
    import torch
    torch.set_num_threads(threads)
    kind = torch.bfloat16 if dtype == "bf16" else torch.float32
    a, b = torch.randn(n, n, dtype=kind), torch.randn(n, n, dtype=kind)
    for _ in range(3):
        a @ b
    start = time.perf_counter()
    for _ in range(reps):
        a @ b
    return 2 * n ** 3 * reps / (time.perf_counter() - start) / 1e9


def smoothed(values: list[float], window: int) -> list[float]:
    out = []
    for k in range(len(values)):
        part = values[max(0, k - window + 1):k + 1]
        out.append(sum(part) / len(part))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--pairs", type=int, default=64)
    parser.add_argument("--answer-tokens", type=int, default=256, help="max new tokens of the sampled answers")
    parser.add_argument("--max-length", type=int, default=1024)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--quick", action="store_true", help="8 pairs of 64-token answers")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    if args.quick:
        args.pairs, args.answer_tokens = 8, 64
    from wowlib import store
    from wowlib.llm.models import model_path
    model_dir = str(model_path(args.model))
    pairs = bench_pairs(args.model, args.pairs, args.answer_tokens)
    tokens, padding, packed_tokens, answer_tokens = token_counts(model_dir, pairs)
    from transformers import AutoConfig
    n_params, n_head = _parameters(model_dir, AutoConfig)
    fp32_rate, bf16_rate = matmul_gflops(args.threads), matmul_gflops(args.threads, "bf16")
    print(f"{len(pairs)} pairs, {tokens} tokens in their chosen + rejected sequences ({padding} more padded in "
          f"batch-1 steps, {100 * padding / tokens:.1f}%), {packed_tokens} packed (each prompt once); "
          f"{n_params / 1e6:.0f}M parameters; matmul yardstick "
          f"{fp32_rate:.0f} GFLOP/s fp32, {bf16_rate:.0f} GFLOP/s bf16 ({args.threads} threads)", flush=True)
    rows = []
    with tempfile.TemporaryDirectory() as work:
        for name in args.variants:
            with multiprocessing.get_context("spawn").Pool(1) as pool:
                row = pool.apply(run_variant, (name, args, model_dir, pairs, work))
            packed = VARIANTS[name][0].get("packed", True)
            layers = n_params - n_head
            done = packed_tokens if packed else tokens                  # what the run computed
            head_tokens = answer_tokens if packed else tokens           # what went through the LM head
            per_pass = layers * done + n_head * head_tokens
            flops = 6 * per_pass + (0 if row["reference"] == "reused" else 2 * per_pass)
            rate = bf16_rate if row["precision"] == "bf16" else fp32_rate
            row.update(pairs_per_second=len(pairs) / row["seconds"], mfu=flops / row["seconds"] / (rate * 1e9))
            row["ratio"] = row["pairs_per_second"] / rows[0]["pairs_per_second"] if rows else 1.0
            rows.append(row)
            print(f"{name:45s} {row['pairs_per_second']:.3f} pairs/s  x{row['ratio']:.2f}  "
                  f"MFU {100 * row['mfu']:.0f}% of the {row['precision']} matmul rate  peak RSS {row['peak_rss_gb']:.2f} GB  "
                  f"({row['precision']}, reference {row['reference']})", flush=True)
    curves = {r["variant"]: r["margins"] for r in rows}
    if "baseline" in curves and "bf16, no checkpointing, packed pairs" in curves:
        a, b = curves["baseline"], curves["bf16, no checkpointing, packed pairs"]
        window = max(1, len(a) // 8)
        diff = max(abs(x - y) for x, y in zip(smoothed(a, window), smoothed(b, window)))
        mean = sum(a) / len(a)
        spread = (sum((x - mean) ** 2 for x in a) / len(a)) ** 0.5
        print(f"reward margins, baseline vs bf16 + packed ({len(a)} steps, smoothed over {window}): largest difference "
              f"{diff:.3f}, against a spread of {spread:.3f} of the baseline's raw points; final smoothed "
              f"{smoothed(a, window)[-1]:.3f} vs {smoothed(b, window)[-1]:.3f}")
    versions = store.library_versions()
    meta = {"run": time.strftime("%Y-%m-%dT%H:%M:%S"), "model": args.model, "cpu": _cpu_name(),
            "threads": args.threads, "pairs": len(pairs), "tokens": tokens, "padding": padding,
            "packed_tokens": packed_tokens, "answer_tokens": answer_tokens,
            "fp32_gflops": round(fp32_rate, 1), "bf16_gflops": round(bf16_rate, 1), "torch": versions["torch"],
            "trl": versions["trl"]}
    fields = list(meta) + ["variant", "precision", "reference", "seconds", "pairs_per_second", "ratio", "mfu",
                           "peak_rss_gb"]
    new = not args.out.exists()
    with open(args.out, "a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        if new:
            writer.writeheader()
        writer.writerows({**meta, **{k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items()}}
                         for r in rows)
    print(f"appended {len(rows)} rows to {args.out}")


def _parameters(model_dir: str, auto_config) -> tuple[int, int]:
    """(all parameters, those of the LM head / tied embedding)."""
    import torch
    from transformers import AutoModelForCausalLM
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(auto_config.from_pretrained(model_dir))
    return sum(p.numel() for p in model.parameters()), model.get_output_embeddings().weight.numel()


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return "unknown"


if __name__ == "__main__":
    main()
