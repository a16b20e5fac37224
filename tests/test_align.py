"""Alignment (wowlib.align): configuration, the trl wiring of every trainer, and proof that each
trainer learns a separable toy preference on the tiny model.

The toy set is chosen AGAINST the base model's prior: the tiny model was taught to answer
"... The answer is X.", so it prefers the rejected answer ("The answer is A.") over the chosen one
("I do not know at all.") before training. A trainer that does nothing, or learns the wrong
direction, fails. One test per trl feature we rely on, so a trl upgrade fails loudly.
"""
from __future__ import annotations

import dataclasses
import json
import math
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from wowlib import align, store
from wowlib.align import AlignConfig

pytestmark = pytest.mark.filterwarnings(   # trl 1.16 calls a transformers 5.24 deprecated property
    "ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")

PREFERENCE_TRAINERS = ("dpo", "ipo", "rso", "sppo", "cpo", "simpo", "orpo")
PAPER_LOSSES = {"dpo": "sigmoid", "ipo": "ipo", "rso": "hinge", "sppo": "sppo_hard"}   # trl's names
CHOSEN, REJECTED = "I do not know at all.", "The answer is A."


def toy_prefs(n: int = 16, offset: int = 0) -> list[dict]:
    """Separable pairs, with the provenance columns prefs.py writes (they must not reach trl)."""
    return [{"prompt": f"Question {offset + i}: which option is right?\nOptions:\nA. yes\nB. no\n",
             "chosen": CHOSEN, "rejected": REJECTED, "task": "toy", "question_id": str(offset + i),
             "source": "self", "method": "oracle", "chosen_proxy": 0.5, "rejected_proxy": 0.0}
            for i in range(n)]


def toy_config(trainer: str, **changes) -> AlignConfig:
    """Fast enough to move in a few steps: lr 5e-3, 2 epochs, no warmup, every step logged."""
    return AlignConfig(**{"trainer": trainer, "learning_rate": 5e-3, "num_train_epochs": 2, "warmup_ratio": 0.0,
                          "logging_steps": 1, "max_length": 256, "device": "cpu", "precision": "fp32", **changes})


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """1 torch thread: as fast as 2 for the tiny model, and immune to a busy second core."""
    import torch
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def base(tiny_dir):
    from transformers import AutoModelForCausalLM
    tokenizer = align.load_tokenizer(tiny_dir)
    model = AutoModelForCausalLM.from_pretrained(str(tiny_dir))
    return model, tokenizer


@pytest.fixture(scope="module")
def runs(tiny_dir, tmp_path_factory):
    """Each trainer trained once on the toy set (lazily); the built trl trainer is kept for inspection."""
    root = tmp_path_factory.mktemp("align")
    cache: dict[str, tuple[Path, object]] = {}

    def get(trainer: str):
        if trainer not in cache:
            built = []
            original = align.build_trainer

            def capture(*args, **kwargs):
                built.append(original(*args, **kwargs))
                return built[-1]

            align.build_trainer = capture
            try:
                eval_prefs = toy_prefs(4, offset=100) if trainer == "dpo" else None
                out = align.train(toy_config(trainer), tiny_dir, toy_prefs(), root / trainer, eval_prefs=eval_prefs)
            finally:
                align.build_trainer = original
            cache[trainer] = (out, built[0])
        return cache[trainer]
    return get


def adapted(tiny_dir, adapter_dir: Path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM
    return PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(tiny_dir)), str(adapter_dir))


def mean(values) -> float:
    values = list(values)
    return sum(values) / len(values)


# ---------------------------------------------------------------------------- configuration

def test_defaults_are_the_papers():
    c = AlignConfig()
    assert (c.trainer, c.lora_r, c.lora_alpha, c.beta, c.warmup_ratio, c.learning_rate, c.num_train_epochs,
            c.per_device_train_batch_size) == ("dpo", 16, 16, 0.1, 0.1, 5e-5, 3, 1)
    assert set(c.target_modules) == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    assert c.precompute_ref_log_probs and c.seed == 42


