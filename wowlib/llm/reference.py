"""The reference backend: plain ``transformers.generate``, batched, with the model's own (SDPA)
attention and every row its own copy of its prompt. It defines what a completion, its token
log-probs and so its confidence are; the fast CPU engine (``hf.HFModel``) is tested against it
(tests/test_reference.py) and benchmarked next to it (benchmarks/bench.py, ``reference`` rows).

A reply is the tokens decoded after the rendered chat (``ChatModel.render``) until a stop token
or stop string ("stop"), a reply that repeats one span (``Decoding.stop_on_repeat``, checked
every 8 tokens: "repeat"), or ``max_new_tokens`` ("length"). Each token's log-prob is taken under
the model at temperature 1, whatever the sampling temperature (before ``min_new_tokens``, a
benchmark's forced length, the engine's are renormalised without the stop tokens it suppresses).
A constrained final answer is a greedy loop over ``constrain.RowState``. Sampling draws from torch's generator seeded per batch:
the same request gives the same answer in the same batch, but not the engine's draws.
"""
from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import torch
from transformers import GenerationConfig, StoppingCriteria, StoppingCriteriaList

from . import constrain
from .base import Completion, Decoding, Message, Request, batches_of, prefixes
from ..seeds import stable_seed
from .chat import ChatModel, inference_dtype


