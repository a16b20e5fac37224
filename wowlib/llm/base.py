"""The LLM protocol every backend implements, and the records it returns.

A request is a chat (a list of ``{"role", "content"}`` messages) plus decoding parameters, a
sample index and a seed. A backend answers a *batch* of requests; the call cache
(``wowlib.llm.cache``) decides which batches still need answering.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Protocol

Message = dict[str, str]


@dataclass(frozen=True)
class Decoding:
    """Decoding parameters. ``temperature == 0`` means greedy."""

    temperature: float = 1.0
    max_new_tokens: int = 512
    top_p: float = 1.0
    min_new_tokens: int = 0          # stop tokens are suppressed before this (benchmarks force lengths)
    # A constrained final answer (``wowlib.llm.constrain``): "letters:ABCD" or "number[:signed,decimal]";
    # greedy only, after the request's ``prefix``. None: free text.
    constraint: str | None = None
    # Stop a reply that has started to repeat itself (the same span of at most ``REPEAT_MAX_PERIOD``
    # tokens over its last ``repeat_window(period)`` tokens): small models at temperature 1 loop until
    # any length cap, and a looped reply has ended in all but name. Its finish is "repeat".
    stop_on_repeat: bool = False

    def __post_init__(self) -> None:
        if (self.temperature < 0 or not 0 < self.top_p <= 1 or self.max_new_tokens < 1
                or not 0 <= self.min_new_tokens <= self.max_new_tokens):
            raise ValueError(f"invalid decoding parameters {self}")
        if self.constraint is not None:
            from .constrain import Constraint
            Constraint.parse(self.constraint)
            if not self.greedy:
                raise ValueError(f"a constrained answer is greedy (temperature 0), got {self}")

    def as_json(self) -> dict:
        """The parameters as the call cache keys them (a field left at None is left out, so
        keys written before it existed stay valid)."""
        d = asdict(self)
        for name, unset in (("constraint", None), ("stop_on_repeat", False)):
            if d[name] == unset:
                del d[name]
        return d

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


GREEDY_32 = Decoding(temperature=0.0, max_new_tokens=32)   # the paper's answer-extraction call
REPEAT_MAX_PERIOD = 16                 # longest repeating span (tokens) that ``stop_on_repeat`` looks for
REPEAT_MIN_TOKENS = 32                 # ... and how many tokens the repetition must cover (at least 4 periods)


def repeat_window(period: int) -> int:
    return max(REPEAT_MIN_TOKENS, 4 * period)


def is_repeating(tokens: Sequence[int]) -> bool:
    """Whether the reply's last tokens are one span of at most ``REPEAT_MAX_PERIOD`` tokens over and
    over (``Decoding.stop_on_repeat``): tokens[-w:] equals itself shifted by the period."""
    n = len(tokens)
    for period in range(1, REPEAT_MAX_PERIOD + 1):
        window = repeat_window(period)
        if n < window + period:
            break
        if tokens[n - window:] == tokens[n - window - period:n - period]:
            return True
    return False


@dataclass(frozen=True)
class Request:
    messages: tuple[tuple[str, str], ...]      # ((role, content), ...): hashable, ordered
    decoding: Decoding = Decoding()
    sample_idx: int = 0
    seed: int = 0
    prefix: str = ""                           # the start of the assistant's reply, given (prefilled)

    @classmethod
    def chat(cls, messages: Sequence[Message], decoding: Decoding = Decoding(), sample_idx: int = 0,
             seed: int = 0, prefix: str = "") -> Request:
        for m in messages:
            if set(m) != {"role", "content"} or m["role"] not in ("system", "user", "assistant"):
                raise ValueError(f"a message needs exactly 'role' (system/user/assistant) and 'content': {m!r:.80}")
        return cls(tuple((m["role"], m["content"]) for m in messages), decoding, sample_idx, seed, prefix)

    @property
    def message_dicts(self) -> list[Message]:
        return [{"role": r, "content": c} for r, c in self.messages]

    @property
    def prompt_key(self) -> tuple:
        """What a backend renders: the chat and the prefilled start of the reply."""
        return (self.messages, self.prefix)

    def as_json(self) -> dict:
        d = {"messages": [list(m) for m in self.messages], "decoding": self.decoding.as_json(),
             "sample_idx": self.sample_idx, "seed": self.seed}
        if self.prefix:
            d["prefix"] = self.prefix
        return d


@dataclass
class Completion:
    """One answer. A failed call has ``status == "error"`` and an ``error`` text, never a fake
    answer; it is not cached, so a rerun retries it."""

    text: str
    n_tokens: int
    mean_logprob: float | None
    finish: str = "stop"                 # "stop" | "length" | "repeat" (Decoding.stop_on_repeat) | "error"
    status: str = "ok"
    error: str | None = None
    token_logprobs: list[float] | None = field(default=None, repr=False)

    @classmethod
    def failed(cls, error: str) -> Completion:
        return cls(text="", n_tokens=0, mean_logprob=None, finish="error", status="error", error=error)

    def as_json(self) -> dict:
        d = asdict(self)
        d.pop("token_logprobs")
        return d


class LLM(Protocol):
    """What every backend provides."""

    name: str       # a short label for tables ("smollm2-135m", "smollm2-135m+dpo-oracle")
    key: str        # identity for the call cache: backend, model id, adapter hash
    supports_constraints: bool    # answers requests with ``Decoding.constraint`` (and a prefix)

    def plan(self, requests: Sequence[Request]) -> list[list[int]]:
        """Split request indices into batches; deterministic in the request list."""
        ...

    def run_batch(self, requests: Sequence[Request]) -> list[Completion]:
        """Answer one planned batch."""
        ...

    def choice_logprobs(self, prompts: Sequence[Sequence[Message]], prefix: str | Sequence[str],
                        choices: Sequence[str]) -> list[dict[str, float]]:
        """For each chat, the log-probability of each choice as the first token(s) of the
        assistant turn after ``prefix`` (e.g. prefix "Preferred output: ", choices "1", "2");
        ``prefix`` may also be a sequence, one per chat (see ``prefixes``)."""
        ...

    def score(self, prompts: Sequence[Sequence[Message]], continuations: Sequence[str]) -> list[list[float]]:
        """Per-token log-probabilities of each continuation as the assistant's reply."""
        ...


def prefixes(prefix: str | Sequence[str], n: int) -> list[str]:
    """``choice_logprobs``' prefix as one string per prompt (a string is every prompt's)."""
    if isinstance(prefix, str):
        return [prefix] * n
    if len(prefix) != n:
        raise ValueError(f"choice_logprobs: {len(prefix)} prefixes for {n} prompts (give one, or one per prompt)")
    return list(prefix)


def batches_of(indices: list[int], size: int) -> list[list[int]]:
    return [indices[i:i + size] for i in range(0, len(indices), size)]
