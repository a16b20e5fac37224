"""Side-by-side throughput of the pipeline's hot paths, in ONE run on the same model and prompts.

    .venv/bin/python benchmarks/bench.py                      # SmolLM2-135M, defaults below
    .venv/bin/python benchmarks/bench.py --model tiny --quick # seconds, for a smoke check

Sections (each prints a table; all rows are appended to benchmarks/results.csv with the CPU name,
threads and library versions):
1. the machine's fp32 matmul rate (2048 x 2048), the yardstick for achieved FLOP/s;
2. sampling: (a) a faithful re-implementation of the official repository's loop (transformers
   ``generate``, batches of 5, the prompt repeated per sample, no prefix sharing, logits kept for
   log-probs) vs (b) our sampler (``wowlib.llm.engine.hf``: batches across questions sorted by length,
   shared prefill, early stop) in fp32 and bf16, at 1 and 2 threads; then our sampler with its
   defaults on the cpu profile's own sampling workload (NLGraph, 24 questions). Every system generates
   exactly ``--max-new-tokens`` per sample (stop tokens suppressed), so tokens/s compare like
   with like; achieved FLOP/s = 2 * parameters * tokens / seconds;
3. parity: how far bf16 moves the per-token log-probs from plain fp32 transformers;
4. judging: pairwise verdicts per second, generated-text mode (the official loop's shape, and our
   sampler) vs next-token log-prob mode;
5. DPO: pairs per second with and without precomputed reference log-probs, and (in a process of
   its own, for its peak memory) with activation checkpointing; NLGraph prompts, ~100-token answers;
6. evaluation: the evaluation stage's answering workload (test questions x samples at temperature
   0.7, up to 640 tokens, looping replies stopped) on the plain reference backend
   (``wowlib.llm.reference``: ``generate``, one large batch, SDPA, fp32 and bf16 where the CPU has
   it) vs the engine with its defaults; replies end where they end, so answers/s and tokens/s;
7. parts: the sampling and evaluation stages' workload in miniature on the engine with its
   defaults and without each part (compiled decode kernel, prepacked weights, shared prompt heads): what each part buys end to end.
Each section runs in a fresh process, so the peak RSS printed for it is that stage's own peak.
"""
from __future__ import annotations

import argparse
import csv
import multiprocessing
import os
import platform
import resource
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")

from wowlib import store
from wowlib.llm.base import Decoding, Request
from wowlib.llm.engine.hf import HFModel, HFOptions, _cpu_has_bf16, native_bf16
from wowlib.llm.models import model_path
from wowlib.tasks import get_task

RESULTS = REPO / "benchmarks" / "results.csv"


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 ** 2


def matmul_gflops(threads: int, n: int = 2048, reps: int = 10) -> float:
    torch.set_num_threads(threads)
    a, b = torch.randn(n, n), torch.randn(n, n)
    for _ in range(3):
        a @ b
    start = time.perf_counter()
    for _ in range(reps):
        a @ b
    return 2 * n ** 3 * reps / (time.perf_counter() - start) / 1e9


# ---------------------------------------------------------------------------- prompts

def sampling_prompts(tasks: list[str], n_questions: int, n_samples: int, seed: int = 0) -> list[list[str]]:
    """Per question, the N user prompts of the paper's protocol (MC: one option order per sample)."""
    out = []
    for name in tasks:
        task = get_task(name)
        for q in task.questions("train", n_questions):
            out.append([task.prompt(q, task.option_order(q, i, seed)) for i in range(n_samples)])
    return out


# ---------------------------------------------------------------------------- (a) the official loop

