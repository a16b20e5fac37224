"""The transformers backend: a batched sampler built for CPUs (and fine on GPUs).

What makes it fast on a CPU, measured in ``benchmarks/``:
- batches across questions, sorted by prompt length, sized by a token budget;
- a prompt shared by several samples is prefilled once and its KV cache repeated;
- finished sequences leave the batch at once (early stop per sequence);
- logits only for the positions that are needed (never the full prompt x vocabulary);
- optional dynamic int8 quantisation of the linear layers for inference (``int8=True``).

Sampling is reproducible per request: each row draws from its own generator, seeded by the
request (messages, decoding, sample index, seed), so an answer does not depend on what else is in
its batch except through floating-point noise, and the cache plans batches so that even that noise
is the same on a rerun.
"""
from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch

from .base import Completion, Message, Request, batches_of

log = logging.getLogger(__name__)


@dataclass
class HFOptions:
    max_batch: int = 64              # rows decoded together
    token_budget: int = 48_000       # rows x (prompt + new tokens) per batch
    int8: bool = False               # dynamic int8 linear layers (CPU inference only)
    dtype: str = "auto"              # "auto": fp32 on CPU, bf16 on a GPU that supports it
    device: str = "auto"


def _row_seed(request: Request) -> int:
    payload = json.dumps(request.as_json(), sort_keys=True)
    return int.from_bytes(hashlib.sha256(payload.encode()).digest()[:8], "little") & (2**63 - 1)