@pytest.mark.parametrize("field, value", [
    ("trainer", "ppo"), ("beta", 0), ("learning_rate", -1e-5), ("lr_scheduler_type", "cosin"),
    ("weight_decay", -0.1), ("num_train_epochs", 0), ("warmup_ratio", 1.0), ("per_device_train_batch_size", 0),
    ("gradient_accumulation_steps", 1.5), ("max_steps", 0), ("lora_r", 0), ("lora_alpha", 0), ("lora_dropout", 1.0),
    ("target_modules", ()), ("max_length", 4), ("seed", "42"), ("logging_steps", 0), ("device", "tpu"),
    ("precompute_ref_batch_size", 0), ("cpo_alpha", -1), ("simpo_gamma", -0.5),
])
def test_validation_names_the_field(field, value):
    with pytest.raises(ValueError, match=rf"AlignConfig\.{field}: "):
        AlignConfig(**{field: value})


def test_schedulers_are_transformers_schedulers():
    from transformers.trainer_utils import SchedulerType
    assert set(align.SCHEDULERS) <= {s.value for s in SchedulerType}


def test_config_is_hashable_and_keyed():
    a, b = AlignConfig(), AlignConfig(target_modules=list(align.PROJECTIONS))
    assert a == b and hash(a) == hash(b) and a.key == b.key
    assert AlignConfig(learning_rate=1e-4).key != a.key
    assert a.tag.startswith("dpo-lr5e-05-linear-wd0-ep3-")


def test_grid_is_the_cartesian_product():
    configs = align.grid(AlignConfig(), learning_rate=[5e-5, 1e-4], lr_scheduler_type=["linear", "cosine"],
                         weight_decay=[0.0, 0.01], num_train_epochs=[1, 3])
    assert len(configs) == 16 == len({c.key for c in configs})
    assert [(c.learning_rate, c.lr_scheduler_type) for c in configs[:5:4]] == [(5e-5, "linear"), (5e-5, "cosine")]
    assert all(c.trainer == "dpo" and c.lora_r == 16 for c in configs)
    assert align.grid(AlignConfig()) == [AlignConfig()]
    assert len(align.grid(AlignConfig(), learning_rate=[5e-5, 5e-5])) == 1


def test_grid_rejects_unknown_axes_and_bad_values():
    with pytest.raises(ValueError, match="unknown AlignConfig field 'lr'"):
        align.grid(AlignConfig(), lr=[1e-4])
    with pytest.raises(TypeError, match="needs a list"):
        align.grid(AlignConfig(), lr_scheduler_type="cosine")
    with pytest.raises(ValueError, match=r"AlignConfig\.weight_decay"):
        align.grid(AlignConfig(), weight_decay=[0.0, -1.0])


# ---------------------------------------------------------------------------- data

def test_records_drop_provenance_and_hash_the_training_columns():
    prefs = toy_prefs(3)
    assert align.pair_records(prefs)[0] == {"prompt": prefs[0]["prompt"], "chosen": CHOSEN, "rejected": REJECTED}
    relabelled = [dict(r, method="direct", chosen_proxy=1.0) for r in prefs]
    assert align.data_hash(relabelled) == align.data_hash(prefs)
    assert align.data_hash(prefs[::-1]) != align.data_hash(prefs)
    assert align.data_hash([dict(prefs[0], chosen="x")] + prefs[1:]) != align.data_hash(prefs)
    with pytest.raises(ValueError, match=r"record 1 lacks \['rejected'\]"):
        align.pair_records([prefs[0], {"prompt": "p", "chosen": "c"}])
    with pytest.raises(ValueError, match="no preference pairs"):
        align.pair_records([])


def test_datasets_are_conversational():
    from datasets import Dataset
    dpo = align.to_dataset(Dataset.from_list(toy_prefs(2)), "dpo")
    assert dpo.column_names == ["prompt", "chosen", "rejected"]
    assert dpo[0]["prompt"] == [{"role": "user", "content": toy_prefs(1)[0]["prompt"]}]
    assert dpo[0]["chosen"] == [{"role": "assistant", "content": CHOSEN}]
    sft = align.to_dataset(toy_prefs(2), "sft")
    assert sft.column_names == ["prompt", "completion"]
    assert sft[0]["completion"] == [{"role": "assistant", "content": CHOSEN}]