@torch.inference_mode()
def official_loop(model, tokenizer, prompts: list[list[str]], max_new_tokens: int, batch_size: int = 5) -> int:
    """The official repository's generation loop (preference_generation/utils.py,
    batch_query_open_sourced_llm, mode 'generate'), re-implemented: batches of ``batch_size``
    chats, left padding, ``generate`` with sampling at temperature 1 and ``output_logits`` so the
    log-probs of the sampled tokens can be read afterwards. Returns generated tokens."""
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    flat = [[{"role": "user", "content": p}] for per_question in prompts for p in per_question]
    tokens = 0
    for start in range(0, len(flat), batch_size):
        batch = tokenizer.apply_chat_template(flat[start:start + batch_size], add_generation_prompt=True,
                                              padding=True, return_tensors="pt", return_dict=True)
        out = model.generate(**batch, do_sample=True, top_p=1.0, temperature=1.0, max_new_tokens=max_new_tokens,
                             min_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id,
                             return_dict_in_generate=True, output_logits=True)
        sequences = out.sequences[:, batch["input_ids"].shape[-1]:]
        logprobs = -torch.log_softmax(torch.stack(out.logits, dim=1).float(), dim=-1)
        logprobs.gather(-1, sequences[:, :, None]).squeeze(-1).mean(-1)   # what the official code keeps
        tokens += sequences.numel()
    return tokens


# ---------------------------------------------------------------------------- (b) ours

def ours(model: HFModel, prompts: list[list[str]], max_new_tokens: int) -> int:
    decoding = Decoding(temperature=1.0, max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens)
    requests = [Request.chat([{"role": "user", "content": p}], decoding, sample_idx=i)
                for per_question in prompts for i, p in enumerate(per_question)]
    tokens = 0
    for batch in model.plan(requests):
        tokens += sum(c.n_tokens + (c.finish == "stop") for c in model.run_batch([requests[i] for i in batch]))
    return tokens


def timed(fn, *args):
    start = time.perf_counter()
    result = fn(*args)
    return result, time.perf_counter() - start


FIELDS = ["run", "model", "cpu", "cpu_count", "torch", "transformers", "trl", "section", "system", "threads",
          "work", "unit", "seconds", "per_s", "ratio", "ratio_to", "flops_share", "peak_rss_gb"]


def record(rows: list[dict], section: str, system: str, threads: int, work: float, unit: str, seconds: float,
           baseline: dict | None = None, flops_share: float | None = None) -> dict:
    """One result row; ``ratio`` is throughput over the section's baseline row."""
    per_s = work / seconds if seconds else float("nan")
    row = {"section": section, "system": system, "threads": threads, "work": work, "unit": unit,
           "seconds": round(seconds, 2), "per_s": round(per_s, 3),
           "ratio": round(per_s / baseline["per_s"], 2) if baseline else None,
           "ratio_to": baseline["system"] if baseline else None,
           "flops_share": round(flops_share, 3) if flops_share is not None else None,
           "peak_rss_gb": round(peak_rss_gb(), 2)}
    rows.append(row)
    extra = f"  x{row['ratio']} vs {row['ratio_to']}" if baseline else ""
    share = f"  {100 * flops_share:.0f}% of matmul rate" if flops_share is not None else ""
    print(f"  [{threads} thr] {system:<44} {per_s:9.2f} {unit}/s{extra}{share}", flush=True)
    return row


