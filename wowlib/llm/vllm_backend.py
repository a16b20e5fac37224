"""The vLLM backend: the same LLM protocol as ``wowlib.llm.engine.hf.HFModel`` on vLLM's engine
(GPU; tensor parallelism across GPUs; LoRA adapters of aligned models without merging).

Install with ``pip install -e .[vllm]`` (an optional extra: vLLM pins its own torch, so it is
never part of the base install). ``vllm`` is imported only when a ``VLLMModel`` is built.

Mapping (pure functions below, unit-tested with fake objects, no vLLM needed):

- Prompts are rendered with the model's chat template and tokenized exactly as the hf backend
  does (``render`` + ``encode``), then passed as token ids, so both backends see the same tokens.
- n samples per prompt: the requests of one prompt (same messages, decoding and seed) with
  consecutive sample indices become ONE vLLM request with ``n`` outputs. vLLM (V1) seeds the
  k-th output of a request with seed ``seed + k``; we send ``seed = base + first sample index``,
  so sample ``i`` of a prompt is always drawn with seed ``base + i``, whichever other samples
  share its request: the answer of a request does not depend on how it was grouped or batched
  (up to GPU floating-point noise across batch shapes).
- ``logprobs=1`` returns the log-prob of each sampled token: ``mean_logprob`` is their mean over
  the answer (the EOS/stop token excluded, as in the hf backend; an empty answer keeps the stop
  token's log-prob so confidence stays defined).
- ``score`` and ``choice_logprobs`` use ``prompt_logprobs`` (teacher forcing through the prompt):
  exact log-probs of given tokens under the full softmax, not a top-k approximation.
- A failed request (an engine exception, an aborted or malformed output) becomes
  ``Completion.failed(...)``: status "error", never an answer, never cached.
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .base import Completion, Message, Request, batches_of, prefixes

log = logging.getLogger(__name__)

# LoRA ranks vLLM accepts for ``max_lora_rank``.
VLLM_LORA_RANKS = (8, 16, 32, 64, 128, 256, 320, 512)
INSTALL_HINT = ("the vLLM backend needs the optional extra: pip install -e '.[vllm]' "
                "(a GPU machine; vLLM pins its own torch, so use a separate environment)")


# ---------------------------------------------------------------------------- request -> vLLM

def base_seed(request: Request) -> int:
    """A 31-bit seed from the request WITHOUT its sample index: the samples of one prompt share
    it and sample ``i`` is drawn with ``base_seed + i``."""
    payload = json.dumps({"messages": [list(m) for m in request.messages],
                          "decoding": request.as_json()["decoding"], "seed": request.seed}, sort_keys=True)
    return int.from_bytes(hashlib.sha256(payload.encode()).digest()[:4], "little") & (2**31 - 1)


def _prompt_key(request: Request) -> tuple:
    return (request.messages, request.prefix, request.decoding, request.seed)


def sample_groups(requests: Sequence[Request]) -> list[list[int]]:
    """Indices of ``requests`` grouped into n-sample vLLM requests: the same prompt, decoding and
    seed, consecutive sample indices (ascending). Groups appear in order of their first request."""
    by_prompt: dict[tuple, list[int]] = {}
    for i, r in enumerate(requests):
        by_prompt.setdefault(_prompt_key(r), []).append(i)
    groups: list[list[int]] = []
    for idx in by_prompt.values():
        idx.sort(key=lambda i: requests[i].sample_idx)
        run = [idx[0]]
        for i in idx[1:]:
            if requests[i].sample_idx == requests[run[-1]].sample_idx + 1:
                run.append(i)
            else:                                  # a gap or a repeated sample index: a new request
                groups.append(run)
                run = [i]
        groups.append(run)
    return groups


def sampling_kwargs(group: Sequence[Request], stop_strings: Sequence[str] = ()) -> dict[str, Any]:
    """``vllm.SamplingParams`` keyword arguments for one group of ``sample_groups``."""
    first = group[0]
    if any(_prompt_key(r) != _prompt_key(first) for r in group):
        raise ValueError("a sampling group must share messages, decoding and seed")
    if [r.sample_idx for r in group] != list(range(first.sample_idx, first.sample_idx + len(group))):
        raise ValueError("a sampling group needs consecutive, ascending sample indices")
    d = first.decoding
    if d.stop_on_repeat:
        raise ValueError("stop_on_repeat is a rule of the hf engine; vLLM has no equivalent: leave it off")
    kwargs: dict[str, Any] = {
        "n": len(group),
        "temperature": d.temperature,              # 0: greedy in vLLM
        "top_p": d.top_p,
        "max_tokens": d.max_new_tokens,
        "min_tokens": d.min_new_tokens,
        "seed": base_seed(first) + first.sample_idx,
        "logprobs": 1,                             # the sampled token's log-prob (+ the top one)
        "skip_special_tokens": True,
    }
    if stop_strings:
        kwargs["stop"] = list(stop_strings)
    if d.constraint is not None:
        kwargs["regex"] = constraint_regex(d.constraint, d.max_new_tokens)
    return kwargs


def constraint_regex(spec: str, max_tokens: int) -> str:
    """The answer a constrained request may produce after its prefilled opening, as a regex for
    vLLM's guided decoding: " B" (one of the letters) or " 42" / " -4.5" (where allowed). vLLM
    restricts every step to the regex and lets the model end where the regex may end; the hf
    backend's rule (stop at the first non-digit the model prefers) differs only in that an ended
    answer there is the model's own preference over ALL tokens."""
    from .constrain import LETTERS_KIND, Constraint
    c = Constraint.parse(spec)
    if c.kind == LETTERS_KIND:
        return f" ?[{c.letters}]"
    return " ?" + ("-?" if c.signed else "") + rf"\d{{1,{max_tokens}}}" + (r"(\.\d+)?" if c.decimal else "")


