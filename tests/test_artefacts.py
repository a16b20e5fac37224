"""Artefacts that work elsewhere, and models by any name: a local checkpoint directory or a hub id
besides the short names; preference files a stock trl trainer reads; adapters plain peft loads."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from wowlib import align, prefs, store
from wowlib.llm import models


@pytest.fixture()
def checkpoint(tiny_dir, tmp_path) -> Path:
    """The tiny model as a user's own checkpoint directory."""
    target = tmp_path / "my-checkpoint"
    shutil.copytree(tiny_dir, target)
    return target


def test_models_by_short_name_path_or_hub_id(checkpoint):
    assert models.get_spec("tiny").name == "tiny"
    local = models.get_spec(str(checkpoint))
    assert local.backend == "hf" and local.prepare() == checkpoint
    assert models.model_label(str(checkpoint)) == "my-checkpoint"
    hub = models.get_spec("HuggingFaceTB/SmolLM2-135M-Instruct")         # named, not downloaded
    assert hub.hub_id == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert models.model_label("HuggingFaceTB/SmolLM2-135M-Instruct") == "HuggingFaceTB--SmolLM2-135M-Instruct"
    with pytest.raises(KeyError, match="short name"):
        models.get_spec("no-such-model")
    empty = checkpoint.parent / "empty"
    empty.mkdir()
    with pytest.raises(KeyError, match="config.json"):
        models.get_spec(str(empty))


def test_a_checkpoint_directory_generates_and_is_filed_under_its_name(checkpoint, tmp_path, data_dir):
    from wowlib import sample
    run = store.Run(tmp_path / "run")
    config = sample.SampleConfig(generator=str(checkpoint), tasks=("kc",), n_questions=2, n_samples=2,
                                 max_new_tokens=16, extraction="constrained")
    [summary] = sample.run_sampling(run, config)
    records = store.read_jsonl(run.samples(str(checkpoint), "kc"))
    assert run.samples(str(checkpoint), "kc") == run.root / "samples" / "my-checkpoint" / "kc.jsonl"
    assert summary["samples"] == 4 and {r["generator"] for r in records} == {"my-checkpoint"}


def test_a_base_model_without_chat_template_gets_the_plain_format(checkpoint):
    (checkpoint / "chat_template.jinja").unlink(missing_ok=True)
    config = json.loads((checkpoint / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (checkpoint / "tokenizer_config.json").write_text(json.dumps(config))
    llm = models.load_llm(str(checkpoint))
    assert llm.tokenizer.chat_template == models.PLAIN_TEMPLATE and set(models.PLAIN_STOPS) <= set(llm.stop_strings)
    assert llm.render([{"role": "user", "content": "Hi"}]).endswith("User: Hi\n\nAssistant:")
    assert align.load_tokenizer(checkpoint).chat_template == models.PLAIN_TEMPLATE   # trained as it answers


def test_saved_preferences_train_a_stock_trl_trainer(tiny_dir, tmp_path):
    """prefs/<name>.jsonl: conversational (trl renders it with the model's chat template), read by
    datasets.load_dataset("json"), trained by trl's own DPOTrainer with no wowlib code in between."""
    from datasets import load_dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer
    from trl.data_utils import is_conversational
    run = store.Run(tmp_path / "run")
    spec = prefs.PrefSpec("oracle", tasks=("toy",))
    pairs = [{"prompt": f"Question {k}: which option?", "chosen": "I do not know.", "rejected": "The answer is A.",
              "task": "toy", "question_id": str(k), "source": "tiny", "method": "oracle", "chosen_proxy": 0.5,
              "rejected_proxy": 0.0, "chosen_sample": 0, "rejected_sample": 1} for k in range(4)]
    prefs.write(run, spec, pairs, prefs.PrefStats(kept=4))
    records = prefs.load(run, spec.name)
    assert all(is_conversational(r) for r in records)
    assert prefs.text(records[0]["chosen"]) == "I do not know." and records[0]["chosen_proxy"] == 0.5
    dataset = load_dataset("json", data_files=str(run.prefs(spec.name)), split="train")
    model = AutoModelForCausalLM.from_pretrained(str(tiny_dir))
    args = DPOConfig(output_dir=str(tmp_path / "trl"), max_steps=2, per_device_train_batch_size=2, bf16=False,
                     use_cpu=True, report_to="none", activation_checkpointing=False, save_strategy="no")
    trainer = DPOTrainer(model=model, args=args, train_dataset=dataset,
                         processing_class=AutoTokenizer.from_pretrained(str(tiny_dir)),
                         peft_config=LoraConfig(r=4, lora_alpha=4, target_modules=["q_proj", "v_proj"],
                                                task_type="CAUSAL_LM"))
    assert trainer.train().global_step == 2


def test_a_saved_adapter_loads_with_plain_peft_and_carries_its_card(tiny_dir, tmp_path):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer
    pairs = [{"prompt": f"Question {k}: which option?", "chosen": "I do not know.", "rejected": "The answer is A."}
             for k in range(4)]
    config = align.AlignConfig(learning_rate=5e-3, num_train_epochs=1, max_length=128, device="cpu", precision="fp32")
    out = align.train(config, tiny_dir, pairs, tmp_path / "adapter", base_model="tiny",
                      about={"prefs": "self-oracle-toy", "preference": "oracle"})
    adapter_config = json.loads((out / "adapter_config.json").read_text())
    assert adapter_config["base_model_name_or_path"] == "tiny"          # portable, not a cache path
    card = (out / "README.md").read_text()
    assert card.startswith("---\nbase_model: tiny\nlibrary_name: peft\n") and "self-oracle-toy" in card
    tokenizer = AutoTokenizer.from_pretrained(str(out))
    assert tokenizer.chat_template == AutoTokenizer.from_pretrained(str(tiny_dir)).chat_template
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(tiny_dir)), str(out))
    with torch.no_grad():
        assert model(input_ids=torch.tensor([tokenizer("Question 9:")["input_ids"]])).logits.isfinite().all()
    assert align.is_trained(out, align.run_key(config, tiny_dir, pairs))       # the extra files break nothing