def sampling_section(args, rows: list[dict]) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer
    directory = model_path(args.model)
    prompts = sampling_prompts(args.tasks, args.questions, args.samples)
    n_params = sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(directory).parameters())
    pipeline = sampling_prompts(["nlgraph_shortest_path"], args.pipeline_questions, args.samples)
    pipeline_label = f"NLGraph {len(pipeline)} q x {args.samples} x {args.pipeline_tokens} tokens"
    print(f"\n== sampling: {args.model} ({n_params / 1e6:.1f}M parameters), {len(prompts)} questions x "
          f"{args.samples} samples x {args.max_new_tokens} new tokens ({', '.join(args.tasks)}); then our "
          f"sampler on the cpu profile's workload ({pipeline_label})", flush=True)
    for threads in args.threads:
        torch.set_num_threads(threads)
        rate = matmul_gflops(threads)
        print(f" threads={threads}: fp32 matmul {rate:.1f} GFLOP/s", flush=True)
        record(rows, "matmul", "torch fp32 2048x2048", threads, rate, "GFLOP", 1.0)
        official_model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
        tokenizer = AutoTokenizer.from_pretrained(directory)
        tokens, seconds = timed(official_loop, official_model, tokenizer, prompts, args.max_new_tokens)
        base = record(rows, "sampling", "official loop (generate, batch 5)", threads, tokens, "tokens", seconds,
                      flops_share=2 * n_params * tokens / seconds / 1e9 / rate)
        del official_model
        for label, options in sampler_variants(args.max_batch):
            model = HFModel(args.model, directory, options=options)
            label += kernel_note(model)
            tokens, seconds = timed(ours, model, prompts, args.max_new_tokens)
            record(rows, "sampling", label, threads, tokens, "tokens", seconds, baseline=base,
                   flops_share=2 * n_params * tokens / seconds / 1e9 / rate)
            del model
        # the cpu profile's own sampling workload (every sample shares its whole prompt), with the
        # default options; no official-loop row (it would take ~20 min a thread count at this size)
        model = HFModel(args.model, directory)
        tokens, seconds = timed(ours, model, pipeline, args.pipeline_tokens)
        label = f"wowlib sampler (defaults){kernel_note(model)}, cpu profile workload: {pipeline_label}"
        record(rows, "sampling", label, threads, tokens, "tokens", seconds,
               flops_share=2 * n_params * tokens / seconds / 1e9 / rate)
        del model
        print(f"  peak RSS so far {peak_rss_gb():.2f} GB", flush=True)


def kernel_note(model: HFModel) -> str:
    """A row's label suffix where the decode-attention kernel was asked for ("auto") but not used."""
    return " (kernel unavailable: torch attention)" if model.options.attention == "auto" and not model._kernel else ""


def sampler_variants(max_batch: int) -> list[tuple[str, HFOptions]]:
    """Our sampler in fp32, bf16 (where the CPU has native bf16; the default on AMX CPUs), bf16
    without the compiled decode-attention kernel, and bf16 with the linear weights as they are (not
    reordered once for oneDNN: ``packed.py``). Which attention each uses is printed. (Dynamic int8 and
    fused RMSNorm / MLP passes were measured here too, and removed: benchmarks/README.md.)"""
    variants = [("wowlib sampler fp32", HFOptions(dtype="fp32", max_batch=max_batch))]
    if _cpu_has_bf16():
        variants.append(("wowlib sampler bf16" + (" (default here)" if native_bf16() else ""),
                         HFOptions(dtype="bf16", max_batch=max_batch)))
        variants.append(("wowlib sampler bf16, torch attention (no kernel)",
                         HFOptions(dtype="bf16", max_batch=max_batch, attention="torch")))
        variants.append(("wowlib sampler bf16, linear weights not prepacked",
                         HFOptions(dtype="bf16", max_batch=max_batch, prepack=False)))
    return variants


