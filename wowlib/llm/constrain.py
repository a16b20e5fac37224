"""Constrained final answers: the model's own decision after its reasoning, in the answer's vocabulary.

A 135M model rarely follows "start your answer with 'The total weight is'": asked again for its
final answer it writes free text, and reading a number out of that text reads node ids and step
counts. In constrained mode the extraction turn's reply is *prefilled* with the instruction's own
opening ("The total weight is", "The answer is") and the continuation is restricted to what an
answer can be:

- ``letters:ABCD``: one token, the most probable of the question's option letters (greedy =
  argmax of the log-probs over the letters);
- ``number`` (optionally ``number:signed,decimal``): the most probable digit token first (or a
  minus sign, where the task allows one); then, greedily, further digit tokens (and one decimal
  point where the task allows) for as long as the model's most probable next token IS one, up to
  the request's ``max_new_tokens``: the number ends at the first non-digit the model prefers.

The prefilled opening is followed by a space where the tokenizer writes the space as a token of
its own (SmolLM2, Llama 3: " 7" is " " then "7"), and left without one where a token carries the
space (" 7", " B"), so that the answer is spelled the way the model would spell it.

This module holds the backend-independent part (the constraint spec, the token classes of a
tokenizer, the per-row state machine on next-token log-probs); ``wowlib.llm.engine.hf`` runs it inside
its decoding loop. A backend that cannot constrain says so (``supports_constraints``).
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

LETTERS_KIND, NUMBER_KIND = "letters", "number"
_DIGITS = re.compile(r"\d+")


@dataclass(frozen=True)
class Constraint:
    """A parsed constraint spec (``Decoding.constraint``): ``letters:ABCD`` or ``number[:signed,decimal]``."""

    kind: str
    letters: str = ""
    signed: bool = False
    decimal: bool = False

    @classmethod
    def parse(cls, spec: str) -> Constraint:
        kind, _, rest = spec.partition(":")
        if kind == LETTERS_KIND:
            if not rest or not rest.isalpha() or not rest.isupper() or len(set(rest)) != len(rest):
                raise ValueError(f"constraint {spec!r}: expected letters:<distinct capital letters>, e.g. letters:ABCD")
            return cls(kind, letters=rest)
        if kind == NUMBER_KIND:
            flags = set(filter(None, rest.split(",")))
            if flags - {"signed", "decimal"}:
                raise ValueError(f"constraint {spec!r}: unknown flags {sorted(flags - {'signed', 'decimal'})} "
                                 "(allowed: signed, decimal)")
            return cls(kind, signed="signed" in flags, decimal="decimal" in flags)
        raise ValueError(f"constraint {spec!r}: expected 'letters:<LETTERS>' or 'number[:signed,decimal]'")

    @property
    def probe(self) -> str:
        """A first answer token, to find how the tokenizer spells it after the opening."""
        return self.letters[0] if self.kind == LETTERS_KIND else "7"


@dataclass
class TokenClasses:
    """The token ids of a vocabulary by what they spell (computed once per tokenizer)."""

    digits: set[int] = field(default_factory=set)          # "7", "42" (no space)
    spaced_digits: set[int] = field(default_factory=set)   # " 7"
    minus: set[int] = field(default_factory=set)
    spaced_minus: set[int] = field(default_factory=set)
    point: set[int] = field(default_factory=set)
    letters: dict[str, int] = field(default_factory=dict)         # "B" -> id
    spaced_letters: dict[str, int] = field(default_factory=dict)  # " B" -> id

    @classmethod
    def of(cls, tokenizer: Any) -> TokenClasses:
        out = cls()
        special = set(getattr(tokenizer, "all_special_ids", []) or [])
        for token_id in range(len(tokenizer)):
            if token_id in special:
                continue
            text = tokenizer.decode([token_id])
            if _DIGITS.fullmatch(text):
                out.digits.add(token_id)
            elif text.startswith(" ") and _DIGITS.fullmatch(text[1:]):
                out.spaced_digits.add(token_id)
            elif text == "-":
                out.minus.add(token_id)
            elif text == " -":
                out.spaced_minus.add(token_id)
            elif text == ".":
                out.point.add(token_id)
            elif len(text) == 1 and text.isupper() and text.isascii():
                out.letters.setdefault(text, token_id)
            elif len(text) == 2 and text[0] == " " and text[1].isupper() and text[1].isascii():
                out.spaced_letters.setdefault(text[1], token_id)
        return out


@dataclass(frozen=True)
class Plan:
    """How one (opening, constraint) is decoded by one tokenizer: the text to prefill and the
    tokens allowed as the first answer token."""

    constraint: Constraint
    prefill: str
    first: tuple[int, ...]
    first_sign: tuple[int, ...] = ()


def plan(tokenizer: Any, classes: TokenClasses, context: str, opening: str, constraint: Constraint) -> Plan:
    """The prefill and first tokens for ``opening`` after the rendered chat ``context``: without
    a space if the tokenizer spells the probe answer as one spaced token (" 7"), else with the
    space in the prefill and unspaced answer tokens."""
    base = tokenizer(context + opening, add_special_tokens=False)["input_ids"]
    probe = tokenizer(context + opening + " " + constraint.probe, add_special_tokens=False)["input_ids"]
    extra = probe[len(base):] if probe[:len(base)] == base else []
    spaced_set = classes.spaced_letters.values() if constraint.kind == LETTERS_KIND else classes.spaced_digits
    spaced = len(extra) == 1 and extra[0] in set(spaced_set)
    prefill = opening if spaced else opening + " "
    if constraint.kind == LETTERS_KIND:
        table = classes.spaced_letters if spaced else classes.letters
        missing = [c for c in constraint.letters if c not in table]
        if missing:
            raise ValueError(f"the tokenizer has no single token for the option letters {missing} "
                             f"({'with' if spaced else 'without'} a leading space)")
        return Plan(constraint, prefill, tuple(table[c] for c in constraint.letters))
    first = classes.spaced_digits if spaced else classes.digits
    if not first:
        raise ValueError("the tokenizer has no digit tokens")
    sign = (classes.spaced_minus if spaced else classes.minus) if constraint.signed else set()
    return Plan(constraint, prefill, tuple(sorted(first)), tuple(sorted(sign)))


class RowState:
    """Where one row's answer is: ``start`` (first token, restricted), ``sign`` (after a minus:
    digits only), ``digits`` (free: go on while the model prefers a digit or a first point),
    ``point`` (after a point: go on only with a digit), ``done``."""

    def __init__(self, plan: Plan, classes: TokenClasses) -> None:
        self.plan, self.classes = plan, classes
        self.phase = "start"
        self.used_point = False
        self.trailing_point = False

    def step(self, logprobs: Any) -> tuple[int | None, float | None]:
        """(token, its log-prob) for this step from the row's next-token log-probs (a 1-D torch
        tensor over the vocabulary), or (None, None): the answer ended before this token."""
        import torch
        c = self.plan.constraint
        if self.phase in ("start", "sign"):
            allowed = self.plan.first + self.plan.first_sign if self.phase == "start" else \
                tuple(sorted(self.classes.digits))
            ids = torch.tensor(allowed, device=logprobs.device)
            token = int(ids[int(logprobs[ids].argmax())])
            if c.kind == LETTERS_KIND:
                self.phase = "done"
            elif token in self.plan.first_sign:
                self.phase = "sign"
            else:
                self.phase = "digits"
            return token, float(logprobs[token])
        token = int(logprobs.argmax())
        if token in self.classes.digits:
            self.phase, self.trailing_point = "digits", False
            return token, float(logprobs[token])
        if self.phase == "digits" and c.decimal and not self.used_point and token in self.classes.point:
            self.phase, self.used_point, self.trailing_point = "point", True, True
            return token, float(logprobs[token])
        self.phase = "done"
        return None, None

    @property
    def finished(self) -> bool:
        return self.phase == "done"
