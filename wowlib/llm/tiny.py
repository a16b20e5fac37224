"""The test model: a tiny Llama built from a config, with a byte-level BPE tokenizer trained
in-process, then taught the *formats* of the pipeline for a few hundred steps on synthetic
chats (answer "... The answer is C.", reply to the extraction turn with the letter or with the
instruction's opening and a number, "The total weight is 12.", end a judgment with "Preferred
output: 2." or five "Response k: ... Score: n" lines).

It knows nothing about the tasks: its answers are random but parseable, which is exactly what the
tests need to drive every stage (WoW pairs, judgments, preferences, training) in seconds.

It SHIPS with the package (``wowlib/llm/tiny_model/``, ~0.7 MB): training it is floating-point
work whose result differs in the last bits from one CPU to another (AVX2, AVX-512, AMX), and a
few hundred optimiser steps turn those bits into a different model, with different answers. A
model built on each machine made the tests pass on one CPU and fail on another; the shipped
weights are the same everywhere. ``python -m wowlib.llm.tiny`` rebuilds it (after changing
``SPEC`` or the formats); a test checks that the shipped files match ``SPEC``.
"""
from __future__ import annotations

import json
import logging
import os
import random
import shutil
from pathlib import Path

from .. import paths
from ..store import file_lock

log = logging.getLogger(__name__)

SPEC = {
    "version": 4,
    "vocab_size": 1024,
    "hidden_size": 64,
    "intermediate_size": 192,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 4096,
    "train_steps": 2000,
    "seed": 0,
}
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
WORDS = ["the", "first", "option", "is", "wrong", "because", "the", "graph", "edge", "weight", "node", "path", "flow", "blank", "constraint", "move", "position", "so", "we", "check", "each", "step", "then", "compare", "values", "and", "pick", "the", "best", "one", "answer", "total", "sum", "capacity", "applicant", "job", "knowledge", "person", "film", "award", "prize", "city", "river"]


SHIPPED = Path(__file__).resolve().parent / "tiny_model"


def tiny_model_dir() -> Path:
    """The shipped tiny model; an error if its files do not match ``SPEC`` (rebuild it)."""
    spec_file = SHIPPED / "wowlib_spec.json"
    if not spec_file.exists():
        raise FileNotFoundError(f"the tiny test model is missing from {SHIPPED}: rebuild it with "
                                "python -m wowlib.llm.tiny (or reinstall the package)")
    shipped = json.loads(spec_file.read_text())
    if shipped != SPEC:
        raise RuntimeError(f"{SHIPPED} was built from another spec ({shipped}) than wowlib.llm.tiny.SPEC "
                           f"({SPEC}): rebuild it with python -m wowlib.llm.tiny")
    return SHIPPED


def rebuild(target: Path = SHIPPED) -> Path:
    """Train the tiny model from ``SPEC`` into ``target`` (the shipped folder by default)."""
    with file_lock(paths.cache_dir() / "tiny-build.lock"):
        _build(target)
    return target


def _build(target: Path) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    log.info("building the tiny test model into %s", target)
    tmp = target.with_name(f"{target.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    rng = random.Random(SPEC["seed"])
    chats = [_synthetic_chat(rng) for _ in range(1500)]
    tokenizer = _train_tokenizer(chats)
    torch.manual_seed(SPEC["seed"])
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=SPEC["hidden_size"], intermediate_size=SPEC["intermediate_size"],
        num_hidden_layers=SPEC["num_hidden_layers"], num_attention_heads=SPEC["num_attention_heads"],
        num_key_value_heads=SPEC["num_key_value_heads"], max_position_embeddings=SPEC["max_position_embeddings"],
        tie_word_embeddings=True, bos_token_id=None, eos_token_id=tokenizer.convert_tokens_to_ids("<|im_end|>"),
        pad_token_id=tokenizer.pad_token_id)
    model = LlamaForCausalLM(config)
    _teach_formats(model, tokenizer, chats)
    model.generation_config.eos_token_id = config.eos_token_id
    model.generation_config.pad_token_id = config.pad_token_id
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    (tmp / "wowlib_spec.json").write_text(json.dumps(SPEC, indent=1))
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(target, ignore_errors=True)
    os.replace(tmp, target)


def _train_tokenizer(chats: list[list[dict]]):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=SPEC["vocab_size"], special_tokens=SPECIAL,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    texts = [m["content"] for chat in chats for m in chat]
    tok.train_from_iterator(texts, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   bos_token=None, unk_token=None)
    fast.chat_template = CHAT_TEMPLATE
    return fast