@torch.inference_mode()
def parity_section(args, rows: list[dict]) -> None:
    """How far each fast path moves the model's per-token log-probs from plain fp32 transformers:
    teacher-forced on fp32's own sampled continuations of the benchmark prompts (so one early
    flip cannot cascade). Prints mean and max |delta log-prob| of the sampled tokens, the mean KL
    (fp32 || fast) of the next-token distributions and the next-token argmax agreement."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    threads = max(args.threads)
    torch.set_num_threads(threads)
    directory = model_path(args.model)
    tokenizer = AutoTokenizer.from_pretrained(directory)
    reference = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
    prompts = [q[0] for q in sampling_prompts(args.tasks, args.parity_prompts, 1)]
    torch.manual_seed(0)
    sequences = []
    for prompt in prompts:
        text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                             add_generation_prompt=True)
        ids = tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids
        out = reference.generate(ids, attention_mask=torch.ones_like(ids), do_sample=True, temperature=1.0,
                                 max_new_tokens=args.parity_tokens, pad_token_id=tokenizer.eos_token_id)
        sequences.append((ids.shape[1], out))

    def logprobs(model):
        return [torch.log_softmax(model(input_ids=seq).logits[0, n - 1:-1].float(), -1) for n, seq in sequences]

    ref = logprobs(reference)
    print(f"\n== parity vs fp32 transformers: {len(sequences)} prompts x {args.parity_tokens} sampled tokens "
          "(teacher-forced)", flush=True)
    for label, options in sampler_variants(args.max_batch)[1:]:
        if options.attention == "torch":
            continue                    # teacher forcing never runs the decode kernel: the bf16 row says it
        fast = logprobs(HFModel(args.model, directory, options=options).model)
        delta = torch.cat([(a - b).gather(-1, seq[0, n:, None]).abs().squeeze(-1)
                           for a, b, (n, seq) in zip(ref, fast, sequences)])
        kl = torch.cat([(a.exp() * (a - b)).sum(-1) for a, b in zip(ref, fast)])
        agree = torch.cat([(a.argmax(-1) == b.argmax(-1)).float() for a, b in zip(ref, fast)])
        print(f"  {label:<46} mean |dlogp| {delta.mean():.4f}  max {delta.max():.3f}  KL {kl.mean():.5f}  "
              f"argmax agreement {100 * agree.mean():.1f}%", flush=True)
        rows.append({"section": "parity", "system": label, "threads": threads, "work": len(delta),
                     "unit": "tokens", "seconds": None, "per_s": round(delta.mean().item(), 4),
                     "ratio": round(agree.mean().item(), 4), "ratio_to": "mean |dlogp| (per_s), argmax agreement (ratio)",
                     "flops_share": None, "peak_rss_gb": round(peak_rss_gb(), 2)})


def judge_section(args, rows: list[dict]) -> None:
    from transformers import AutoModelForCausalLM

    from wowlib import judge
    threads = max(args.threads)
    torch.set_num_threads(threads)
    model = HFModel(args.model, model_path(args.model))
    task = get_task(args.tasks[0])
    # the pipeline's shape: several pairs per question, each asked in both orders (swap check)
    questions = task.questions("train", max(1, args.judge_pairs // 4))
    prompts = []
    for q in questions:
        a, b, c = (f"The answer is {o}." for o in ((q.options[0], q.options[-1], q.options[1]) if q.options else (1, 2, 3)))
        prompts += [judge.pairwise_prompt(task.judge_query(q), x, y) for x, y in ((a, b), (b, a), (a, c), (c, a))]
    chats = [[{"role": "user", "content": p}] for p in prompts][:args.judge_pairs]
    print(f"\n== judging: {len(chats)} pairwise verdicts ({len(questions)} questions, 2 pairs x 2 orders each)", flush=True)
    greedy = Decoding(temperature=0.0, max_new_tokens=args.judge_tokens)
    requests = [Request.chat(c, greedy) for c in chats]
    official = AutoModelForCausalLM.from_pretrained(model_path(args.model), dtype=torch.float32).eval()
    _, seconds = timed(official_greedy, official, model.tokenizer, chats, args.judge_tokens)
    del official
    official_row = record(rows, "judge", f"text mode, official loop (generate fp32, batch 5, <= {args.judge_tokens} tokens)",
           threads, len(chats), "verdicts", seconds)
    _, seconds = timed(lambda: [model.run_batch([requests[i] for i in b]) for b in model.plan(requests)])
    text = record(rows, "judge", f"text mode, wowlib sampler (greedy, <= {args.judge_tokens} tokens)", threads,
                  len(chats), "verdicts", seconds)
    _, seconds = timed(model.choice_logprobs, chats, judge.PAIRWISE_PREFIX, list(judge.PAIRWISE_CHOICES))
    record(rows, "judge", "log-prob mode (one forward pass)", threads, len(chats), "verdicts", seconds,
           baseline=text)
    record(rows, "judge", "log-prob mode (one forward pass)", threads, len(chats), "verdicts", seconds,
           baseline=official_row)


@torch.inference_mode()
def official_greedy(model, tokenizer, chats: list[list[dict]], max_new_tokens: int, batch_size: int = 5) -> None:
    """The official loop's shape for a judge in text mode: greedy ``generate`` in batches of 5."""
    tokenizer.padding_side = "left"
    for start in range(0, len(chats), batch_size):
        batch = tokenizer.apply_chat_template(chats[start:start + batch_size], add_generation_prompt=True,
                                              padding=True, return_tensors="pt", return_dict=True)
        model.generate(**batch, do_sample=False, max_new_tokens=max_new_tokens,
                       pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id)