def test_cpo_family_gets_the_chat_rendering_as_strings(base):
    _, tokenizer = base
    row = align.to_dataset(toy_prefs(1), "simpo", tokenizer)[0]
    messages = [{"role": "user", "content": toy_prefs(1)[0]["prompt"]}]
    assert row["prompt"] == tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert row["chosen"] == CHOSEN + tokenizer.eos_token and row["rejected"] == REJECTED + tokenizer.eos_token
    with pytest.raises(ValueError, match="needs the tokenizer"):
        align.to_dataset(toy_prefs(1), "orpo")


def test_a_tokenizer_without_chat_template_trains_in_the_plain_format(tiny_dir, tmp_path):
    """A base model without a chat template is trained in the plain transcript format that
    inference gives it (wowlib.llm.models.chat_format), not in an invented one."""
    from wowlib.llm.models import PLAIN_TEMPLATE
    copy = tmp_path / "no-template"
    shutil.copytree(tiny_dir, copy)
    (copy / "chat_template.jinja").unlink(missing_ok=True)
    config = json.loads((copy / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (copy / "tokenizer_config.json").write_text(json.dumps(config))
    assert align.load_tokenizer(copy).chat_template == PLAIN_TEMPLATE


# ---------------------------------------------------------------------------- trl features we rely on

@pytest.mark.parametrize("trainer", ["dpo", "ipo", "rso", "sppo"])
def test_dpo_config_takes_loss_list_bf16_off_and_precompute(trainer):
    from trl import DPOConfig
    args = DPOConfig(output_dir="unused", loss_type=[PAPER_LOSSES[trainer]], bf16=False, fp16=False,
                     use_cpu=True, precompute_ref_log_probs=True, activation_checkpointing=False, warmup_steps=0.1,
                     beta=0.1, max_length=512, report_to="none", save_strategy="no")
    assert args.loss_type == [PAPER_LOSSES[trainer]]
    assert args.bf16 is False and args.precompute_ref_log_probs is True
    assert args.gradient_checkpointing is False and args.activation_checkpointing is False
    assert args.get_warmup_steps(100) == 10          # a float warmup_steps is a ratio (transformers 5)


def test_experimental_cpo_and_orpo_offer_simpo():
    from trl.experimental.cpo import CPOConfig, CPOTrainer  # noqa: F401
    from trl.experimental.orpo import ORPOConfig, ORPOTrainer  # noqa: F401
    simpo = CPOConfig(output_dir="unused", loss_type="simpo", cpo_alpha=0.0, simpo_gamma=0.5, bf16=False,
                      use_cpu=True, max_length=512, activation_checkpointing=False)
    assert (simpo.loss_type, simpo.cpo_alpha, simpo.simpo_gamma) == ("simpo", 0.0, 0.5)
    assert ORPOConfig(output_dir="unused", beta=0.1, bf16=False, use_cpu=True,
                      activation_checkpointing=False).beta == 0.1


@pytest.mark.parametrize("trainer, cls", [
    ("dpo", "DPOTrainer"), ("ipo", "DPOTrainer"), ("rso", "DPOTrainer"), ("sppo", "DPOTrainer"),
    ("cpo", "CPOTrainer"), ("simpo", "CPOTrainer"), ("orpo", "ORPOTrainer"), ("sft", "SFTTrainer")])
def test_build_trainer_wiring(runs, trainer, cls):
    from peft import PeftModel
    _, built = runs(trainer)
    args = built.args
    assert cls in [k.__name__ for k in type(built).__mro__]     # DPO: trl's class, reference shared
    assert isinstance(built.model, PeftModel)
    lora = built.model.peft_config["default"]
    assert (lora.r, lora.lora_alpha) == (16, 16) and set(lora.target_modules) == set(align.PROJECTIONS)
    assert args.bf16 is False and args.fp16 is False and args.use_cpu is True
    assert args.gradient_checkpointing is False
    assert args.save_strategy == "no" and args.dataloader_num_workers == 0 and args.report_to in ([], "none", ["none"])
    assert (args.learning_rate, args.lr_scheduler_type, args.seed, args.max_length) == (5e-3, "linear", 42, 256)
    assert built.processing_class.chat_template
    if trainer in PAPER_LOSSES:
        assert args.loss_type == [PAPER_LOSSES[trainer]] and args.precompute_ref_log_probs
    if trainer == "simpo":
        assert (args.loss_type, args.cpo_alpha) == ("simpo", 0.0)
    if trainer == "cpo":
        assert (args.loss_type, args.cpo_alpha) == ("sigmoid", 1.0)


@pytest.mark.parametrize("trainer", align.TRAINERS)
def test_every_trainer_trains_on_the_chat_template(runs, base, trainer):
    """What trl tokenised: the chat-templated prompt, then the answer turn, with loss on the answer
    only, closed by exactly one EOS."""
    _, built = runs(trainer)
    _, tokenizer = base
    row = built.train_dataset[0]
    messages = [{"role": "user", "content": toy_prefs(1)[0]["prompt"]}]
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    if trainer in PAPER_LOSSES:
        ids, trained = row["prompt_ids"] + row["chosen_ids"], row["chosen_ids"]
    elif trainer == "sft":
        ids, trained = row["input_ids"], [t for t in row["labels"] if t != -100]
    else:
        ids, trained = row["chosen_input_ids"], [t for t in row["chosen_labels"] if t != -100]
    assert tokenizer.decode(ids).startswith(prompt + CHOSEN + tokenizer.eos_token)
    assert tokenizer.decode(trained).strip() == CHOSEN + tokenizer.eos_token
    assert trained.count(tokenizer.eos_token_id) == 1


def test_reference_is_the_base_model_with_the_adapter_disabled(runs, base, tiny_dir):
    """ref_model None + peft: the precomputed reference log-probs are the base model's, and with the
    adapter disabled the trained model is the base model again."""
    import torch
    _, built = runs("dpo")
    assert built.ref_model is None
    model, tokenizer = base
    expected = align.pair_logprobs(model, tokenizer, toy_prefs())
    assert list(built.train_dataset["ref_chosen_logps"]) == pytest.approx([c for c, _ in expected], abs=1e-3)
    assert list(built.train_dataset["ref_rejected_logps"]) == pytest.approx([r for _, r in expected], abs=1e-3)
    ids = torch.tensor([tokenizer("Question 1: which option is right?")["input_ids"]])
    policy = built.model.eval()
    with torch.no_grad():
        reference = model(input_ids=ids).logits
        with policy.disable_adapter():
            disabled = policy(input_ids=ids).logits
        enabled = policy(input_ids=ids).logits
    assert torch.allclose(disabled, reference, atol=1e-5)
    assert not torch.allclose(enabled, reference, atol=1e-3)


# ---------------------------------------------------------------------------- learning

@pytest.mark.parametrize("trainer", PREFERENCE_TRAINERS)
def test_every_trainer_learns_the_toy_preference(runs, base, tiny_dir, trainer):
    out, _ = runs(trainer)
    train_log = align.read_log(out)
    margins = align.history(train_log, "rewards/margins")
    assert len(margins) >= 30                         # 32 steps, every one logged
    assert margins[-1] > margins[0] + 0.2 and margins[-1] > 0, margins
    assert align.history(train_log, "rewards/accuracies")[-1] == 1.0
    # measured directly: teacher-forced log p(chosen) - log p(rejected), base vs adapter
    model, tokenizer = base
    before = [c - r for c, r in align.pair_logprobs(model, tokenizer, toy_prefs())]
    after = [c - r for c, r in align.pair_logprobs(adapted(tiny_dir, out), tokenizer, toy_prefs())]
    assert mean(before) < 0, "the toy set must go against the base model's prior"
    assert all(a > b + 1.0 for a, b in zip(after, before)), (mean(before), mean(after))
    held_out = toy_prefs(4, offset=500)               # it generalises to unseen prompts of the same form
    assert mean(c - r for c, r in align.pair_logprobs(adapted(tiny_dir, out), tokenizer, held_out)) > \
        mean(c - r for c, r in align.pair_logprobs(model, tokenizer, held_out)) + 1.0


def test_sft_raises_the_chosen_log_prob(runs, base, tiny_dir):
    out, _ = runs("sft")
    model, tokenizer = base
    before = [c for c, _ in align.pair_logprobs(model, tokenizer, toy_prefs())]
    after = [c for c, _ in align.pair_logprobs(adapted(tiny_dir, out), tokenizer, toy_prefs())]
    assert mean(after) > mean(before) + 1.0, (mean(before), mean(after))
    losses = align.history(align.read_log(out), "loss")
    assert losses[-1] < losses[0]


# ---------------------------------------------------------------------------- artefacts

def test_train_log_has_the_reward_history(runs, tiny_dir):
    out, _ = runs("dpo")
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "adapter_config.json", "adapter_model.safetensors",
                                                     "chat_template.jinja", "tokenizer.json", "tokenizer_config.json",
                                                     "train_log.json"]     # adapter, tokenizer, model card, log
    log_ = align.read_log(out)
    for key in ("loss", "learning_rate", "rewards/chosen", "rewards/rejected", "rewards/margins",
                "rewards/accuracies"):
        assert len(align.history(log_, key)) >= 30, key
    assert align.history(log_, "eval_rewards/margins"), "eval_prefs are evaluated every epoch"
    assert log_["n_pairs"] == 16 and log_["n_eval_pairs"] == 4 and log_["pairs_seen"] == 32
    assert log_["config"] == toy_config("dpo").to_dict()
    assert log_["data_hash"] == align.data_hash(toy_prefs())
    assert log_["seconds_per_pair"] > 0 and log_["peak_rss_mb"] > 100 and log_["wall_seconds"] >= log_["train_seconds"]
    assert log_["key"] == align.run_key(toy_config("dpo"), tiny_dir, toy_prefs())
    assert log_["libraries"]["trl"]
    assert log_["files"] == {name: store.file_sha256(out / name) for name in align.ADAPTER_FILES}
    logging.getLogger(__name__).info("DPO on the tiny model: %.4f s per pair (%d torch threads)",
                                     log_["seconds_per_pair"], log_["torch_threads"])


def test_a_rerun_with_the_same_key_skips_training(runs, tiny_dir, monkeypatch, caplog):
    out, _ = runs("dpo")
    mtimes = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}

    def must_not_build(*args, **kwargs):
        raise AssertionError("build_trainer called although the run is complete")

    monkeypatch.setattr(align, "build_trainer", must_not_build)
    relabelled = [dict(r, method="direct") for r in toy_prefs()]       # provenance is not training data
    with caplog.at_level(logging.INFO, logger="wowlib.align"):
        assert align.train(toy_config("dpo"), tiny_dir, relabelled, out, eval_prefs=toy_prefs(4, 100)) == out
    assert "already trained" in caplog.text
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == mtimes
    # different data is a different key: training is attempted
    with pytest.raises(AssertionError, match="build_trainer called"):
        align.train(toy_config("dpo"), tiny_dir, toy_prefs(15), out)
    # a different config (or base model) for the same folder is refused unless asked for
    monkeypatch.delenv(store.OVERWRITE_ENV, raising=False)
    with pytest.raises(store.OverwriteError, match=r"train_log.json was made with other settings \(seed: 42 -> 1\)"):
        align.train(toy_config("dpo", seed=1), tiny_dir, toy_prefs(), out)
    with pytest.raises(store.OverwriteError, match=r"base_model: .* -> \"another-name\""):
        align.train(toy_config("dpo"), tiny_dir, toy_prefs(15), out, base_model="another-name")
    with pytest.raises(AssertionError, match="build_trainer called"):
        align.train(toy_config("dpo", seed=1), tiny_dir, toy_prefs(), out, overwrite=True)
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == mtimes   # the old run is intact
    assert not list(out.parent.glob(f".{out.name}.tmp*"))