class HFModel:
    """A causal LM from a local directory (or a hub id the user named), optionally with a PEFT
    adapter, answering chat requests."""

    def __init__(self, name: str, path: str | Path, adapter: str | Path | None = None,
                 stop_strings: Sequence[str] = (), options: HFOptions | None = None,
                 model=None, tokenizer=None) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer
        self.options = options or HFOptions()
        self.device = torch.device(("cuda" if torch.cuda.is_available() else "cpu")
                                   if self.options.device == "auto" else self.options.device)
        dtype = torch.float32
        if self.options.dtype == "bf16" or (self.options.dtype == "auto" and self.device.type == "cuda"
                                            and torch.cuda.is_bf16_supported()):
            dtype = torch.bfloat16
        if self.device.type == "cpu" and dtype != torch.float32:
            raise ValueError("bf16 on this CPU is emulated and slow: use fp32 (dtype='auto') on CPU")
        self.tokenizer = tokenizer or AutoTokenizer.from_pretrained(str(path))
        self.model = model or AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype)
        self.adapter_hash = None
        if adapter is not None:
            from peft import PeftModel
            self.adapter_hash = adapter_hash(Path(adapter))
            self.model = PeftModel.from_pretrained(self.model, str(adapter)).merge_and_unload()
        self.model.to(self.device).eval()
        if self.options.int8:
            if self.device.type != "cpu":
                raise ValueError("int8 dynamic quantisation is a CPU inference path")
            self.model = torch.ao.quantization.quantize_dynamic(self.model, {torch.nn.Linear}, dtype=torch.qint8)
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.stop_ids = self._stop_ids()
        self.stop_strings = tuple(stop_strings)
        self.name = name if adapter is None else f"{name}+{Path(adapter).name}"
        self.key = f"hf:{name}" + (f"+adapter:{self.adapter_hash}" if self.adapter_hash else "") + \
                   (":int8" if self.options.int8 else "")
        self.n_params = sum(p.numel() for p in self.model.parameters()) if not self.options.int8 else None

    # ------------------------------------------------------------------ prompts
    def _stop_ids(self) -> set[int]:
        ids = {self.tokenizer.eos_token_id}
        for token in ("<|im_end|>", "<|endoftext|>", "<|eot_id|>", "<end_of_turn>", "<eos>"):
            tid = self.tokenizer.convert_tokens_to_ids(token)
            if isinstance(tid, int) and tid != self.tokenizer.unk_token_id:
                ids.add(tid)
        return {i for i in ids if i is not None}

    def render(self, messages: Sequence[Message], prefix: str = "") -> str:
        """The chat as the model sees it, ending where the assistant starts (plus ``prefix``)."""
        text = self.tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=True)
        return text + prefix

    def encode(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    # ------------------------------------------------------------------ planning
    def plan(self, requests: Sequence[Request]) -> list[list[int]]:
        """Group requests by decoding parameters, sort by prompt length (identical prompts
        adjacent, for prefix sharing), and cut batches by rows and tokens."""
        lengths = [len(self.encode(self.render(r.message_dicts))) for r in requests]
        groups: dict[tuple, list[int]] = {}
        for i, r in enumerate(requests):
            groups.setdefault((r.decoding.max_new_tokens, repr(r.decoding)), []).append(i)
        batches = []
        for (max_new, _), idx in sorted(groups.items()):
            idx.sort(key=lambda i: (-lengths[i], requests[i].messages, requests[i].sample_idx))
            batch: list[int] = []
            for i in idx:
                width = lengths[batch[0]] + max_new if batch else lengths[i] + max_new
                if batch and (len(batch) >= self.options.max_batch or
                              (len(batch) + 1) * width > self.options.token_budget):
                    batches.append(batch)
                    batch = []
                batch.append(i)
            if batch:
                batches.append(batch)
        return batches

    # ------------------------------------------------------------------ generation
    @torch.inference_mode()
    def run_batch(self, requests: Sequence[Request]) -> list[Completion]:
        try:
            return self._generate(requests)
        except (RuntimeError, ValueError) as err:        # e.g. out of memory: report, never fake
            log.exception("generation failed for a batch of %d", len(requests))
            return [Completion.failed(f"{type(err).__name__}: {err}") for _ in requests]

    def _generate(self, requests: Sequence[Request]) -> list[Completion]:
        decoding = requests[0].decoding
        if any(r.decoding != decoding for r in requests):
            raise ValueError("a batch must share its decoding parameters (use plan())")
        # Prefill each distinct prompt once, then repeat its cache for the rows that share it.
        prompts = [r.messages for r in requests]
        unique = list(dict.fromkeys(prompts))
        row_of_unique = torch.tensor([unique.index(p) for p in prompts], device=self.device)
        ids = [self.encode(self.render([{"role": r, "content": c} for r, c in p])) for p in unique]
        input_ids, mask = self._left_pad(ids)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        from transformers import DynamicCache
        cache = DynamicCache()
        out = self.model(input_ids=input_ids, attention_mask=mask, position_ids=positions,
                         cache=cache, use_cache=True, logits_to_keep=1)
        if len(unique) != len(prompts):
            cache.batch_select_indices(row_of_unique)
        logits = out.logits[row_of_unique, -1, :].float()
        mask = mask[row_of_unique]
        next_pos = positions[row_of_unique, -1] + 1

        n = len(requests)
        generators = [torch.Generator(device="cpu").manual_seed(_row_seed(r)) for r in requests]
        tokens: list[list[int]] = [[] for _ in range(n)]
        logps: list[list[float]] = [[] for _ in range(n)]
        finish = ["length"] * n
        active = list(range(n))                        # request index of each live row
        stop = torch.tensor(sorted(self.stop_ids), device=self.device)
        for step in range(decoding.max_new_tokens):
            if step < decoding.min_new_tokens:
                logits[:, stop] = float("-inf")
            logprobs = torch.log_softmax(logits, dim=-1)
            chosen = self._choose(logits, logprobs, decoding, [generators[i] for i in active])
            picked = logprobs.gather(-1, chosen[:, None]).squeeze(-1).tolist()
            keep = []
            for row, (i, tok, lp) in enumerate(zip(active, chosen.tolist(), picked)):
                tokens[i].append(tok)
                logps[i].append(lp)
                if tok in self.stop_ids or self._hit_stop_string(tokens[i]):
                    finish[i] = "stop"
                else:
                    keep.append(row)
            if not keep:
                break
            if len(keep) < len(active):                # early stop: drop finished rows
                index = torch.tensor(keep, device=self.device)
                cache.batch_select_indices(index)
                mask, next_pos, chosen = mask[index], next_pos[index], chosen[index]
                active = [active[r] for r in keep]
            mask = torch.cat([mask, mask.new_ones(len(active), 1)], dim=-1)
            out = self.model(input_ids=chosen[:, None], attention_mask=mask, position_ids=next_pos[:, None],
                             cache=cache, use_cache=True)
            logits = out.logits[:, -1, :].float()
            next_pos = next_pos + 1
        return [self._completion(tokens[i], logps[i], finish[i]) for i in range(n)]

    @staticmethod
    def _choose(logits: torch.Tensor, logprobs: torch.Tensor, decoding, generators) -> torch.Tensor:
        if decoding.greedy:
            return logits.argmax(dim=-1)
        probs = torch.softmax(logits / decoding.temperature, dim=-1)
        if decoding.top_p < 1.0:
            sorted_p, order = probs.sort(dim=-1, descending=True)
            drop = sorted_p.cumsum(-1) - sorted_p > decoding.top_p
            sorted_p[drop] = 0.0
            probs = torch.zeros_like(probs).scatter(-1, order, sorted_p)
        probs = probs.cpu()
        return torch.stack([torch.multinomial(probs[r], 1, generator=g)[0]
                            for r, g in enumerate(generators)]).to(logits.device)

    def _hit_stop_string(self, tokens: list[int]) -> bool:
        if not self.stop_strings:
            return False
        tail = self.tokenizer.decode(tokens[-12:], skip_special_tokens=False)
        return any(s in tail for s in self.stop_strings)

    def _completion(self, tokens: list[int], logps: list[float], finish: str) -> Completion:
        content = tokens[:-1] if finish == "stop" and tokens and tokens[-1] in self.stop_ids else tokens
        text = self.tokenizer.decode(content, skip_special_tokens=True)
        for s in self.stop_strings:
            text = text.split(s)[0]
        # Mean log-prob over the answer's tokens (the stop token excluded, as in the paper's
        # code); an empty answer keeps the stop token's log-prob so confidence stays defined.
        scored = logps[:len(content)] or logps[:1]
        return Completion(text=text.strip(), n_tokens=len(content),
                          mean_logprob=sum(scored) / len(scored) if scored else None,
                          finish=finish, token_logprobs=logps)

    def _left_pad(self, seqs: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        width = max(len(s) for s in seqs)
        pad = self.tokenizer.pad_token_id
        ids = torch.tensor([[pad] * (width - len(s)) + s for s in seqs], device=self.device)
        mask = torch.tensor([[0] * (width - len(s)) + [1] * len(s) for s in seqs], device=self.device)
        return ids, mask

    # ------------------------------------------------------------------ scoring
    @torch.inference_mode()
    def choice_logprobs(self, prompts: Sequence[Sequence[Message]], prefix: str,
                        choices: Sequence[str], batch_size: int = 16) -> list[dict[str, float]]:
        """Log-prob of each single-token choice right after ``prefix`` in the assistant turn;
        one forward pass per prompt, reading only the last position's logits."""
        texts = [self.render(p, prefix) for p in prompts]
        choice_ids = self._single_token_choices(texts[0] if texts else prefix, choices)
        out: list[dict[str, float]] = []
        for batch in batches_of(list(range(len(texts))), batch_size):
            ids, mask = self._left_pad([self.encode(texts[i]) for i in batch])
            positions = (mask.cumsum(-1) - 1).clamp(min=0)
            logits = self.model(input_ids=ids, attention_mask=mask, position_ids=positions,
                                logits_to_keep=1).logits[:, -1, :].float()
            logprobs = torch.log_softmax(logits, dim=-1)
            for row in range(len(batch)):
                out.append({c: logprobs[row, t].item() for c, t in zip(choices, choice_ids)})
        return out

    def _single_token_choices(self, context: str, choices: Sequence[str]) -> list[int]:
        base = self.encode(context)
        ids = []
        for choice in choices:
            full = self.encode(context + choice)
            if full[:len(base)] != base or len(full) != len(base) + 1:
                raise ValueError(f"choice {choice!r} is not a single token after the prefix for {self.name}; "
                                 "choice_logprobs needs single-token choices")
            ids.append(full[-1])
        return ids

    @torch.inference_mode()
    def score(self, prompts: Sequence[Sequence[Message]], continuations: Sequence[str],
              batch_size: int = 8) -> list[list[float]]:
        """Teacher-forced per-token log-probs of each continuation as the assistant's reply."""
        out: list[list[float]] = []
        for batch in batches_of(list(range(len(prompts))), batch_size):
            heads = [self.encode(self.render(prompts[i])) for i in batch]
            tails = [self._continuation_ids(h, self.render(prompts[i]), continuations[i])
                     for i, h in zip(batch, heads)]
            ids, mask = self._left_pad([h + t for h, t in zip(heads, tails)])
            positions = (mask.cumsum(-1) - 1).clamp(min=0)
            keep = max(len(t) for t in tails) + 1
            logits = self.model(input_ids=ids, attention_mask=mask, position_ids=positions,
                                logits_to_keep=keep).logits.float()
            logprobs = torch.log_softmax(logits, dim=-1)
            for row, tail in enumerate(tails):
                # logits[:, j] predicts token at position (width - keep + j + 1)
                start = keep - 1 - len(tail)
                out.append([logprobs[row, start + j, tok].item() for j, tok in enumerate(tail)])
        return out


    def _continuation_ids(self, head: list[int], rendered: str, continuation: str) -> list[int]:
        full = self.encode(rendered + continuation)
        return full[len(head):] if full[:len(head)] == head else self.encode(continuation)


def adapter_hash(adapter_dir: Path) -> str:
    """Hash of a PEFT adapter's weights and config: part of the cache key of its answers."""
    digest = hashlib.sha256()
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        path = adapter_dir / name
        if not path.exists():
            raise FileNotFoundError(f"not a PEFT adapter directory (missing {name}): {adapter_dir}")
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def measure(fn, *args, **kwargs):
    """(result, seconds) of a call."""
    start = time.perf_counter()
    result = fn(*args, **kwargs)
    return result, time.perf_counter() - start