def dpo_prefs(args) -> list[dict]:
    """Pairs shaped like the cpu run's: a real task prompt (NLGraph: ~700 tokens) and answers of
    ~100 tokens (sequence length is what drives DPO's time and memory)."""
    task = get_task(args.tasks[0])
    steps = "".join(f"From node {i} to node {i + 1} the edge weight is {i % 7 + 1}. " for i in range(8))
    return [{"prompt": task.prompt(q), "chosen": f"Step by step. {steps}The answer is 12.",
             "rejected": f"Let me think. {steps}So the total is 40."} for q in task.questions("train", args.dpo_pairs)]


def dpo_section(args, rows: list[dict]) -> None:
    import tempfile

    from wowlib import align
    threads = max(args.threads)
    torch.set_num_threads(threads)
    prefs = dpo_prefs(args)
    print(f"\n== DPO: {len(prefs)} pairs, 1 epoch, LoRA r=16", flush=True)
    base = None
    for precompute in (False, True):
        config = align.AlignConfig(trainer="dpo", num_train_epochs=1, precompute_ref_log_probs=precompute)
        with tempfile.TemporaryDirectory() as out:
            _, seconds = timed(align.train, config, model_path(args.model), prefs, Path(out) / "adapter")
        row = record(rows, "dpo", f"DPO, precomputed reference log-probs={precompute}", threads, len(prefs),
                     "pairs", seconds, baseline=base)
        base = base or row
    print(f"  peak RSS so far {peak_rss_gb():.2f} GB", flush=True)


def dpo_checkpointing_section(args, rows: list[dict]) -> None:
    """DPO as in the cpu run (precomputed reference) with activation checkpointing, in a process of
    its own so that its peak RSS is its own (compare with the ``dpo`` section's)."""
    import tempfile

    from wowlib import align
    threads = max(args.threads)
    torch.set_num_threads(threads)
    prefs = dpo_prefs(args)
    print(f"\n== DPO with activation checkpointing: {len(prefs)} pairs", flush=True)
    config = align.AlignConfig(trainer="dpo", num_train_epochs=1, activation_checkpointing=True)
    with tempfile.TemporaryDirectory() as out:
        _, seconds = timed(align.train, config, model_path(args.model), prefs, Path(out) / "adapter")
    record(rows, "dpo", "DPO, precomputed reference, activation checkpointing", threads, len(prefs), "pairs", seconds)
    print(f"  peak RSS {peak_rss_gb():.2f} GB", flush=True)


def protocol_requests(tasks: list[str], split: str, n_questions: int, n_samples: int,
                      decoding: Decoding) -> list[Request]:
    """The pipeline's answering calls: ``n_samples`` per question of ``split`` (MC: one option order
    per sample, as in sampling and evaluation)."""
    requests = []
    for name in tasks:
        task = get_task(name)
        for q in task.questions(split, n_questions):
            requests += [Request.chat([{"role": "user", "content": task.prompt(q, task.option_order(q, i, 0))}],
                                      decoding, sample_idx=i) for i in range(n_samples)]
    return requests


def evaluation_requests(args) -> list[Request]:
    """The evaluation stage's answering calls: test questions x samples, the cpu profile's decoding."""
    decoding = Decoding(temperature=0.7, max_new_tokens=args.eval_tokens, stop_on_repeat=True)
    return protocol_requests(args.tasks, "test", args.eval_questions, args.eval_samples, decoding)


def answer_all(model, requests: list[Request]) -> tuple[int, int]:
    """(answers, generated tokens) of every request, batched as the backend plans."""
    tokens = 0
    for batch in model.plan(requests):
        tokens += sum(c.n_tokens for c in model.run_batch([requests[i] for i in batch]))
    return len(requests), tokens