def test_an_interrupted_run_leaves_nothing_that_looks_complete(tiny_dir, tmp_path, monkeypatch):
    class Crashing:
        train_dataset = toy_prefs()

        def train(self):
            (tmp_path / "started").touch()
            raise KeyboardInterrupt

    monkeypatch.setattr(align, "build_trainer", lambda *a, **k: Crashing())
    out = tmp_path / "model"
    with pytest.raises(KeyboardInterrupt):
        align.train(toy_config("dpo"), tiny_dir, toy_prefs(), out)
    assert (tmp_path / "started").exists() and not out.exists()
    assert not list(tmp_path.glob(".model.tmp*"))
    out.mkdir()                                       # a half adapter (no log) is not a trained run
    (out / "adapter_config.json").write_text("{}")
    assert not align.is_trained(out, align.run_key(toy_config("dpo"), tiny_dir, toy_prefs()))


# ---------------------------------------------------------------------------- integrity and provenance

def _copy_of(runs, trainer: str, tmp_path: Path) -> Path:
    out, _ = runs(trainer)
    copy = tmp_path / "models" / out.name
    shutil.copytree(out, copy)
    return copy


def test_a_damaged_adapter_is_not_trained_and_rerunning_repairs_it(runs, tiny_dir, tmp_path, caplog):
    """A truncated adapter_model.safetensors (a full disk, a broken copy) fails the checksums that
    train_log.json records: not trained (a warning names the file), so train() retrains it; before,
    notebook 03 skipped it and notebook 04 crashed inside peft."""
    out = _copy_of(runs, "dpo", tmp_path)
    weights = out / "adapter_model.safetensors"
    key = align.run_key(toy_config("dpo"), tiny_dir, toy_prefs())
    assert align.is_trained(out, key)
    weights.write_bytes(weights.read_bytes()[:-100])
    with caplog.at_level(logging.WARNING, logger="wowlib.align"):
        assert not align.is_trained(out, key)
    assert "adapter_model.safetensors does not match the sha256 recorded in train_log.json" in caplog.text
    with pytest.raises(align.AdapterError, match=f"adapter {out}: adapter_model.safetensors does not match"):
        align.verify_adapter(out)
    align.train(toy_config("dpo"), tiny_dir, toy_prefs(), out, eval_prefs=toy_prefs(4, 100))
    assert align.is_trained(out, key) and align.verify_adapter(out)
    assert sorted(p.name for p in out.parent.iterdir()) == [out.name]