def _filler(rng: random.Random, lo: int, hi: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(lo, hi)))


def _synthetic_chat(rng: random.Random) -> list[dict]:
    """One chat in one of the pipeline's formats, with random content."""
    from ..tasks import nlgraph
    cot = paths.prompt_text("cot")
    kind = rng.choice(["mc", "mc", "number", "number", "number", "pairwise", "score"])
    if kind == "mc":
        n = rng.choice([4, 4, 4, 10])
        options = "".join(f"{chr(65 + i)}. {_filler(rng, 1, 8)}\n" for i in range(n))
        question = f"Question: {_filler(rng, 10, 120)}\nOptions:\n{options}"
        letter = chr(65 + rng.randrange(n))
        answer = f"{_filler(rng, 5, 40)}. The answer is {letter}."
        return [{"role": "user", "content": cot + question}, {"role": "assistant", "content": answer},
                {"role": "user", "content": paths.prompt_text("extract_multiple_choice")},
                {"role": "assistant", "content": letter}]
    if kind == "number":
        task = rng.choice(["nlgraph_shortest_path", "nlgraph_flow", "nlgraph_matching"])
        item = nlgraph.generate_problems(task, 1, rng.choice(["easy", "hard"]), rng.randrange(10**6))["0"]
        value = str(rng.randint(0, 30))
        answer = f"{_filler(rng, 5, 40)}. The answer is {value}."
        extract, opening = {"nlgraph_shortest_path": ("extract_shortest_path", "The total weight is"),
                            "nlgraph_flow": ("extract_maximum_flow", "The maximum flow is"),
                            "nlgraph_matching": ("extract_matching", "The maximum number of matches is")}[task]
        # half of the questions short: the format to learn is to COPY the answer's number into the
        # extraction reply, and short chats teach it in fewer (and faster) steps
        question = item["question"][:-3] if rng.random() < 0.5 else _filler(rng, 10, 40)
        return [{"role": "user", "content": cot + "Question: " + question},
                {"role": "assistant", "content": answer},
                {"role": "user", "content": paths.prompt_text(extract)},
                {"role": "assistant", "content": f"{opening} {value}."}]
    if kind == "pairwise":
        prompt = paths.prompt_text("judge_pairwise").format(
            instruction=_filler(rng, 10, 60), output_1=_filler(rng, 10, 80), output_2=_filler(rng, 10, 80))
        verdict = rng.choice("12")
        return [{"role": "user", "content": prompt},
                {"role": "assistant", "content": f"{_filler(rng, 5, 30)}.\nPreferred output: {verdict}."}]
    responses = {f"response_{k}": _filler(rng, 5, 40) for k in range(1, 6)}
    prompt = paths.prompt_text("judge_score").format(instruction=_filler(rng, 10, 60), **responses)
    lines = "\n".join(f"Response {k}: {_filler(rng, 3, 12)}.\nScore: {rng.randint(0, 5)}" for k in range(1, 6))
    return [{"role": "user", "content": prompt}, {"role": "assistant", "content": lines}]


def _encode_chat(tokenizer, chat: list[dict]) -> tuple[list[int], list[int]]:
    """Token ids of a chat and labels that train only the assistant turns."""
    ids: list[int] = []
    labels: list[int] = []
    for message in chat:
        head = tokenizer(f"<|im_start|>{message['role']}\n", add_special_tokens=False)["input_ids"]
        body = tokenizer(f"{message['content']}<|im_end|>\n", add_special_tokens=False)["input_ids"]
        ids += head + body
        labels += [-100] * len(head) + (body if message["role"] == "assistant" else [-100] * len(body))
    return ids, labels


def _teach_formats(model, tokenizer, chats: list[list[dict]]) -> None:
    import torch
    encoded = [_encode_chat(tokenizer, chat) for chat in chats]
    rng = random.Random(SPEC["seed"])
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    model.train()
    pad = tokenizer.pad_token_id
    for step in range(SPEC["train_steps"]):
        batch = rng.sample(encoded, 8)
        width = max(len(ids) for ids, _ in batch)
        input_ids = torch.tensor([ids + [pad] * (width - len(ids)) for ids, _ in batch])
        labels = torch.tensor([lab + [-100] * (width - len(lab)) for _, lab in batch])
        mask = torch.tensor([[1] * len(ids) + [0] * (width - len(ids)) for ids, _ in batch])
        loss = model(input_ids=input_ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        if step % 100 == 0 or step == SPEC["train_steps"] - 1:
            log.info("tiny model step %d: loss %.3f", step, loss.item())
    model.eval()


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    print(rebuild())