def evaluation_section(args, rows: list[dict]) -> None:
    from wowlib.llm.reference import ReferenceModel
    directory = model_path(args.model)
    requests = evaluation_requests(args)
    torch.set_num_threads(max(args.threads))
    print(f"\n== evaluation: {args.model}, {len(requests)} answers ({args.eval_questions} test questions x "
          f"{args.eval_samples} samples x {', '.join(args.tasks)}), up to {args.eval_tokens} tokens", flush=True)
    systems = [("reference: generate, fp32, SDPA, one batch", lambda: ReferenceModel(args.model, directory,
                                                                                      max_batch=len(requests)))]
    if _cpu_has_bf16():
        systems.append(("reference: generate, bf16, SDPA, one batch",
                        lambda: ReferenceModel(args.model, directory, dtype="bf16", max_batch=len(requests))))
    systems.append(("wowlib engine (defaults)", lambda: HFModel(args.model, directory)))
    base = None
    for label, build in systems:
        model = build()
        (answers, tokens), seconds = timed(answer_all, model, requests)
        row = record(rows, "evaluation", label, max(args.threads), answers, "answers", seconds,
                     baseline=base)
        record(rows, "evaluation", label + " (tokens)", max(args.threads), tokens, "tokens", seconds)
        base = base or row
        del model


def stage_requests(args) -> list[Request]:
    """The default profile's sampling and evaluation stages in miniature, as the pipeline issues them:
    training questions x 10 samples and test questions x 2 samples, temperature 0.7, up to
    ``--parts-tokens`` tokens, looping replies stopped (configs/cpu.yaml)."""
    decoding = Decoding(temperature=0.7, max_new_tokens=args.parts_tokens, stop_on_repeat=True)
    return protocol_requests(args.tasks, "train", args.parts_questions, 10, decoding) + \
        protocol_requests(args.tasks, "test", args.eval_questions, args.eval_samples, decoding)


def engine_parts() -> list[tuple[str, HFOptions]]:
    """The engine with its defaults, then without one part at a time (issue: keep a part only
    where it buys >= 1.3x end to end on the sampling and evaluation stages)."""
    return [("engine (defaults)", HFOptions()),
            ("without the compiled decode kernel (torch attention)", HFOptions(attention="torch")),
            ("without prepacked weights", HFOptions(prepack=False)),
            ("without shared prompt heads (each row prefills its prompt)", HFOptions(min_shared_prefix=10**9)),
            ("engine (defaults, again: the drift over the section)", HFOptions())]


def parts_section(args, rows: list[dict]) -> None:
    """Each engine part's end-to-end ratio: the stage workload (``stage_requests``) with the
    defaults over the same workload without the part. Replies end where they end (same seeds; a
    part that changes float summation order can change a sampled token), so tokens are printed too."""
    directory = model_path(args.model)
    requests = stage_requests(args)
    torch.set_num_threads(max(args.threads))
    print(f"\n== engine parts, end to end: {args.model}, {len(requests)} answers (sampling: {args.parts_questions} "
          f"training questions x 10 samples; evaluation: {args.eval_questions} test questions x {args.eval_samples} "
          f"samples; tasks {', '.join(args.tasks)}), up to {args.parts_tokens} tokens", flush=True)
    base = None
    for label, options in engine_parts():
        model = HFModel(args.model, directory, options=options)
        warm = Decoding(temperature=0.7, max_new_tokens=8)      # first-call costs (kernel load, oneDNN plans) untimed
        model.run_batch([Request.chat(requests[0].message_dicts, warm)])
        (answers, tokens), seconds = timed(answer_all, model, requests)
        row = record(rows, "parts", label + kernel_note(model), max(args.threads), answers, "answers", seconds)
        record(rows, "parts", label + " (tokens)", max(args.threads), tokens, "tokens", seconds)
        if base is None:
            base = row
        else:   # what the part buys: the defaults' speed over this variant's
            print(f"      the part buys x{base['per_s'] / row['per_s']:.2f} end to end", flush=True)
            row["ratio"], row["ratio_to"] = round(row["per_s"] / base["per_s"], 2), base["system"]
        del model