def test_a_changed_byte_is_caught_where_the_structure_still_holds(runs, tmp_path):
    out = _copy_of(runs, "dpo", tmp_path)
    weights = out / "adapter_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    assert align._safetensors_problem(weights) is None                    # still a well-formed file
    (problem,) = align.adapter_problems(out)
    assert problem.startswith("adapter_model.safetensors does not match the sha256 recorded in train_log.json")


def test_evaluation_refuses_a_damaged_adapter_naming_it(runs, tmp_path):
    """Every backend hashes an adapter (wowlib.llm.chat.adapter_hash) before it loads it: a damaged
    one is a clear error naming the directory and the file, not a crash inside peft."""
    from wowlib.llm.chat import adapter_hash
    out = _copy_of(runs, "dpo", tmp_path)
    assert adapter_hash(out)
    (out / "adapter_config.json").write_text('{"r": 16, "lora_alpha"')
    with pytest.raises(align.AdapterError, match=rf"adapter {out}: adapter_config.json does not match .*Retrain it"):
        adapter_hash(out)
    (out / "adapter_config.json").unlink()
    with pytest.raises(align.AdapterError, match="adapter_config.json is missing"):
        adapter_hash(out)


def test_an_adapter_without_checksums_is_checked_for_structure_and_upgraded(runs, tiny_dir, tmp_path, monkeypatch):
    """Adapters trained before checksums were recorded: intact ones stay trained (no retraining),
    and the next train() records their checksums and a portable base model; a truncated one is not
    trained."""
    out = _copy_of(runs, "dpo", tmp_path)
    old_log = align.read_log(out)
    old_log.pop("files")
    old_log["base_model"] = "/root/.cache/wowlib/models/tiny-0123456789abcdef"
    store.write_json(out / align.LOG_FILE, old_log)
    key = align.run_key(toy_config("dpo"), tiny_dir, toy_prefs())
    assert align.is_trained(out, key) and align.adapter_problems(out) == []
    monkeypatch.setattr(align, "build_trainer", lambda *a, **k: pytest.fail("an intact adapter was retrained"))
    align.train(toy_config("dpo"), tiny_dir, toy_prefs(), out, base_model="tiny")
    upgraded = align.read_log(out)
    assert upgraded["files"] == align.adapter_checksums(out) and upgraded["base_model"] == "tiny"
    weights = out / "adapter_model.safetensors"
    store.write_json(out / align.LOG_FILE, old_log)
    weights.write_bytes(weights.read_bytes()[:-100])
    assert not align.is_trained(out, key)
    size = weights.stat().st_size
    assert align.adapter_problems(out) == [f"adapter_model.safetensors is truncated or damaged (its header describes "
                                           f"{size + 100} bytes; the file has {size})"]


