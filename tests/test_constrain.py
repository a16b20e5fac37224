"""Constrained final answers (wowlib.llm.constrain + the hf engine): only the answer's tokens can
come out, however hard the model pushes for another; letters map back through the option shuffle.

Each test forces the issue: the model's logits are biased towards a token the constraint forbids,
so a constraint that leaks would produce it.
"""
from __future__ import annotations

import re

import pytest
import torch

from wowlib.llm import constrain
from wowlib.llm.base import Decoding, Request
from wowlib.llm.engine.hf import HFModel


def biased(model: HFModel, token_ids: list[int], bonus: float = 50.0) -> HFModel:
    """``model`` whose logits favour ``token_ids`` by ``bonus`` at every position."""
    inner = model.model
    original = inner.forward

    def forward(*args, **kwargs):
        out = original(*args, **kwargs)
        out.logits[..., token_ids] += bonus
        return out
    inner.forward = forward
    return model


def ask(model: HFModel, constraint: str, opening: str, n: int = 3, tokens: bool = False) -> list:
    """The constrained replies to ``n`` questions (with their answer token counts if ``tokens``)."""
    decoding = Decoding(temperature=0.0, max_new_tokens=6, constraint=constraint)
    requests = [Request.chat([{"role": "user", "content": f"Question {k}: how much is {k} plus 5?"}], decoding,
                             prefix=opening) for k in range(n)]
    completions = model.run_batch(requests)
    assert all(c.status == "ok" for c in completions), completions
    return [(c.text, c.n_tokens) if tokens else c.text for c in completions]


def single_tokens(model: HFModel, texts: list[str]) -> list[int]:
    ids = [model.tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    return [i[0] for i in ids if len(i) == 1]


@pytest.fixture(scope="module")
def tiny(tiny_dir):
    return HFModel("tiny", tiny_dir)


def test_constraint_specs():
    assert constrain.Constraint.parse("letters:ABCD").letters == "ABCD"
    assert constrain.Constraint.parse("number:signed,decimal") == constrain.Constraint("number", signed=True,
                                                                                       decimal=True)
    for bad in ("letters:", "letters:AB1", "letters:AA", "number:float", "digits"):
        with pytest.raises(ValueError, match="constraint"):
            constrain.Constraint.parse(bad)
    with pytest.raises(ValueError, match="greedy"):
        Decoding(temperature=1.0, constraint="number")


@pytest.mark.parametrize("forbidden", [["E", " E", "F"], ["the", " the", "answer", "."]])
def test_letters_never_leave_the_options(tiny_dir, forbidden):
    model = HFModel("tiny", tiny_dir)
    biased(model, single_tokens(model, forbidden))
    for text in ask(model, "letters:ABCD", "The answer is"):
        assert re.fullmatch(r"The answer is ?[ABCD]", text), text


@pytest.mark.parametrize("forbidden", [["x", " x", "A", "the", " the", "-", "."], ["E", " E", "\n", "0."]])
def test_numbers_are_digits_only(tiny_dir, forbidden):
    model = HFModel("tiny", tiny_dir)
    biased(model, single_tokens(model, forbidden))
    for text in ask(model, "number", "The total weight is"):
        assert re.fullmatch(r"The total weight is ?\d{1,6}", text), text


def test_a_number_ends_where_the_model_prefers_a_non_digit(tiny_dir):
    """Bias every (unspaced) digit token strongly: the answer runs to the length bound, all digits
    (" 7" after a digit would start a new word, not continue the number). Bias a word instead: the
    answer is the single, forced, first digit."""
    model = HFModel("tiny", tiny_dir)
    classes = constrain.TokenClasses.of(model.tokenizer)
    biased(model, sorted(classes.digits))
    assert all(re.fullmatch(r"The total weight is ?\d+", t) and n == 6       # the bound: max_new_tokens
               for t, n in ask(model, "number", "The total weight is", tokens=True))
    word = HFModel("tiny", tiny_dir)
    biased(word, single_tokens(word, ["the", " the"]))
    assert all(re.fullmatch(r"The total weight is ?\d+", t) and n == 1
               for t, n in ask(word, "number", "The total weight is", tokens=True))


def test_signed_decimal_numbers(tiny_dir):
    model = HFModel("tiny", tiny_dir)
    classes = constrain.TokenClasses.of(model.tokenizer)
    biased(model, sorted(classes.minus | classes.spaced_minus | classes.point | classes.digits), bonus=30.0)
    for text in ask(model, "number:signed,decimal", "The final answer is"):
        assert re.fullmatch(r"The final answer is ?-?\d+(\.\d+)?", text), text


def test_constrained_letters_map_back_through_the_shuffle(tiny_dir, data_dir):
    """Every sample sees the options in its own order; a constrained "B" is the option shown second."""
    from wowlib.sample import answer_questions
    from wowlib.tasks import get_task
    model = HFModel("tiny", tiny_dir)
    biased(model, single_tokens(model, ["B", " B"]), bonus=100.0)
    task = get_task("kc", data_dir=data_dir)
    records = answer_questions(model_cached(model), task, task.questions("train", 2), 4,
                               Decoding(temperature=1.0, max_new_tokens=8), Decoding(temperature=0.0, max_new_tokens=8),
                               seed=0, split="train", mode="constrained")
    assert {r["extraction"].replace(" ", "") for r in records} == {"TheanswerisB"}
    assert all(r["parse_rule"] == "constrained" and r["answer"] == r["option_order"][1] for r in records)
    assert len({tuple(r["option_order"]) for r in records}) > 1          # the orders differ, the letter does not


def model_cached(model: HFModel):
    """The model as the samplers use it (a CachedLLM in a throwaway directory)."""
    import tempfile

    from wowlib.llm.cache import CachedLLM
    return CachedLLM(model, tempfile.mkdtemp())


@pytest.mark.slow
def test_smollm2_constrained_answers_are_only_allowed_tokens():
    """The embedded model, pushed towards the node-id answers it writes in free text ("node 3")."""
    from wowlib.llm.models import load_llm
    model = load_llm("smollm2-135m", dtype="fp32")
    biased(model, single_tokens(model, [" node", "node", " There", " no", ".", " E"]))
    for text in ask(model, "number", "The total weight is"):
        assert re.fullmatch(r"The total weight is \d{1,6}", text), text
    for text in ask(model, "letters:ABCD", "The answer is"):
        assert re.fullmatch(r"The answer is [ABCD]", text), text


def test_api_backends_refuse_and_fall_back_only_when_allowed():
    from wowlib.sample import extraction_mode

    class API:
        name, supports_constraints = "api", False
    with pytest.raises(ValueError, match="cannot constrain"):
        extraction_mode(API(), "constrained")
    assert extraction_mode(API(), "constrained", fallback=True) == "text"
    assert extraction_mode(API(), "text") == "text"