SECTIONS = {"sampling": sampling_section, "parity": parity_section, "judge": judge_section, "dpo": dpo_section,
            "dpo_checkpointing": dpo_checkpointing_section, "evaluation": evaluation_section,
            "parts": parts_section}


def run_section(section: str, args) -> tuple[list[dict], float]:
    """One section (in a child process): its rows and the process's peak RSS in GB."""
    rows: list[dict] = []
    SECTIONS[section](args, rows)
    return rows, peak_rss_gb()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--tasks", nargs="+", default=["nlgraph_shortest_path", "kc"])
    parser.add_argument("--questions", type=int, default=4, help="questions per task")
    parser.add_argument("--samples", type=int, default=10, help="samples per question (paper: 10)")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--pipeline-questions", type=int, default=24,
                        help="questions of the cpu profile's sampling workload (configs/cpu.yaml: 24)")
    parser.add_argument("--pipeline-tokens", type=int, default=96, help="its new tokens (configs/cpu.yaml: 96)")
    parser.add_argument("--max-batch", type=int, default=HFOptions().max_batch)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--judge-pairs", type=int, default=16)
    parser.add_argument("--judge-tokens", type=int, default=128)
    parser.add_argument("--dpo-pairs", type=int, default=8)
    parser.add_argument("--parity-prompts", type=int, default=2, help="questions per task for the parity section")
    parser.add_argument("--parity-tokens", type=int, default=64)
    parser.add_argument("--eval-questions", type=int, default=5, help="test questions per task (evaluation section)")
    parser.add_argument("--eval-samples", type=int, default=2, help="samples per test question (configs/cpu.yaml: 2)")
    parser.add_argument("--eval-tokens", type=int, default=640, help="max new tokens (configs/cpu.yaml: 640)")
    parser.add_argument("--parts-questions", type=int, default=4,
                        help="training questions per task, x 10 samples (parts section)")
    parser.add_argument("--parts-tokens", type=int, default=512, help="max new tokens (parts section; configs/cpu.yaml)")
    parser.add_argument("--sections", nargs="+", default=list(SECTIONS), choices=list(SECTIONS),
                        help="the matmul yardstick is measured inside the sampling section")
    parser.add_argument("--quick", action="store_true", help="tiny sizes (a smoke check of the script)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    if args.quick:
        args.questions, args.samples, args.max_new_tokens, args.judge_pairs, args.dpo_pairs = 1, 4, 16, 4, 4
        args.pipeline_questions, args.pipeline_tokens = 1, 16
        args.parity_prompts, args.parity_tokens = 1, 16
        args.eval_questions, args.eval_samples, args.eval_tokens = 1, 2, 32
        args.parts_questions, args.parts_tokens = 1, 32
        args.threads = [max(args.threads)]
    rows: list[dict] = []
    started = time.strftime("%Y-%m-%dT%H:%M:%S")
    peaks = {}
    for section in args.sections:
        # each section in a fresh process, so its peak RSS is that stage's own peak memory
        with multiprocessing.get_context("spawn").Pool(1) as pool:
            section_rows, peaks[section] = pool.apply(run_section, (section, args))
        rows.extend(section_rows)
    print("\npeak RSS per stage (fresh process each): " +
          ", ".join(f"{name} {gb:.2f} GB" for name, gb in peaks.items()))
    rows.extend({"section": "memory", "system": f"peak RSS, {name} stage", "threads": max(args.threads),
                 "work": round(gb, 2), "unit": "GB", "peak_rss_gb": round(gb, 2)} for name, gb in peaks.items())
    versions = store.library_versions()
    meta = {"run": started, "model": args.model, "cpu": cpu_name(), "cpu_count": os.cpu_count(),
            "torch": versions["torch"], "transformers": versions["transformers"], "trl": versions["trl"]}
    new = not args.out.exists()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with open(args.out, "a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=FIELDS)
        if new:
            writer.writeheader()
        writer.writerows({**meta, **row} for row in rows)
    print(f"appended {len(rows)} rows to {args.out}")


if __name__ == "__main__":
    main()