def test_provenance_names_the_base_model_not_a_machine_path(runs, tiny_dir):
    """train_log.json and adapter_config.json name the base model portably (here the cache-relative
    folder of the tiny model; run_alignment passes the model's name), never an absolute path."""
    out, _ = runs("dpo")
    expected = align.portable_model_name(tiny_dir)
    assert not Path(expected).is_absolute() and expected.endswith(tiny_dir.name)
    assert align.read_log(out)["base_model"] == expected
    assert json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"] == expected
    for f in out.iterdir():
        assert store.absolute_paths(f.read_bytes().decode("utf-8", "replace"), store.local_roots()) == [], f.name
    assert align.portable_model_name(tiny_dir, "smollm2-135m") == "smollm2-135m"
    assert align.portable_model_name("meta-llama/Meta-Llama-3-8B-Instruct") == "meta-llama/Meta-Llama-3-8B-Instruct"
    assert align.portable_model_name("/somewhere/else/ckpt-7") == "ckpt-7"


@pytest.mark.slow
def test_killed_training_leftovers_are_removed_on_the_next_run(tiny_dir, tmp_path, monkeypatch):
    """A killed training run leaves .<name>.tmp<pid> in models/; the next train() removes those of
    dead processes and keeps a live one's (a concurrent trainer)."""
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    models = tmp_path / "models"
    (models / f".other.tmp{dead.pid}" / "_trainer").mkdir(parents=True)
    (models / f".busy.tmp{os.getpid()}").mkdir()
    monkeypatch.setattr(align, "build_trainer", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt):
        align.train(toy_config("dpo"), tiny_dir, toy_prefs(), models / "model")
    assert sorted(p.name for p in models.iterdir()) == [f".busy.tmp{os.getpid()}"]