def scoring_kwargs() -> dict[str, Any]:
    """``SamplingParams`` for teacher-forced scoring: the prompt's log-probs, one greedy token."""
    return {"n": 1, "temperature": 0.0, "max_tokens": 1, "prompt_logprobs": 1, "detokenize": False}


def lora_rank(r: int) -> int:
    """The smallest ``max_lora_rank`` vLLM accepts that fits an adapter of rank ``r``."""
    for rank in VLLM_LORA_RANKS:
        if r <= rank:
            return rank
    raise ValueError(f"LoRA rank {r} is above vLLM's largest supported rank {VLLM_LORA_RANKS[-1]}")


def engine_kwargs(path: str | Path, tensor_parallel_size: int = 1, dtype: str = "auto",
                  gpu_memory_utilization: float = 0.9, max_model_len: int | None = None,
                  adapter_rank: int | None = None, seed: int = 0, enforce_eager: bool = False,
                  quantization: str | None = None, **extra: Any) -> dict[str, Any]:
    """``vllm.LLM`` keyword arguments (``extra`` passes any other engine argument through)."""
    if not isinstance(tensor_parallel_size, int) or tensor_parallel_size < 1:
        raise ValueError(f"tensor_parallel_size must be an integer >= 1, got {tensor_parallel_size!r}")
    if not 0 < gpu_memory_utilization <= 1:
        raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {gpu_memory_utilization!r}")
    kwargs: dict[str, Any] = {"model": str(path), "tensor_parallel_size": tensor_parallel_size, "dtype": dtype,
                              "gpu_memory_utilization": gpu_memory_utilization, "seed": seed,
                              "trust_remote_code": False, "enforce_eager": enforce_eager}
    if max_model_len is not None:
        kwargs["max_model_len"] = max_model_len
    if quantization is not None:
        kwargs["quantization"] = quantization
    if adapter_rank is not None:
        kwargs.update(enable_lora=True, max_lora_rank=lora_rank(adapter_rank), max_loras=1)
    kwargs.update(extra)
    return kwargs


# ---------------------------------------------------------------------------- vLLM -> records

def _token_logprob(position: Any, token_id: int) -> float | None:
    """The log-prob of ``token_id`` in one position of vLLM's logprobs ({token id: Logprob})."""
    if position is None:
        return None
    try:
        entry = position[token_id]
    except (KeyError, IndexError, TypeError):
        return None
    value = getattr(entry, "logprob", entry)
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def completion_from_output(output: Any, stop_strings: Sequence[str] = ()) -> Completion:
    """A ``Completion`` from one ``vllm.CompletionOutput`` (``text``, ``token_ids``, ``logprobs``,
    ``finish_reason``, ``stop_reason``). Aborted or malformed outputs are failures."""
    finish = getattr(output, "finish_reason", None)
    if finish not in ("stop", "length"):
        return Completion.failed(f"vLLM output finished with {finish!r} (aborted or incomplete)")
    text, token_ids = getattr(output, "text", None), getattr(output, "token_ids", None)
    if not isinstance(text, str) or token_ids is None:
        return Completion.failed("malformed vLLM output: no text or token ids")
    token_ids = list(token_ids)
    logprobs = getattr(output, "logprobs", None)
    token_logprobs: list[float] | None = None
    if logprobs is not None:
        values = [_token_logprob(logprobs[j] if j < len(logprobs) else None, t) for j, t in enumerate(token_ids)]
        token_logprobs = None if any(v is None for v in values) else values
        if token_logprobs is None:
            log.warning("vLLM returned no log-prob for some sampled tokens: mean_logprob = None")
    # EOS or a stop token id ends the answer (stop_reason None or an int): not part of the answer.
    # A stop STRING (stop_reason a str) is cut from the text by vLLM; its tokens stay counted, as in hf.
    stop_token = finish == "stop" and not isinstance(getattr(output, "stop_reason", None), str) and token_ids
    n_content = len(token_ids) - 1 if stop_token else len(token_ids)
    for s in stop_strings:                      # vLLM already cut them; harmless if absent
        text = text.split(s)[0]
    mean = None
    if token_logprobs:
        scored = token_logprobs[:n_content] or token_logprobs[:1]
        mean = sum(scored) / len(scored)
        if not math.isfinite(mean):
            mean = None
    return Completion(text=text.strip(), n_tokens=n_content, mean_logprob=mean, finish=finish,
                      token_logprobs=token_logprobs)


