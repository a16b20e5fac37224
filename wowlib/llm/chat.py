"""What every local transformers backend shares: a model loaded with its adapter merged, the chat
as the model sees it, stop tokens and strings, how a reply's tokens become its text and
confidence, constrained answers, and teacher-forced scoring. ``reference.ReferenceModel``
decodes with plain ``transformers.generate``; ``hf.HFModel`` is the fast CPU engine, tested to
give the same replies and log-probs (tests/test_reference.py)."""
from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path

import torch

from . import constrain, cpu
from .base import Completion, Decoding, Message, Request, batches_of, is_repeating

BF16_MIN_PARAMS = 50_000_000        # below this, bf16 casts cost more than the matmuls save (measured)


def inference_dtype(choice: str, device: torch.device, n_params: int | None) -> torch.dtype:
    """The inference dtype. "auto": bf16 on a GPU that supports it; on a CPU, bf16 where it was
    measured to pay off (hardware bf16, AMX or AVX512-BF16, and a model of >= 50M parameters:
    SmolLM2-135M decodes ~2x faster with AMX, 2.3x with AVX512-BF16 (124 -> 290 tokens/s on a
    2-core AMD EPYC); the 0.2M-parameter test model is slower in bf16), else fp32."""
    if choice not in ("auto", "fp32", "bf16"):
        raise ValueError(f"dtype must be auto, fp32 or bf16, got {choice!r}")
    if choice == "auto":
        if device.type == "cuda":
            choice = "bf16" if torch.cuda.is_bf16_supported() else "fp32"
        elif device.type == "cpu":
            large = n_params is not None and n_params >= BF16_MIN_PARAMS
            choice = "bf16" if cpu.has_bf16() and large else "fp32"
    if choice == "bf16" and device.type == "cpu" and not cpu.has_bf16():
        raise ValueError("bf16 on this CPU is emulated and slow: use fp32 (dtype='auto') on CPU")
    return torch.bfloat16 if choice == "bf16" else torch.float32


def adapter_hash(adapter_dir: Path) -> str:
    """Hash of a PEFT adapter's weights and config: part of the cache key of its answers. The
    adapter is verified first (``align.verify_adapter``: an error names a damaged file)."""
    from ..align import verify_adapter
    verify_adapter(adapter_dir)
    digest = hashlib.sha256()
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        path = adapter_dir / name
        if not path.exists():
            raise FileNotFoundError(f"not a PEFT adapter directory (missing {name}): {adapter_dir}")
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


class ChatModel:
    """A causal LM from a local directory (or a hub id the user named), optionally with a PEFT
    adapter merged, answering chat requests. Subclasses decode (``run_batch``) and pick the
    inference dtype (``_dtype``)."""

    supports_constraints = True

    def __init__(self, name: str, path: str | Path, adapter: str | Path | None = None,
                 stop_strings: Sequence[str] = (), device: str = "auto", model=None, tokenizer=None) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer
        self.device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device)
        self.tokenizer = tokenizer or AutoTokenizer.from_pretrained(str(path))
        # On a CPU: load (and merge an adapter) in fp32, then cast once, so a LoRA delta is added
        # before rounding. A model passed in is used as it is.
        self.model = model or AutoModelForCausalLM.from_pretrained(
            str(path), dtype=torch.float32 if self.device.type == "cpu" else self._dtype(None))
        self.adapter_hash = None
        if adapter is not None:
            from peft import PeftModel
            self.adapter_hash = adapter_hash(Path(adapter))
            self.model = PeftModel.from_pretrained(self.model, str(adapter)).merge_and_unload()
        self.model.to(self.device).eval()
        self.n_params = sum(p.numel() for p in self.model.parameters())
        if model is None:
            self.model.to(self._dtype(self.n_params))
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        from .models import chat_format
        self.stop_ids = self._stop_ids()
        self.stop_strings = tuple(dict.fromkeys(tuple(stop_strings) + chat_format(self.tokenizer)))
        self._classes: constrain.TokenClasses | None = None      # built on the first constrained request
        self._plans: dict[tuple[str, str], constrain.Plan] = {}
        self.name = name if adapter is None else f"{name}+{Path(adapter).name}"

    def _dtype(self, n_params: int | None) -> torch.dtype:
        raise NotImplementedError

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    # ------------------------------------------------------------------ prompts and replies
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

    def _prompt_text(self, request: Request) -> str:
        """The text a request decodes after: the chat, then its prefilled reply start (for a
        constrained answer, the opening as ``constrain.plan`` spells it)."""
        if request.decoding.constraint is None:
            return self.render(request.message_dicts, request.prefix)
        return self.render(request.message_dicts, self._answer_plan(request).prefill)

    def _token_classes(self) -> constrain.TokenClasses:
        if self._classes is None:
            self._classes = constrain.TokenClasses.of(self.tokenizer)
        return self._classes

    def _answer_plan(self, request: Request) -> constrain.Plan:
        """The constrained answer's prefill and first tokens, per (opening, constraint)."""
        key = (request.prefix, request.decoding.constraint)
        if key not in self._plans:
            context = self.render(request.message_dicts)
            self._plans[key] = constrain.plan(self.tokenizer, self._token_classes(), context, request.prefix,
                                              constrain.Constraint.parse(request.decoding.constraint))
        return self._plans[key]

    def _constrained_completion(self, request: Request, state: constrain.RowState, tokens: list[int],
                                logps: list[float], finish: str) -> Completion:
        """The whole reply (prefill + answer tokens; a dangling decimal point dropped)."""
        answer = self.tokenizer.decode(tokens, skip_special_tokens=True)
        text = (self._answer_plan(request).prefill + answer).strip()
        if state.trailing_point:
            text = text.removesuffix(".")
        return Completion(text=text, n_tokens=len(tokens), mean_logprob=sum(logps) / len(logps) if logps else None,
                          finish=finish, token_logprobs=logps)

    def encode(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def finish_reason(self, tokens: list[int], step: int, decoding: Decoding) -> str | None:
        """Why a reply ends after its last token (``step`` counts from 0): "stop" (a stop token or
        string), "repeat" (it loops; checked every 8 tokens), or None: it goes on. Both backends
        end replies by this rule."""
        if tokens[-1] in self.stop_ids or self._hit_stop_string(tokens):
            return "stop"
        if decoding.stop_on_repeat and step % 8 == 7 and is_repeating(tokens):
            return "repeat"
        return None

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

    def _choice_tokens(self, context: str, choices: Sequence[str]) -> tuple[list[int], list[int]]:
        """(tokens all choices share, the last token of each choice) after ``context``."""
        base = self.encode(context)
        seqs = []
        for choice in choices:
            full = self.encode(context + choice)
            if full[:len(base)] != base or len(full) == len(base):
                raise ValueError(f"choice {choice!r} does not extend the prefix by whole tokens for {self.name}")
            seqs.append(full[len(base):])
        shared = seqs[0][:-1]
        if any(seq[:-1] != shared for seq in seqs) or len({seq[-1] for seq in seqs}) != len(seqs):
            raise ValueError(f"choices {list(choices)!r} are not a single token (or shared tokens plus one "
                             f"distinct last token) after the prefix for {self.name}")
        return shared, [seq[-1] for seq in seqs]

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