def test_training_is_reproducible(runs, tiny_dir, tmp_path):
    import torch
    from safetensors.torch import load_file
    first, _ = runs("simpo")
    second = align.train(toy_config("simpo"), tiny_dir, toy_prefs(), tmp_path / "again")
    a, b = load_file(first / "adapter_model.safetensors"), load_file(second / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    assert align.history(align.read_log(first), "loss") == pytest.approx(
        align.history(align.read_log(second), "loss"), abs=1e-5)


def test_config_round_trips_through_the_log(runs):
    out, _ = runs("orpo")
    assert AlignConfig(**align.read_log(out)["config"]) == toy_config("orpo")
    assert dataclasses.asdict(toy_config("orpo"))["target_modules"] == align.PROJECTIONS


def test_activation_checkpointing_saves_memory_not_results(runs, tiny_dir, tmp_path):
    """Recomputing activations in the backward pass gives the same adapter (so the same run key:
    a run trained either way is reused), and trl really gets the setting."""
    import torch
    from safetensors.torch import load_file
    plain, _ = runs("dpo")
    config = toy_config("dpo", activation_checkpointing=True)
    assert config.key == toy_config("dpo").key
    assert align.run_key(config, tiny_dir, toy_prefs()) == align.run_key(toy_config("dpo"), tiny_dir, toy_prefs())
    built = align.build_trainer(config, tiny_dir, toy_prefs(), None, output_dir=tmp_path / "t")
    assert built.args.activation_checkpointing is True
    out = align.train(config, tiny_dir, toy_prefs(), tmp_path / "ckpt")
    a, b = load_file(plain / "adapter_model.safetensors"), load_file(out / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)


def test_quantised_loading_is_a_gpu_option_and_leaves_old_keys_alone(tiny_dir):
    """4-bit/8-bit base models (the paper's QLoRA) only on CUDA: refused on CPU with a clear error;
    the field is left out of the key at its default, so runs trained before it existed are reused."""
    import torch
    with pytest.raises(ValueError, match="quantization"):
        AlignConfig(quantization="3bit")
    with pytest.raises(ValueError, match="CUDA"):
        AlignConfig(quantization="4bit", device="cpu")
    assert "quantization" not in toy_config("dpo").identity()
    assert AlignConfig(quantization="4bit").identity()["quantization"] == "4bit"
    assert AlignConfig(quantization="4bit").key != AlignConfig().key
    four = align.quantization_config("4bit", bf16=True)
    assert four.load_in_4bit and four.bnb_4bit_quant_type == "nf4" and four.bnb_4bit_compute_dtype == torch.bfloat16
    assert align.quantization_config("8bit", bf16=False).load_in_8bit
    assert align.quantization_config(None, bf16=True) is None
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="needs a CUDA GPU"):
            align.build_trainer(AlignConfig(quantization="4bit"), tiny_dir, toy_prefs())