def completions_from_request_output(request_output: Any, n: int, stop_strings: Sequence[str] = ()) -> list[Completion]:
    """The ``n`` completions of one n-sample ``vllm.RequestOutput``, in sample order (by each
    output's ``index`` when present). A wrong number of outputs fails the whole group."""
    outputs = getattr(request_output, "outputs", None)
    if not isinstance(outputs, (list, tuple)) or len(outputs) != n:
        got = len(outputs) if isinstance(outputs, (list, tuple)) else type(outputs).__name__
        return [Completion.failed(f"vLLM returned {got} outputs for a request of n={n}") for _ in range(n)]
    if all(isinstance(getattr(o, "index", None), int) for o in outputs):
        outputs = sorted(outputs, key=lambda o: o.index)
    return [completion_from_output(o, stop_strings) for o in outputs]


def prompt_token_logprobs(prompt_logprobs: Any, token_ids: Sequence[int], start: int) -> list[float]:
    """Log-probs of ``token_ids[start:]`` from a ``RequestOutput.prompt_logprobs`` list (position j
    holds the log-prob of prompt token j given tokens < j; position 0 is None)."""
    if start < 1:
        raise ValueError("the first prompt token has no log-prob: start must be >= 1")
    if prompt_logprobs is None or len(prompt_logprobs) < len(token_ids):
        raise ValueError("vLLM returned no (or too few) prompt log-probs")
    out = []
    for j in range(start, len(token_ids)):
        value = _token_logprob(prompt_logprobs[j], token_ids[j])
        if value is None:
            raise ValueError(f"vLLM returned no log-prob for prompt token {j}")
        out.append(value)
    return out


# ---------------------------------------------------------------------------- the backend

def _vllm_api():
    """The three vLLM classes the backend uses (imported here, on first use only)."""
    try:
        from vllm import LLM, SamplingParams
        from vllm.lora.request import LoRARequest
    except ImportError as err:
        raise ImportError(f"{INSTALL_HINT} ({err})") from err
    from types import SimpleNamespace
    return SimpleNamespace(LLM=LLM, SamplingParams=SamplingParams, LoRARequest=LoRARequest)