class ReferenceModel(ChatModel):
    def __init__(self, name: str, path: str | Path, adapter: str | Path | None = None,
                 stop_strings: Sequence[str] = (), dtype: str = "fp32", max_batch: int = 64, device: str = "auto",
                 model=None, tokenizer=None) -> None:
        self.dtype_choice, self.max_batch = dtype, max_batch
        super().__init__(name, path, adapter, stop_strings, device, model, tokenizer)
        self.key = f"reference:{name}" + (f"+adapter:{self.adapter_hash}" if self.adapter_hash else "") + \
                   (":bf16" if self.dtype == torch.bfloat16 else "")

    def _dtype(self, n_params: int | None) -> torch.dtype:
        return inference_dtype(self.dtype_choice, self.device, n_params)

    def plan(self, requests: Sequence[Request]) -> list[list[int]]:
        """Batches of at most ``max_batch`` rows with one decoding, by prompt length (less padding)."""
        groups: dict[str, list[int]] = {}
        for i, r in enumerate(requests):
            groups.setdefault(repr(r.decoding), []).append(i)
        lengths = {r.prompt_key: len(self.encode(self._prompt_text(r))) for r in requests}
        out = []
        for _, idx in sorted(groups.items()):
            idx.sort(key=lambda i: (lengths[requests[i].prompt_key], requests[i].prompt_key, requests[i].sample_idx))
            out += batches_of(idx, self.max_batch)
        return out

    @torch.inference_mode()
    def run_batch(self, requests: Sequence[Request]) -> list[Completion]:
        decoding = requests[0].decoding
        if any(r.decoding != decoding for r in requests):
            raise ValueError("a batch must share its decoding parameters (use plan())")
        if decoding.constraint is not None:
            return [self._constrained(r) for r in requests]
        ids, mask = self._left_pad([self.encode(self._prompt_text(r)) for r in requests])
        width = ids.shape[1]
        torch.manual_seed(stable_seed(json.dumps([r.as_json() for r in requests], sort_keys=True)))
        out = self.model.generate(
            input_ids=ids, attention_mask=mask, generation_config=self._generation_config(decoding),
            stopping_criteria=StoppingCriteriaList([_Finished(self, decoding, width)]))
        logprobs = [torch.log_softmax(step.float(), dim=-1) for step in out.logits]
        return [self._reply(out.sequences[row, width:].tolist(), [lp[row] for lp in logprobs], decoding)
                for row in range(len(requests))]

    def _generation_config(self, decoding: Decoding) -> GenerationConfig:
        """Only what the request says: none of the checkpoint's defaults (top-k 50, penalties)."""
        sample = not decoding.greedy
        return GenerationConfig(
            do_sample=sample, temperature=decoding.temperature if sample else None, top_k=0 if sample else None,
            top_p=decoding.top_p if sample else None, max_new_tokens=decoding.max_new_tokens,
            min_new_tokens=decoding.min_new_tokens or None, eos_token_id=sorted(self.stop_ids),
            pad_token_id=self.tokenizer.pad_token_id, output_logits=True, return_dict_in_generate=True)

    def _reply(self, generated: list[int], step_logprobs: list[torch.Tensor], decoding: Decoding) -> Completion:
        """The reply's tokens up to where it ended (``generate`` pads a finished row), and why."""
        tokens: list[int] = []
        logps: list[float] = []
        finish = "length"
        for step, (tok, lp) in enumerate(zip(generated, step_logprobs)):
            tokens.append(tok)
            logps.append(lp[tok].item())
            ended = self.finish_reason(tokens, step, decoding)
            if ended:
                finish = ended
                break
        return self._completion(tokens, logps, finish)

    def _constrained(self, request: Request) -> Completion:
        """Greedy, one token at a time, each chosen by the answer's state machine."""
        decoding = request.decoding
        state = constrain.RowState(self._answer_plan(request), self._token_classes())
        out = self.model(input_ids=torch.tensor([self.encode(self._prompt_text(request))], device=self.device),
                         use_cache=True)
        stop = torch.tensor(sorted(self.stop_ids), device=self.device)
        tokens: list[int] = []
        logps: list[float] = []
        finish = "length"
        for step in range(decoding.max_new_tokens):
            logits = out.logits[0, -1].float()
            if step < decoding.min_new_tokens:
                logits[stop] = float("-inf")
            tok, lp = state.step(torch.log_softmax(logits, dim=-1))
            if tok is None:                          # the answer ended before this token
                finish = "stop"
                break
            tokens.append(tok)
            logps.append(lp)
            ended = "stop" if state.finished else self.finish_reason(tokens, step, decoding)
            if ended:
                finish = ended
                break
            out = self.model(input_ids=torch.tensor([[tok]], device=self.device),
                             cache=out.past_key_values, use_cache=True)
        return self._constrained_completion(request, state, tokens, logps, finish)

    @torch.inference_mode()
    def choice_logprobs(self, prompts: Sequence[Sequence[Message]], prefix: str | Sequence[str],
                        choices: Sequence[str]) -> list[dict[str, float]]:
        """Log-prob of each choice right after ``prefix`` in the assistant turn: one left-padded
        forward pass per batch of prompts."""
        texts = [self.render(p, x) for p, x in zip(prompts, prefixes(prefix, len(prompts)))]
        if not texts:
            return []
        shared, finals = self._choice_tokens(texts[0], choices)
        out = []
        for batch in batches_of(texts, self.max_batch):
            ids, mask = self._left_pad([self.encode(t) + shared for t in batch])
            positions = (mask.cumsum(-1) - 1).clamp(min=0)
            logits = self.model(input_ids=ids, attention_mask=mask, position_ids=positions,
                                logits_to_keep=len(shared) + 1).logits.float()
            logprobs = torch.log_softmax(logits, dim=-1)
            for row in range(len(batch)):
                head = sum(logprobs[row, j, t].item() for j, t in enumerate(shared))
                out.append({c: head + logprobs[row, -1, t].item() for c, t in zip(choices, finals)})
        return out


class _Finished(StoppingCriteria):
    """Ends a row of ``generate`` at a stop string or a repeating reply (stop tokens are its own)."""

    def __init__(self, model: ReferenceModel, decoding: Decoding, width: int) -> None:
        self.model, self.decoding, self.width = model, decoding, width

    def __call__(self, input_ids: torch.Tensor, scores, **kwargs) -> torch.Tensor:
        done = []
        for row in input_ids[:, self.width:].tolist():
            done.append(self.model.finish_reason(row, len(row) - 1, self.decoding) is not None)
        return torch.tensor(done, dtype=torch.bool, device=input_ids.device)