# ---------------------------------------------------------------------------- precision and shared reference

def test_bf16_autocast_path_trains_on_every_cpu(tiny_dir, tmp_path):
    """Forced, not chosen by the CPU: bf16 autocast (emulated where the CPU has no bf16) learns the
    toy preference as fp32 does, and says so in its log and its key."""
    out = align.train(toy_config("dpo", precision="bf16"), tiny_dir, toy_prefs(), tmp_path / "bf16")
    log_ = align.read_log(out)
    margins = align.history(log_, "rewards/margins")
    assert log_["precision"] == "bf16" and margins[-1] > margins[0] + 0.2 and margins[-1] > 0
    assert align.run_key(toy_config("dpo", precision="bf16"), tiny_dir, toy_prefs()) != \
        align.run_key(toy_config("dpo"), tiny_dir, toy_prefs())


def test_reference_log_probs_are_computed_once_per_preference_set(tiny_dir, tmp_path, monkeypatch):
    """A second configuration (another lr, another DPO-family loss) on the same pairs reads the
    reference log-probs the first one computed: the same numbers, no second reference pass. A pair
    trl drops for its length keeps the others aligned."""
    from trl import DPOTrainer
    cache = align.ReferenceCache(tmp_path / ".reference")
    prefs = toy_prefs(8) + [dict(toy_prefs(1, 900)[0], prompt="word " * 400)]      # the last: too long
    first = align.train(toy_config("dpo"), tiny_dir, prefs, tmp_path / "a", reference_cache=cache)
    computed = align.read_log(first)
    assert computed["reference"] == "computed" and computed["n_pairs_trained"] == 8
    [stored] = list((tmp_path / ".reference").glob("*.json"))
    passes = []
    original = DPOTrainer._precompute_ref_logps
    monkeypatch.setattr(DPOTrainer, "_precompute_ref_logps",
                        lambda self, *a: passes.append(1) or original(self, *a))
    build, built = align.build_trainer, []
    monkeypatch.setattr(align, "build_trainer", lambda *a, **k: built.append(build(*a, **k)) or built[-1])
    for trainer, lr in (("dpo", 1e-3), ("ipo", 5e-3)):
        built.clear()
        out = align.train(toy_config(trainer, learning_rate=lr), tiny_dir, prefs, tmp_path / f"{trainer}{lr}",
                          reference_cache=cache)
        assert align.read_log(out)["reference"] == "reused" and not passes
        got = align.reference_logps(built[0], len(prefs))
        expected = store.read_json(stored)["logps"]
        assert got[:8] == [tuple(v) for v in expected[:8]] and all(math.isnan(v) for v in expected[8])
    fp32 = align.ReferenceCache(tmp_path).key(toy_config("dpo"), tiny_dir, prefs)
    assert fp32 != align.ReferenceCache(tmp_path).key(toy_config("dpo", precision="bf16"), tiny_dir, prefs)