class VLLMModel:
    """A local causal LM on vLLM, optionally with a PEFT LoRA adapter, answering chat requests.

    ``options``: ``tensor_parallel_size`` (GPUs per model), ``dtype``, ``gpu_memory_utilization``,
    ``max_model_len``, ``quantization`` (e.g. "bitsandbytes"), ``seed``, ``enforce_eager``,
    ``max_batch`` (requests per cached batch; vLLM schedules inside it), and any other
    ``vllm.LLM`` engine argument."""

    def __init__(self, name: str, path: str | Path, adapter: str | Path | None = None,
                 stop_strings: Sequence[str] = (), max_batch: int = 1024, engine=None, **options: Any) -> None:
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        self.max_batch = max_batch
        self.stop_strings = tuple(stop_strings)
        self.adapter_hash: str | None = None
        self.lora_request = None
        adapter_rank = None
        if adapter is not None:
            from .chat import adapter_hash
            adapter = Path(adapter)
            self.adapter_hash = adapter_hash(adapter)
            adapter_rank = int(json.loads((adapter / "adapter_config.json").read_text())["r"])
        self._api = _vllm_api()
        if engine is None:
            engine = self._api.LLM(**engine_kwargs(path, adapter_rank=adapter_rank, **options))
        self.engine = engine
        if adapter is not None:
            self.lora_request = self._api.LoRARequest(adapter.name, 1, str(adapter))
        self.tokenizer = engine.get_tokenizer()
        self.name = name if adapter is None else f"{name}+{Path(adapter).name}"
        self.key = f"vllm:{name}" + (f"+adapter:{self.adapter_hash}" if self.adapter_hash else "")

    supports_constraints = True          # by guided decoding (``constraint_regex``)

    # ------------------------------------------------------------------ prompts (as in hf)
    def render(self, messages: Sequence[Message], prefix: str = "") -> str:
        text = self.tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=True)
        return text + prefix

    def encode(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def _run(self, prompts: list[list[int]], params: list[dict[str, Any]]) -> list[Any]:
        return self.engine.generate([{"prompt_token_ids": p} for p in prompts],
                                    [self._sampling_params(k) for k in params], use_tqdm=False,
                                    lora_request=self.lora_request)

    def _sampling_params(self, kwargs: dict[str, Any]):
        """``SamplingParams``, with a constrained answer's regex as guided decoding (vLLM >= 0.11
        names it ``structured_outputs``, earlier versions ``guided_decoding``). Not run here (no GPU)."""
        kwargs = dict(kwargs)
        regex = kwargs.pop("regex", None)
        if regex is not None:
            try:
                from vllm.sampling_params import StructuredOutputsParams
                kwargs["structured_outputs"] = StructuredOutputsParams(regex=regex)
            except ImportError:
                from vllm.sampling_params import GuidedDecodingParams
                kwargs["guided_decoding"] = GuidedDecodingParams(regex=regex)
        return self._api.SamplingParams(**kwargs)

    # ------------------------------------------------------------------ protocol
    def plan(self, requests: Sequence[Request]) -> list[list[int]]:
        """Sample groups in order, packed into batches of at most ``max_batch`` requests
        (a group longer than that is split); vLLM batches continuously inside a batch."""
        batches: list[list[int]] = []
        batch: list[int] = []
        for group in sample_groups(requests):
            for part in batches_of(group, self.max_batch):
                if batch and len(batch) + len(part) > self.max_batch:
                    batches.append(batch)
                    batch = []
                batch.extend(part)
        if batch:
            batches.append(batch)
        return batches

    def run_batch(self, requests: Sequence[Request]) -> list[Completion]:
        groups = sample_groups(requests)
        out: list[Completion | None] = [None] * len(requests)
        try:
            prompts = [self.encode(self.render(requests[g[0]].message_dicts, requests[g[0]].prefix)) for g in groups]
            params = [sampling_kwargs([requests[i] for i in g], self.stop_strings) for g in groups]
            results = self._run(prompts, params)
            if len(results) != len(groups):
                raise RuntimeError(f"vLLM returned {len(results)} results for {len(groups)} prompts")
        except Exception as err:                  # any engine failure: report it, never fake an answer
            log.exception("vLLM generation failed for a batch of %d", len(requests))
            return [Completion.failed(f"{type(err).__name__}: {err}") for _ in requests]
        for group, result in zip(groups, results):
            for i, completion in zip(group, completions_from_request_output(result, len(group), self.stop_strings)):
                out[i] = completion
        return [c if c is not None else Completion.failed("no vLLM output") for c in out]

    def choice_logprobs(self, prompts: Sequence[Sequence[Message]], prefix: str | Sequence[str],
                        choices: Sequence[str]) -> list[dict[str, float]]:
        """Log-prob of each single-token choice right after ``prefix`` (one, or one per prompt) in
        the assistant turn."""
        texts = [self.render(p, x) for p, x in zip(prompts, prefixes(prefix, len(prompts)))]
        rows, cut = [], []
        for text in texts:
            base = self.encode(text)
            for choice in choices:
                full = self.encode(text + choice)
                if full[:len(base)] != base or len(full) != len(base) + 1:
                    raise ValueError(f"choice {choice!r} is not a single token after the prefix for {self.name}; "
                                     "choice_logprobs needs single-token choices")
                rows.append(full)
                cut.append(len(base))
        results = self._run(rows, [scoring_kwargs()] * len(rows))
        values = [prompt_token_logprobs(r.prompt_logprobs, ids, start)[0]
                  for r, ids, start in zip(results, rows, cut)]
        k = len(choices)
        return [dict(zip(choices, values[i * k:(i + 1) * k])) for i in range(len(texts))]

    def score(self, prompts: Sequence[Sequence[Message]], continuations: Sequence[str]) -> list[list[float]]:
        """Teacher-forced per-token log-probs of each continuation as the assistant's reply."""
        rows, cut = [], []
        for messages, continuation in zip(prompts, continuations, strict=True):
            rendered = self.render(messages)
            head = self.encode(rendered)
            full = self.encode(rendered + continuation)
            if full[:len(head)] != head:           # the continuation merged into the head's last token
                full = head + self.encode(continuation)
            rows.append(full)
            cut.append(len(head))
        results = self._run(rows, [scoring_kwargs()] * len(rows))
        return [prompt_token_logprobs(r.prompt_logprobs, ids, start) for r, ids, start in zip(results, rows, cut)]
