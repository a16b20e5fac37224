"""Phase 2 alignment: LoRA adapters trained with trl on preference datasets.

| trainer | trl class | loss |
|---|---|---|
| ``dpo`` | ``DPOTrainer`` | ``["sigmoid"]`` |
| ``ipo`` | ``DPOTrainer`` | ``["ipo"]`` |
| ``rso`` | ``DPOTrainer`` | ``["hinge"]`` |
| ``sppo`` | ``DPOTrainer`` | ``["sppo_hard"]`` |
| ``cpo`` | ``experimental.cpo.CPOTrainer`` | ``"sigmoid"`` + behaviour cloning (``cpo_alpha``) |
| ``simpo`` | ``experimental.cpo.CPOTrainer`` | ``"simpo"``, ``cpo_alpha=0`` |
| ``orpo`` | ``experimental.orpo.ORPOTrainer`` | odds ratio + NLL |
| ``sft`` | ``SFTTrainer`` | NLL of ``chosen`` (the SFT-on-wrong control) |

Every adapter is LoRA on the attention and MLP projections (paper: r=16, alpha=16). The DPO
family's reference is the base model with the adapter disabled (``ref_model=None`` with a
``peft_config``), and its log-probs are computed once before training. CPO, SimPO and ORPO are
reference-free.

Data format (checked for every trainer in trl 1.16): DPO-family and SFT records are passed to trl
*conversational*, ``prompt=[{"role": "user", ...}]``, ``chosen``/``rejected`` (or SFT's
``completion``) = ``[{"role": "assistant", ...}]``, so trl renders them with the model's own chat
template, the one the inference backend (``wowlib.llm.engine.hf``) uses. CPO/SimPO/ORPO get the same
rendering as plain strings, applied here (see ``to_dataset``). A tokenizer without a chat template
is an error rather than a silently invented format.

Threads (the caller sets them): on the 2-core machines, DPO on SmolLM2-135M took ~3.0 s per pair
with 2 torch threads on an idle machine but ~4.8 s with 2 and ~3.3 s with 1 while another process
held a core; ``torch.set_num_threads(1)`` / ``OMP_NUM_THREADS=1`` is the safe choice when sharing.

``build_trainer`` is the only function that touches trl's API; ``train`` wraps it with the
content-hash skip, the atomic write of the adapter and ``train_log.json`` (written last, with the
sha256 of every adapter file: an adapter counts as trained only when they verify), and portable
provenance: the log and ``adapter_config.json`` name the base model (``"smollm2-135m"``), never a
machine's cache path.
"""
from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import logging
import math
import os
import resource
import shutil
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import store

log = logging.getLogger(__name__)

TRAINERS = ("dpo", "ipo", "rso", "sppo", "cpo", "simpo", "orpo", "sft")
DPO_LOSSES = {"dpo": "sigmoid", "ipo": "ipo", "rso": "hinge", "sppo": "sppo_hard"}
REFERENCE_FREE = ("cpo", "simpo", "orpo", "sft")
# transformers.SchedulerType values (tests check this list against the installed transformers)
SCHEDULERS = ("linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup",
              "inverse_sqrt", "reduce_lr_on_plateau", "cosine_with_min_lr", "cosine_warmup_with_min_lr",
              "warmup_stable_decay")
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
PAIR_COLUMNS = ("prompt", "chosen", "rejected")
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")
LOG_FILE = "train_log.json"
RESULT_NEUTRAL = ("activation_checkpointing", "packed")     # AlignConfig fields that change cost, not the adapter
ADDED_LATER = {"quantization": None, "precision": "auto"}   # left out of the key at these defaults
PRECISIONS = ("auto", "bf16", "fp32")
QUANTIZATIONS = (None, "4bit", "8bit")


# ---------------------------------------------------------------------------- configuration

@dataclass(frozen=True)
class AlignConfig:
    """One alignment run's hyper-parameters (defaults: the paper's)."""

    trainer: str = "dpo"
    beta: float = 0.1
    learning_rate: float = 5e-5
    lr_scheduler_type: str = "linear"
    weight_decay: float = 0.0
    num_train_epochs: float = 3
    warmup_ratio: float = 0.1
    per_device_train_batch_size: int = 1
    gradient_accumulation_steps: int = 1
    max_steps: int = -1                     # > 0 overrides the epochs (smoke runs)
    lora_r: int = 16
    lora_alpha: int = 16
    lora_dropout: float = 0.0
    target_modules: tuple[str, ...] = PROJECTIONS
    max_length: int | None = 1024           # prompt + completion tokens; None: no truncation
    seed: int = 42
    precompute_ref_log_probs: bool = True   # DPO family only (the others have no reference)
    precompute_ref_batch_size: int | None = None   # None: the training batch size
    cpo_alpha: float = 1.0                  # cpo: weight of the behaviour-cloning NLL term
    simpo_gamma: float = 0.5                # simpo: target reward margin
    logging_steps: int = 10
    device: str = "auto"                    # "auto" (cuda if available) | "cpu" | "cuda"
    # Recompute each layer's activations in the backward pass: less memory (NLGraph prompts of
    # ~800 tokens: SmolLM2's DPO peak from ~6 GB to under 4 GB, benchmarks/) for more time. It
    # does not change the result, so it is not part of the run's key.
    activation_checkpointing: bool = False
    # "4bit" (NF4, QLoRA: what the paper trained) or "8bit": the base model loaded quantised by
    # bitsandbytes (pip install -e '.[gpu]'), on a CUDA GPU only; None: bf16 on a GPU, fp32 on CPU.
    quantization: str | None = None
    # Arithmetic of the forward and backward passes: "bf16" (autocast: matmuls in bf16, the LoRA
    # master weights, optimiser state and loss in fp32), "fp32", or "auto": bf16 where the hardware
    # multiplies bf16 (a CUDA GPU that supports it; a CPU with AVX512-BF16 or AMX), else fp32.
    # The resolved precision is part of the run's key (``run_key``): it changes the adapter's bits.
    precision: str = "auto"
    # DPO family: each pair one packed sequence, the prompt once, only the answers through the LM
    # head (``pack_pairs``); the same numbers as trl's two sequences up to float summation order,
    # so, like activation checkpointing, not part of the run's key.
    packed: bool = True

    def __post_init__(self) -> None:
        if isinstance(self.target_modules, list):
            object.__setattr__(self, "target_modules", tuple(self.target_modules))
        for problem in _problems(self):
            raise ValueError(f"AlignConfig.{problem}")

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["target_modules"] = list(self.target_modules)
        return data

    def identity(self) -> dict[str, Any]:
        """The fields that decide the trained adapter (``to_dict`` less the memory/time knobs)."""
        return {k: v for k, v in self.to_dict().items()
                if k not in RESULT_NEUTRAL and not (k in ADDED_LATER and v == ADDED_LATER[k])}

    @property
    def key(self) -> str:
        """A short hash of the hyper-parameters."""
        return store.content_hash(self.identity())

    @property
    def tag(self) -> str:
        """A readable directory name: ``dpo-lr5e-05-linear-wd0-ep3-<hash>``."""
        return (f"{self.trainer}-lr{self.learning_rate:g}-{self.lr_scheduler_type}-wd{self.weight_decay:g}"
                f"-ep{self.num_train_epochs:g}-{self.key[:8]}")


def _problems(c: AlignConfig) -> Iterable[str]:
    """Each invalid field as ``"<field>: <why>"`` (the first one is raised)."""
    if c.trainer not in TRAINERS:
        yield f"trainer: must be one of {TRAINERS}, got {c.trainer!r}"
    for name in ("beta", "learning_rate", "num_train_epochs", "lora_alpha"):
        value = getattr(c, name)
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not value > 0:
            yield f"{name}: must be a number > 0, got {value!r}"
    if c.lr_scheduler_type not in SCHEDULERS:
        yield f"lr_scheduler_type: must be one of {SCHEDULERS}, got {c.lr_scheduler_type!r}"
    if not isinstance(c.weight_decay, (int, float)) or c.weight_decay < 0:
        yield f"weight_decay: must be >= 0, got {c.weight_decay!r}"
    if not isinstance(c.warmup_ratio, (int, float)) or not 0 <= c.warmup_ratio < 1:
        yield f"warmup_ratio: must be in [0, 1), got {c.warmup_ratio!r}"
    for name in ("per_device_train_batch_size", "gradient_accumulation_steps", "lora_r", "logging_steps"):
        value = getattr(c, name)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            yield f"{name}: must be an integer >= 1, got {value!r}"
    if not isinstance(c.max_steps, int) or c.max_steps == 0 or c.max_steps < -1:
        yield f"max_steps: must be -1 (use the epochs) or an integer >= 1, got {c.max_steps!r}"
    if not isinstance(c.lora_dropout, (int, float)) or not 0 <= c.lora_dropout < 1:
        yield f"lora_dropout: must be in [0, 1), got {c.lora_dropout!r}"
    if not c.target_modules or not all(isinstance(m, str) and m for m in c.target_modules):
        yield f"target_modules: must be a non-empty tuple of module names, got {c.target_modules!r}"
    if c.max_length is not None and (not isinstance(c.max_length, int) or c.max_length < 16):
        yield f"max_length: must be None or an integer >= 16, got {c.max_length!r}"
    if not isinstance(c.seed, int) or isinstance(c.seed, bool):
        yield f"seed: must be an integer, got {c.seed!r}"
    if c.precompute_ref_batch_size is not None and (not isinstance(c.precompute_ref_batch_size, int)
                                                    or c.precompute_ref_batch_size < 1):
        yield f"precompute_ref_batch_size: must be None or an integer >= 1, got {c.precompute_ref_batch_size!r}"
    if not isinstance(c.cpo_alpha, (int, float)) or c.cpo_alpha < 0:
        yield f"cpo_alpha: must be >= 0, got {c.cpo_alpha!r}"
    if not isinstance(c.simpo_gamma, (int, float)) or c.simpo_gamma < 0:
        yield f"simpo_gamma: must be >= 0, got {c.simpo_gamma!r}"
    if c.device not in ("auto", "cpu", "cuda"):
        yield f"device: must be 'auto', 'cpu' or 'cuda', got {c.device!r}"
    if c.precision not in PRECISIONS:
        yield f"precision: must be one of {PRECISIONS}, got {c.precision!r}"
    if c.quantization not in QUANTIZATIONS:
        yield f"quantization: must be one of {QUANTIZATIONS}, got {c.quantization!r}"
    if c.quantization is not None and c.device == "cpu":
        yield "quantization: 4-bit/8-bit loading (bitsandbytes) needs a CUDA GPU; on a CPU use quantization=None"


def grid(base: AlignConfig, **axes: Sequence[Any]) -> list[AlignConfig]:
    """The cartesian product of ``axes`` (field -> values) over ``base``, in axis order.

    >>> len(grid(AlignConfig(), learning_rate=[5e-5, 1e-4], lr_scheduler_type=["linear", "cosine"]))
    4
    """
    names = {f.name for f in dataclasses.fields(AlignConfig)}
    for axis, values in axes.items():
        if axis not in names:
            raise ValueError(f"grid: unknown AlignConfig field {axis!r}; fields: {sorted(names)}")
        if isinstance(values, (str, bytes)) or not isinstance(values, Iterable):
            raise TypeError(f"grid: axis {axis!r} needs a list of values, got {values!r}")
    keys = list(axes)
    combos = itertools.product(*(list(axes[k]) for k in keys))
    configs = [dataclasses.replace(base, **dict(zip(keys, combo))) for combo in combos]
    return list(dict.fromkeys(configs))       # drop repeated values, keep the order


# ---------------------------------------------------------------------------- data

def pair_records(prefs: Iterable[dict] | Any) -> list[dict]:
    """The training columns of preference records (provenance columns dropped), checked."""
    records = prefs.to_list() if hasattr(prefs, "to_list") else list(prefs)
    if not records:
        raise ValueError("no preference pairs to train on")
    out = []
    for i, record in enumerate(records):
        missing = [c for c in PAIR_COLUMNS if c not in record]
        if missing:
            raise ValueError(f"preference record {i} lacks {missing} (has {sorted(record)})")
        out.append({c: record[c] for c in PAIR_COLUMNS})
    return out


def data_hash(prefs: Iterable[dict] | Any) -> str:
    """Hash of the training columns, in order (order matters: it fixes the shuffled batches)."""
    return store.content_hash(pair_records(prefs))


def _user(prompt: str | list[dict]) -> list[dict]:
    return prompt if isinstance(prompt, list) else [{"role": "user", "content": prompt}]


def _assistant(text: str | list[dict]) -> list[dict]:
    return text if isinstance(text, list) else [{"role": "assistant", "content": text}]


def to_dataset(prefs: Iterable[dict] | Any, trainer: str, tokenizer=None):
    """A ``datasets.Dataset`` in trl's conversational form for ``trainer`` (SFT: prompt/completion).

    CPO, SimPO and ORPO get the same chat rendering as plain strings (needs ``tokenizer``): given
    messages, their trl 1.16 tokenizer appends an EOS after the template's trailing newline, so a
    ChatML answer would end ``<|im_end|>\n<|im_end|>``; pre-rendered answers end at the EOS.
    """
    from datasets import Dataset
    rows = []
    for r in pair_records(prefs):
        if trainer == "sft":
            rows.append({"prompt": _user(r["prompt"]), "completion": _assistant(r["chosen"])})
        else:
            rows.append({"prompt": _user(r["prompt"]), "chosen": _assistant(r["chosen"]),
                         "rejected": _assistant(r["rejected"])})
    if trainer in ("cpo", "simpo", "orpo"):
        if tokenizer is None:
            raise ValueError(f"to_dataset: trainer {trainer!r} needs the tokenizer to render the chat template")
        rows = [_render_pair(row, tokenizer) for row in rows]
    return Dataset.from_list(rows)


def _render_pair(row: dict, tokenizer) -> dict:
    """prompt -> the templated prompt with the generation prompt; each answer -> the rest of the
    templated chat, cut right after the EOS that closes the answer turn."""
    prompt = tokenizer.apply_chat_template(row["prompt"], add_generation_prompt=True, tokenize=False)
    out = {"prompt": prompt}
    for column in ("chosen", "rejected"):
        full = tokenizer.apply_chat_template(row["prompt"] + row[column], tokenize=False)
        if not full.startswith(prompt):
            raise ValueError("the chat template renders the prompt differently with and without the answer")
        answer = full[len(prompt):]
        eos = tokenizer.eos_token
        if eos and answer.rstrip().endswith(eos):
            answer = answer.rstrip()
        out[column] = answer
    return out


# ---------------------------------------------------------------------------- trl

def resolve_device(config: AlignConfig) -> str:
    import torch
    if config.device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if config.device == "cuda" and not torch.cuda.is_available():
        raise ValueError("AlignConfig.device: 'cuda' requested but no CUDA device is available")
    return config.device


def cpu_has_bf16() -> bool:
    """Whether this CPU multiplies bf16 in hardware (AVX512-BF16 or AMX; capped by ``WOW_CPU_ISA``);
    elsewhere bf16 is emulated and slower than fp32."""
    from .llm import cpu
    return cpu.has_bf16()


def resolve_precision(config: AlignConfig, device: str | None = None) -> str:
    """"bf16" or "fp32" for ``config`` on ``device`` (see ``AlignConfig.precision``)."""
    import torch
    device = device or resolve_device(config)
    supported = torch.cuda.is_bf16_supported() if device == "cuda" else cpu_has_bf16()
    if config.precision == "auto":
        return "bf16" if supported else "fp32"
    if config.precision == "bf16" and not supported:
        log.warning("AlignConfig.precision='bf16': this %s has no bf16 arithmetic, so it is emulated (slower than "
                    "fp32); 'auto' would choose fp32", device)
    return config.precision


def quantization_config(kind: str | None, bf16: bool):
    """transformers' ``BitsAndBytesConfig`` for ``AlignConfig.quantization`` (None: no quantisation).
    4-bit is the QLoRA recipe: NF4 weights, double quantisation, bf16 (or fp16) compute."""
    if kind is None:
        return None
    import torch
    from transformers import BitsAndBytesConfig
    if kind == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=torch.bfloat16 if bf16 else torch.float16)


def load_tokenizer(model_dir: str | Path):
    """The model's tokenizer with a pad token (eos if it has none) and a chat template: its own, or,
    for a base model without one, the plain transcript format inference uses (``models.chat_format``)."""
    from transformers import AutoTokenizer

    from .llm.models import chat_format
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if chat_format(tokenizer):
        log.info("%s: no chat template; training in the plain transcript format inference uses", model_dir)
    return tokenizer


def build_trainer(config: AlignConfig, model_dir: str | Path, train_dataset: Iterable[dict] | Any,
                  eval_dataset: Iterable[dict] | Any | None = None, output_dir: str | Path | None = None,
                  reference: Sequence[tuple[float, float]] | None = None):
    """A ready trl trainer for ``config`` (the only place trl's API is touched).

    ``train_dataset``/``eval_dataset``: preference records (list of dicts or a Dataset with at
    least prompt/chosen/rejected); they are converted to the trainer's conversational form.
    ``output_dir`` only receives trl's scratch files: nothing is saved during training.
    ``reference``: the reference model's (chosen, rejected) log-probs of each training pair,
    computed before for the same data, base model, max_length and precision (``ReferenceCache``):
    a DPO-family trainer then skips its own reference pass.
    """
    import tempfile

    import torch
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, set_seed

    device = resolve_device(config)
    bf16 = resolve_precision(config, device) == "bf16"
    if output_dir is None:
        output_dir = tempfile.mkdtemp(prefix="wowlib-align-")
    set_seed(config.seed)
    tokenizer = load_tokenizer(model_dir)
    if config.quantization is not None and device != "cuda":
        raise ValueError(f"AlignConfig.quantization={config.quantization!r}: 4-bit/8-bit loading (bitsandbytes) "
                         "needs a CUDA GPU; on a CPU train the plain model (quantization=None)")
    quantized = quantization_config(config.quantization, bf16)
    # on a GPU the weights are bf16 (as the paper trained); on a CPU they stay fp32 and bf16 is autocast
    gpu_bf16 = bf16 and device == "cuda"
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.bfloat16 if gpu_bf16 else torch.float32,
                                                 quantization_config=quantized)
    if quantized is not None:
        from peft import prepare_model_for_kbit_training
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=config.activation_checkpointing)
    elif getattr(model.config, "quantization_config", None) is not None:
        raise ValueError(f"{model_dir}: a quantised checkpoint cannot be trained here; convert it to a plain one "
                         "(wowlib.llm.models.converted_checkpoint)")
    peft_config = LoraConfig(r=config.lora_r, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout,
                             target_modules=list(config.target_modules), bias="none", task_type="CAUSAL_LM")
    train_ds = to_dataset(train_dataset, config.trainer, tokenizer)
    eval_ds = to_dataset(eval_dataset, config.trainer, tokenizer) if eval_dataset is not None else None
    if config.trainer in DPO_LOSSES:
        # each pair's index survives trl's tokenising and its length filter: reference values stay aligned
        train_ds = train_ds.add_column("pair_index", list(range(len(train_ds))))
        if reference is not None and config.precompute_ref_log_probs:
            if len(reference) != len(train_ds):
                raise ValueError(f"reference log-probs for {len(reference)} pairs, but {len(train_ds)} pairs to train")
            train_ds = train_ds.add_column("ref_chosen_logps", [float(c) for c, _ in reference])
            train_ds = train_ds.add_column("ref_rejected_logps", [float(r) for _, r in reference])
    common = {
        "output_dir": str(output_dir), "seed": config.seed, "data_seed": config.seed,
        "learning_rate": config.learning_rate, "lr_scheduler_type": config.lr_scheduler_type,
        "weight_decay": config.weight_decay, "num_train_epochs": config.num_train_epochs, "max_steps": config.max_steps,
        "warmup_steps": config.warmup_ratio,        # transformers 5: a float in [0, 1) is a ratio
        "per_device_train_batch_size": config.per_device_train_batch_size,
        "per_device_eval_batch_size": config.per_device_train_batch_size,
        "gradient_accumulation_steps": config.gradient_accumulation_steps,
        "max_length": config.max_length, "logging_steps": config.logging_steps, "logging_first_step": True,
        "eval_strategy": "epoch" if eval_ds is not None else "no",
        "save_strategy": "no", "report_to": "none", "dataloader_num_workers": 0,
        "disable_tqdm": True,       # one bar per stage (run_alignment), not trl's bars per adapter and phase
        "bf16": bf16, "fp16": False, "use_cpu": device == "cpu",
        # trl defaults it on; off unless asked (AlignConfig.activation_checkpointing)
        "activation_checkpointing": config.activation_checkpointing,
    }
    kwargs = {"model": model, "train_dataset": train_ds, "eval_dataset": eval_ds, "processing_class": tokenizer,
                  "peft_config": peft_config}
    if config.trainer in DPO_LOSSES:
        from trl import DPOConfig
        args = DPOConfig(**common, beta=config.beta, loss_type=[DPO_LOSSES[config.trainer]],
                         precompute_ref_log_probs=config.precompute_ref_log_probs,
                         precompute_ref_batch_size=config.precompute_ref_batch_size)
        return _quiet_progress(_dpo_trainer_class(config.packed)(ref_model=None, args=args, **kwargs))
    if config.trainer in ("cpo", "simpo"):
        from trl.experimental.cpo import CPOConfig, CPOTrainer
        loss = {"cpo": {"loss_type": "sigmoid", "cpo_alpha": config.cpo_alpha},
                "simpo": {"loss_type": "simpo", "cpo_alpha": 0.0, "simpo_gamma": config.simpo_gamma}}[config.trainer]
        args = CPOConfig(**common, beta=config.beta, remove_unused_columns=False, **loss)
        return _quiet_progress(CPOTrainer(args=args, **kwargs))
    if config.trainer == "orpo":
        from trl.experimental.orpo import ORPOConfig, ORPOTrainer
        args = ORPOConfig(**common, beta=config.beta, remove_unused_columns=False)   # its collator needs them
        return _quiet_progress(ORPOTrainer(args=args, **kwargs))
    from trl import SFTConfig, SFTTrainer
    return _quiet_progress(SFTTrainer(args=SFTConfig(**common), **kwargs))


def _dpo_trainer_class(packed: bool = True):
    """trl's DPOTrainer with two changes that leave its loss, optimiser and schedule as they are:

    - a training set that already carries the reference log-probs (``build_trainer(reference=...)``)
      is taken as it is instead of computed again;
    - each pair is one packed sequence (``pack_pairs``): the prompt once, then the chosen and the
      rejected answer, the rejected one masked from the chosen one, and log-probs computed for the
      answers' tokens only. trl runs the prompt twice (once per answer) and, on a CPU, projects
      EVERY position through the 49k-word LM head: on NLGraph pairs that was most of the work."""
    from trl import DPOTrainer

    class SharedReferenceDPOTrainer(DPOTrainer):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self._pack()

        def _pack(self) -> None:
            if packed:           # before the reference pass, which trl runs inside __init__
                pack_pairs(self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model)

        def _precompute_ref_logps(self, dataset, name, batch_size):
            if "ref_chosen_logps" in dataset.column_names:
                return dataset
            self._pack()
            return super()._precompute_ref_logps(dataset, name, batch_size)

    return SharedReferenceDPOTrainer


def pack_pairs(causal_lm) -> bool:
    """Patch ``causal_lm.forward`` (already given trl's ``fused_lm_head`` forward) so that a trl
    preference batch, rows [chosen_1..chosen_B, rejected_1..rejected_B] sharing their prompts, runs as
    B packed sequences: [prompt, chosen, rejected] with the rejected tokens at the positions they
    have alone and masked from the chosen ones, i.e. the same attention as two separate sequences
    (equal up to float summation order: tested). Only the answers' positions go through the LM
    head. Returns False (nothing patched) for a model this does not hold for: a sliding-window
    attention, logit soft-capping or scaling."""
    config = causal_lm.config.get_text_config() if hasattr(causal_lm.config, "get_text_config") else causal_lm.config
    if any(getattr(config, k, None) not in (None, 1.0) for k in ("final_logit_softcapping", "logit_scale")) or \
            getattr(config, "sliding_window", None):
        return False
    if getattr(causal_lm, "_wowlib_packed", False):
        return True
    original = causal_lm.forward

    def forward(*args, fused_lm_head=False, labels=None, input_ids=None, attention_mask=None, **kwargs):
        packed = None
        if fused_lm_head and not args and labels is not None and input_ids is not None \
                and not kwargs.get("output_router_logits") and kwargs.get("position_ids") is None:
            packed = _packed_log_probs(causal_lm, input_ids, attention_mask, labels)
        if packed is None:
            return original(*args, fused_lm_head=fused_lm_head, labels=labels, input_ids=input_ids,
                            attention_mask=attention_mask, **kwargs)
        return packed

    causal_lm.forward = forward
    causal_lm._wowlib_packed = True
    return True


def _packed_log_probs(causal_lm, input_ids, attention_mask, labels):
    """trl's ``FusedCausalLMOutput`` for a preference batch, computed on packed pairs (``pack_pairs``);
    None when the batch is not pairs sharing a prompt."""
    import torch
    from trl.trainer.utils import FusedCausalLMOutput
    rows, width = input_ids.shape
    if rows % 2 or attention_mask is None:
        return None
    n_pairs, device = rows // 2, input_ids.device
    lengths = attention_mask.sum(-1).tolist()
    if any(attention_mask[k, :n].min() == 0 for k, n in enumerate(lengths)):
        return None                                            # not right-padded
    seqs, positions, spans, targets = [], [], [], []           # targets: (row, column, packed index, token)
    for k in range(n_pairs):
        chosen, rejected = input_ids[k, :lengths[k]], input_ids[n_pairs + k, :lengths[n_pairs + k]]
        starts = [int((labels[row, :lengths[row]] != -100).nonzero()[0]) if (labels[row] != -100).any()
                  else lengths[row] for row in (k, n_pairs + k)]
        shared = min(starts)
        if shared == 0 or not torch.equal(chosen[:shared], rejected[:shared]):
            return None
        lc, lr = len(chosen), len(rejected)
        seqs.append(torch.cat([chosen, rejected[shared:]]))
        positions.append(torch.cat([torch.arange(lc), torch.arange(shared, lr)]))
        spans.append((shared, lc))
        for row, seq_len, start, index_of in ((k, lc, starts[0], lambda t: t),
                                              (n_pairs + k, lr, starts[1], lambda t, s=shared, c=lc: t if t < s else c + t - s)):
            for t in range(max(start - 1, 0), seq_len - 1):
                if labels[row, t + 1] != -100:
                    targets.append((row, t, k, index_of(t), int(input_ids[row, t + 1])))
    length = max(len(s) for s in seqs)
    ids = torch.full((n_pairs, length), int(input_ids[0, 0]), dtype=input_ids.dtype, device=device)
    pos = torch.zeros((n_pairs, length), dtype=torch.long, device=device)
    mask = torch.zeros((n_pairs, 1, length, length), dtype=torch.bool, device=device)
    for k, (seq, position, (shared, lc)) in enumerate(zip(seqs, positions, spans)):
        n = len(seq)
        ids[k, :n], pos[k, :n] = seq, position
        block = torch.ones(n, n, dtype=torch.bool, device=device).tril()
        block[lc:, shared:lc] = False                           # the rejected answer never sees the chosen one
        mask[k, 0, :n, :n] = block
        mask[k, 0, n:, n:] = torch.eye(length - n, dtype=torch.bool, device=device)   # padding: itself only
    hidden = causal_lm.base_model(input_ids=ids, position_ids=pos, attention_mask=mask, use_cache=False).last_hidden_state
    out_rows, out_cols, pair, index, token = (torch.tensor(column, device=device) for column in zip(*targets))
    logits = causal_lm.get_output_embeddings()(hidden[pair, index]).float()
    logps = torch.log_softmax(logits, dim=-1)
    values = logps.gather(-1, token[:, None])[:, 0]

    def spread(per_target: torch.Tensor) -> torch.Tensor:          # per target -> [rows, width - 1], 0 elsewhere
        return torch.zeros((rows, width - 1), dtype=per_target.dtype, device=device).index_put(
            (out_rows, out_cols), per_target)
    with torch.no_grad():       # the metrics trl logs: entropy, mean logit, whether the label is the top token
        entropy = -(logps.exp() * logps).sum(-1)
        mean_logits, is_top1 = logits.mean(-1), logits.argmax(-1) == token
    return FusedCausalLMOutput(loss=-values.sum() / max(len(targets), 1), log_probs=spread(values),
                               entropy=spread(entropy), mean_logits=spread(mean_logits), is_top1=spread(is_top1),
                               label_mask=labels[:, 1:] != -100)


def reference_logps(trainer, n_pairs: int) -> list[tuple[float, float]] | None:
    """The (chosen, rejected) reference log-probs a DPO-family trainer precomputed, one per pair
    given to ``build_trainer`` (NaN for a pair trl dropped for its length); None without them."""
    data = trainer.train_dataset
    if data is None or not {"ref_chosen_logps", "pair_index"} <= set(data.column_names):
        return None
    out = [(math.nan, math.nan)] * n_pairs
    for k, c, r in zip(data["pair_index"], data["ref_chosen_logps"], data["ref_rejected_logps"]):
        out[int(k)] = (float(c), float(r))
    return out


def _quiet_progress(trainer):
    """No per-step output from the trainer: trl's bar per adapter (disabled, ``disable_tqdm``) and the
    metric dicts transformers prints in its place (``PrinterCallback``) go; the per-step metrics stay in
    ``train_log.json`` and the debug log. ``run_alignment`` shows one bar for the stage."""
    from transformers import PrinterCallback, ProgressCallback

    class QuietLog(PrinterCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            log.debug("step %d: %s", state.global_step, logs)

    for kind in (ProgressCallback, PrinterCallback):
        if any(type(cb) is kind for cb in trainer.callback_handler.callbacks):
            trainer.remove_callback(kind)
    trainer.add_callback(QuietLog())
    return trainer


# ---------------------------------------------------------------------------- training

def model_identity(model_dir: str | Path) -> dict[str, Any]:
    """What identifies a base checkpoint cheaply: its directory name, the hash of its small files
    (config, tokenizer) and, per weight file, its size and the hash of its first and last MiB."""
    path = Path(model_dir)
    if not path.is_dir():
        return {"hub_id": str(model_dir)}
    files = {}
    for f in sorted(p for p in path.iterdir() if p.is_file()):
        if f.stat().st_size <= 1 << 24:
            files[f.name] = store.file_sha256(f)[:16]
        else:
            digest = hashlib.sha256()
            with open(f, "rb") as handle:
                digest.update(handle.read(1 << 20))
                handle.seek(-(1 << 20), os.SEEK_END)
                digest.update(handle.read(1 << 20))
            files[f.name] = f"{f.stat().st_size}:{digest.hexdigest()[:16]}"
    return {"name": path.name, "files": files}


def portable_model_name(model_dir: str | Path, name: str | Path | None = None) -> str:
    """The base model as a committed file may name it: ``name`` (a named model such as
    ``"smollm2-135m"``, or a hub id) when given, else ``model_dir``; an absolute directory becomes a
    path relative to the cache directory or the repository, else its bare name (no user names, no
    machine layout)."""
    text = str(name if name is not None else model_dir)
    path = Path(text).expanduser()
    if not path.is_absolute():
        return text
    from . import paths
    resolved = path.resolve()
    for root in (paths.cache_dir(), paths.REPO_ROOT):
        try:
            return resolved.relative_to(Path(root).resolve()).as_posix()
        except ValueError:
            continue
    return path.name


def run_key(config: AlignConfig, model_dir: str | Path, prefs: Any) -> str:
    """The content key of a training run: config + data + base model (+ the resolved precision
    where it is not fp32: runs from before the setting keep their key)."""
    content = {"config": config.identity(), "data": data_hash(prefs), "base_model": model_identity(model_dir)}
    precision = resolve_precision(config)
    if precision != "fp32":
        content["precision"] = precision
    return store.content_hash(content)


class ReferenceCache:
    """The reference model's log-probs of a preference set's pairs, computed once and reused by every
    DPO-family trainer and grid configuration that trains on the same data (the reference is the
    base model whatever the loss or the learning rate). A file per (data, base model, max_length,
    precision) in ``directory``; pairs trl drops for length are never in it (it is keyed by pair)."""

    def __init__(self, directory: Path) -> None:
        self.directory = Path(directory)

    def key(self, config: AlignConfig, model_dir: str | Path, prefs: Any) -> str:
        return store.content_hash({"data": data_hash(prefs), "base_model": model_identity(model_dir),
                                   "max_length": config.max_length, "precision": resolve_precision(config),
                                   "device": resolve_device(config)})

    def path(self, key: str) -> Path:
        return self.directory / f"{key}.json"

    def get(self, key: str, n_pairs: int) -> list[tuple[float, float]] | None:
        path = self.path(key)
        if not path.exists():
            return None
        try:
            values = [tuple(v) for v in store.read_json(path)["logps"]]
        except (ValueError, KeyError, TypeError):
            log.warning("%s: unreadable reference log-probs, computing them again", path)
            return None
        return values if len(values) == n_pairs else None

    def put(self, key: str, values: Sequence[tuple[float, float]]) -> None:
        store.write_json(self.path(key), {"logps": [list(v) for v in values]})


# ---------------------------------------------------------------------------- adapter integrity
#
# An adapter counts as trained only when its files verify: ``train`` records the sha256 of every
# adapter file in ``train_log.json`` (key ``files``), the last file it writes, and ``is_trained`` and
# evaluation (``wowlib.llm.chat.adapter_hash``, which every backend calls before loading an adapter)
# check them. An adapter without that record (trained before it existed, or by other means) is
# checked for structure instead: a JSON config and a safetensors file whose header accounts for
# its exact size, which is what a truncated copy fails.


class AdapterError(ValueError):
    """A damaged or incomplete adapter directory (the message names the directory and the file)."""


def adapter_checksums(out_dir: Path) -> dict[str, str]:
    """The sha256 of every adapter file in ``out_dir`` (``ADAPTER_FILES``)."""
    return {name: store.file_sha256(Path(out_dir) / name) for name in ADAPTER_FILES}


def _safetensors_problem(path: Path) -> str | None:
    size = path.stat().st_size
    if size < 8:
        return f"{path.name} is truncated ({size} bytes: not even a safetensors header)"
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        if n > size - 8:
            return f"{path.name} is truncated (its header alone should be {n} bytes; the file has {size})"
        try:
            header = json.loads(f.read(n))
            end = max((int(t["data_offsets"][1]) for k, t in header.items() if k != "__metadata__"), default=0)
        except (ValueError, TypeError, KeyError, IndexError, AttributeError):
            return f"{path.name} is not a valid safetensors file (corrupt header)"
    if 8 + n + end != size:
        return f"{path.name} is truncated or damaged (its header describes {8 + n + end} bytes; the file has {size})"
    return None


def adapter_problems(out_dir: Path) -> list[str]:
    """Why ``out_dir`` is not an intact adapter, one line per file ([]: it verifies)."""
    out_dir = Path(out_dir)
    missing = [name for name in ADAPTER_FILES if not (out_dir / name).is_file()]
    if missing:
        return [f"{name} is missing" for name in missing]
    recorded = None
    if (out_dir / LOG_FILE).exists():
        try:
            recorded = store.read_json(out_dir / LOG_FILE).get("files")
        except (ValueError, OSError, AttributeError):
            return [f"{LOG_FILE} is unreadable"]
    if isinstance(recorded, dict):
        problems = []
        for name, found in adapter_checksums(out_dir).items():
            if recorded.get(name) != found:
                problems.append(f"{name} does not match the sha256 recorded in {LOG_FILE} when it was trained "
                                f"({str(recorded.get(name))[:12]}... recorded, {found[:12]}... found): damaged or "
                                "changed since")
        return problems
    problems = []
    try:
        config = json.loads((out_dir / "adapter_config.json").read_text(encoding="utf-8"))
        if not isinstance(config, dict):
            problems.append("adapter_config.json is not a JSON object")
    except (ValueError, OSError):
        problems.append("adapter_config.json is not valid JSON (truncated or damaged)")
    problem = _safetensors_problem(out_dir / "adapter_model.safetensors")
    return problems + ([problem] if problem else [])


def verify_adapter(out_dir: str | Path) -> str:
    """Check an adapter before it is loaded; returns a hash of its files' content. Raises
    ``AdapterError`` naming the directory and the file when a file is missing, damaged or changed."""
    out_dir = Path(out_dir)
    if not out_dir.is_dir():
        raise AdapterError(f"adapter {out_dir}: no such directory")
    problems = adapter_problems(out_dir)
    if problems:
        raise AdapterError(f"adapter {out_dir}: {'; '.join(problems)}. Retrain it (notebook 03 / "
                           "wowlib.align.run_alignment replaces a damaged adapter) or delete the directory")
    return store.content_hash(adapter_checksums(out_dir))


def is_trained(out_dir: Path, key: str) -> bool:
    """A complete adapter whose files verify, and a log with the same key. A damaged adapter is
    not trained (a warning names the file), so the next ``train`` replaces it."""
    out_dir = Path(out_dir)
    log_path = out_dir / LOG_FILE
    if not log_path.exists() or not all((out_dir / f).exists() for f in ADAPTER_FILES):
        return False
    try:
        if store.read_json(log_path).get("key") != key:
            return False
    except (ValueError, OSError, AttributeError):
        return False
    problems = adapter_problems(out_dir)
    for problem in problems:
        log.warning("%s: %s; it is not taken as trained (it will be retrained)", out_dir, problem)
    return not problems


def recorded_settings(out_dir: Path) -> dict[str, Any] | None:
    """The settings of the run in ``out_dir`` that a retraining with other settings would replace
    (its base model and config), from its log; None when there is no complete, intact run."""
    try:
        train_log = store.read_json(Path(out_dir) / LOG_FILE)
    except (ValueError, OSError):
        return None
    if not isinstance(train_log, dict) or adapter_problems(out_dir):
        return None
    config = train_log.get("config") or {}
    settings = {k: v for k, v in config.items()
                if k not in RESULT_NEUTRAL and not (k in ADDED_LATER and v == ADDED_LATER[k])}
    base = train_log.get("base_model")
    if isinstance(base, str) and not Path(base).is_absolute():   # older logs hold a machine path: not compared
        settings["base_model"] = base
    return settings


def _upgrade_log(out_dir: Path, base_name: str) -> None:
    """A log written before adapters were checksummed: record the checksums of the (verified)
    files and a portable base model, without retraining."""
    log_path = out_dir / LOG_FILE
    train_log = store.read_json(log_path)
    if "files" in train_log and not Path(str(train_log.get("base_model", ""))).is_absolute():
        return
    train_log["files"] = adapter_checksums(out_dir)
    if Path(str(train_log.get("base_model", ""))).is_absolute():
        train_log["base_model"] = base_name
    store.write_json(log_path, train_log)
    log.info("%s: recorded its files' checksums and a portable base model in %s", out_dir, LOG_FILE)


def train(config: AlignConfig, model_dir: str | Path, prefs: list[dict] | Any, out_dir: Path,
          eval_prefs: list[dict] | Any | None = None, base_model: str | None = None,
          overwrite: bool | None = None, reference_cache: ReferenceCache | None = None,
          about: dict[str, Any] | None = None) -> Path:
    """Train a LoRA adapter and save it (adapter files + ``train_log.json``) into ``out_dir``.

    Skips training when ``out_dir`` already holds a complete run with the same key (config, data,
    base model) whose files verify. Writes into a temporary sibling directory renamed at the end,
    and records the adapter files' sha256 in ``train_log.json``, written last, so an interrupted or
    damaged run never looks complete. Temporary folders of killed runs are removed.

    ``base_model``: the base model's portable name for the log and the adapter config (a named
    model or a hub id; default: derived from ``model_dir`` without machine paths). Replacing a
    complete run made with other settings (config, base model) raises ``store.OverwriteError``
    unless ``overwrite=True`` (or ``WOW_OVERWRITE=1``); new data is not a setting: it retrains.
    ``reference_cache``: where a DPO-family trainer finds (or leaves) the reference log-probs of
    these pairs, so that other configurations on the same data skip that pass. ``about``: what the
    adapter was trained on (preference set, type, task...), for its model card.

    The adapter folder works outside this project: ``adapter_config.json`` names the base model
    portably, the tokenizer (with the chat template training used) is saved beside the weights,
    and ``README.md`` is a model card (base model, data, trainer and config, training metrics).
    """
    out_dir = Path(out_dir)
    store.remove_stale_tmp(out_dir.parent)
    base_name = portable_model_name(model_dir, base_model)
    key = run_key(config, model_dir, prefs)
    if is_trained(out_dir, key):
        log.info("%s: already trained (key %s), skipping", out_dir, key)
        _upgrade_log(out_dir, base_name)
        return out_dir
    if out_dir.exists():
        store.refuse_overwrite(out_dir / LOG_FILE, recorded_settings(out_dir),
                               {**config.identity(), "base_model": base_name}, overwrite=overwrite)
        log.warning("%s: replacing an incomplete or different run", out_dir)
    n_pairs = len(pair_records(prefs))
    tmp = out_dir.with_name(f".{out_dir.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        log.info("training %s on %d pairs from %s -> %s", config.tag, n_pairs, base_name, out_dir)
        start = time.perf_counter()
        shares = reference_cache is not None and config.trainer in DPO_LOSSES and config.precompute_ref_log_probs
        ref_key = reference_cache.key(config, model_dir, prefs) if shares else None
        reference = reference_cache.get(ref_key, n_pairs) if shares else None
        trainer = build_trainer(config, model_dir, prefs, eval_prefs, output_dir=tmp / "_trainer", reference=reference)
        if shares and reference is None and (computed := reference_logps(trainer, n_pairs)) is not None:
            reference_cache.put(ref_key, computed)
        n_used = len(trainer.train_dataset)
        if n_used < n_pairs:    # trl drops pairs whose prompt alone fills max_length
            log.warning("%s: %d of %d pairs dropped by the trainer (prompt longer than max_length=%s)",
                        out_dir.name, n_pairs - n_used, n_pairs, config.max_length)
        train_start = time.perf_counter()
        result = trainer.train()
        train_seconds = time.perf_counter() - train_start
        for peft_config in getattr(trainer.model, "peft_config", {}).values():
            peft_config.base_model_name_or_path = base_name    # not the machine's cache path
        trainer.model.save_pretrained(str(tmp))          # a PeftModel: only the adapter
        shutil.rmtree(tmp / "_trainer", ignore_errors=True)
        trainer.processing_class.save_pretrained(str(tmp))     # with the chat template training used
        state = trainer.state
        (tmp / "README.md").write_text(model_card(config, base_name, n_used, state, result.training_loss,
                                                  resolve_precision(config), about or {}), encoding="utf-8")
        missing = [f for f in ADAPTER_FILES if not (tmp / f).exists()]
        if missing:
            raise RuntimeError(f"the trainer saved no PEFT adapter ({missing} missing in {tmp})")
        pairs_seen = state.global_step * config.per_device_train_batch_size * config.gradient_accumulation_steps
        store.write_json(tmp / LOG_FILE, {       # last: its checksums make the adapter count as trained
            "key": key, "config": config.to_dict(), "base_model": base_name,
            "base_model_identity": model_identity(model_dir), "data_hash": data_hash(prefs), "n_pairs": n_pairs, "n_pairs_trained": n_used,
            "n_eval_pairs": len(pair_records(eval_prefs)) if eval_prefs is not None else 0,
            "device": resolve_device(config), "precision": resolve_precision(config), "torch_threads": _torch_threads(),
            "reference": "reused" if reference is not None else "computed" if config.trainer in DPO_LOSSES else None,
            "global_steps": state.global_step, "pairs_seen": pairs_seen,
            "train_seconds": round(train_seconds, 3), "wall_seconds": round(time.perf_counter() - start, 3),
            "seconds_per_pair": round(train_seconds / max(pairs_seen, 1), 4),
            "peak_rss_mb": _peak_rss_mb(), "peak_gpu_mb": _peak_gpu_mb(),
            "train_loss": result.training_loss, "history": _jsonable(state.log_history),
            "libraries": store.library_versions(), "files": adapter_checksums(tmp),
        })
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log.info("%s: trained in %.1f s (%.3f s per pair)", out_dir, train_seconds, train_seconds / max(pairs_seen, 1))
    return out_dir


def model_card(config: AlignConfig, base_name: str, n_pairs: int, state, train_loss: float, precision: str,
               about: dict[str, Any]) -> str:
    """The adapter's README.md: a Hugging Face model card (YAML header: base model, library, tags)
    saying what it was trained on, how, and how it went."""
    margins = [e["rewards/margins"] for e in state.log_history if "rewards/margins" in e]
    lines = ["---", f"base_model: {base_name}", "library_name: peft", "tags:", "- lora", f"- {config.trainer}",
             "- trl", "- varying-shades-of-wrong", "---", "",
             f"# LoRA adapter: {config.trainer.upper()} on {about.get('prefs', 'a preference set')}", "",
             "Trained by `wowlib` (a reproduction of *Varying Shades of Wrong: Aligning LLMs with Wrong Answers Only*, "
             "Yao et al., ICLR 2025) on wrong-over-wrong preferences.", "",
             "| | |", "|---|---|", f"| base model | `{base_name}` |"]
    lines += [f"| {k.replace('_', ' ')} | {v} |" for k, v in about.items() if v not in (None, "")]
    lines += [f"| pairs trained | {n_pairs} |", f"| trainer | {config.trainer} (trl) |",
              f"| learning rate, scheduler | {config.learning_rate:g}, {config.lr_scheduler_type} |",
              f"| epochs, weight decay, beta | {config.num_train_epochs:g}, {config.weight_decay:g}, {config.beta:g} |",
              f"| LoRA r, alpha | {config.lora_r}, {config.lora_alpha} on {', '.join(config.target_modules)} |",
              f"| precision | {precision} |", f"| steps | {state.global_step} |", f"| final training loss | {train_loss:.4f} |"]
    if margins:
        lines.append(f"| reward margin, first and last logged step | {margins[0]:.4f} -> {margins[-1]:.4f} |")
    lines += ["", "```python", "from peft import PeftModel", "from transformers import AutoModelForCausalLM, AutoTokenizer",
              "base = AutoModelForCausalLM.from_pretrained(\"<the base model's directory or hub id>\")",
              "model = PeftModel.from_pretrained(base, \"<this folder>\")",
              "tokenizer = AutoTokenizer.from_pretrained(\"<this folder>\")   # the chat template used in training",
              "```", ""]
    return "\n".join(lines)


def read_log(out_dir: Path) -> dict:
    return store.read_json(Path(out_dir) / LOG_FILE)


def history(train_log: dict, metric: str) -> list[float]:
    """One logged metric over the training steps (e.g. ``"rewards/margins"``)."""
    return [entry[metric] for entry in train_log["history"] if metric in entry]


# ---------------------------------------------------------------------------- the stage

@dataclass(frozen=True)
class AlignJob:
    """One adapter to train: a preference set (``prefs/<prefs>.jsonl``) and a config."""

    prefs: str
    config: AlignConfig

    @property
    def model(self) -> str:
        """The adapter's name under ``models/``."""
        return f"{self.prefs}--{self.config.tag}"


def plan_jobs(pref_sets: Sequence[dict], configs: Sequence[AlignConfig]) -> list[AlignJob]:
    """Every preference set (rows of ``prefs.build_sets``) x every config. The SFT-on-wrong
    control trains with the ``sft`` trainer (once per distinct config), whatever ``configs`` say;
    an empty set is skipped with a warning (there is nothing to learn from)."""
    jobs: dict[str, AlignJob] = {}
    for row in pref_sets:
        if not row["kept"]:
            log.warning("preference set %s is empty: no adapter trained", row["name"])
            continue
        for config in configs:
            if row["type"] == "sft_wrong":
                config = dataclasses.replace(config, trainer="sft")
            job = AlignJob(row["name"], config)
            jobs.setdefault(job.model, job)
    return list(jobs.values())


def plan_cost(jobs: Sequence[AlignJob], pref_sets: Sequence[dict], seconds_per_pair: float) -> dict[str, Any]:
    """Steps and an estimated time for ``jobs`` (``seconds_per_pair``: measured, per model)."""
    kept = {row["name"]: row["kept"] for row in pref_sets}
    steps = 0
    for job in jobs:
        c = job.config
        per_epoch = -(-kept[job.prefs] // (c.per_device_train_batch_size * c.gradient_accumulation_steps))
        steps += c.max_steps if c.max_steps > 0 else int(per_epoch * c.num_train_epochs)
    return {"adapters": len(jobs), "optimizer_steps": steps,
            "minutes_estimate": round(steps * seconds_per_pair / 60, 1)}


def job_metadata(run: store.Run, job: AlignJob) -> dict[str, Any]:
    """Provenance of an adapter for the tables: preference type, trainer, source, judge, the task
    it was trained on and the elicitation row behind its labels (Figure 2)."""
    from .prefs import PrefSpec, elicitation_key
    spec_dict = store.read_json(run.prefs(job.prefs).with_suffix(".stats.json"))["spec"]
    spec = PrefSpec(**{**spec_dict, "tasks": tuple(spec_dict["tasks"])})
    key = elicitation_key(spec)
    return {"model": job.model, "prefs": job.prefs, "preference": spec.type, "trainer": job.config.trainer,
            "source": spec.source, "judge": spec.judge, "train_task": "+".join(spec.tasks),
            "config": job.config.tag, "elicitation_method": key[0] if key else None,
            "elicitation_judge": key[1] if key else None, "elicitation_margin": key[2] if key else None}


def run_alignment(run: store.Run, base_model: str, jobs: Sequence[AlignJob],
                  overwrite: bool | None = None) -> list[dict[str, Any]]:
    """Train every job's adapter into ``models/<job.model>/`` (a trained one with the same
    content key whose files verify is reused; a damaged one is retrained) and write
    ``models/summary.csv``; returns its rows. Holds the run's writer lock; ``overwrite``: replace
    adapters trained with another base model (default: refused, see ``train``)."""
    with run.writer("align", overwrite=overwrite):
        return _run_alignment(run, base_model, jobs)


def _run_alignment(run: store.Run, base_model: str, jobs: Sequence[AlignJob]) -> list[dict[str, Any]]:
    from datasets.utils.logging import disable_progress_bar, enable_progress_bar
    from tqdm.auto import tqdm

    from .llm.models import model_path
    model_dir = model_path(base_model)
    references = ReferenceCache(run.root / "models" / ".reference")
    disable_progress_bar()                # trl's per-adapter tokenising bars; one bar for the stage below
    try:
        bar = tqdm(jobs, desc="training adapters", unit="adapter")
        rows = [_train_job(run, base_model, model_dir, job, references, bar) for job in bar]
    finally:
        enable_progress_bar()
    store.write_csv(run.root / "models" / "summary.csv", rows)
    return rows


def _train_job(run: store.Run, base_model: str, model_dir, job: AlignJob, references: ReferenceCache,
               bar) -> dict[str, Any]:
    """Train (or reuse) one job's adapter; its row of ``models/summary.csv``."""
    from .prefs import load
    bar.set_postfix_str(job.model[:60])
    meta = job_metadata(run, job)
    about = {k: meta.get(k) for k in ("prefs", "preference", "source", "train_task", "judge")}
    out = train(job.config, model_dir, load(run, job.prefs), run.model(job.model), base_model=base_model,
                reference_cache=references, about=about)
    train_log = read_log(out)
    margins, accuracies = history(train_log, "rewards/margins"), history(train_log, "rewards/accuracies")
    return {**meta, "base_model": base_model, "n_pairs": train_log["n_pairs"], "steps": train_log["global_steps"],
            "train_seconds": train_log["train_seconds"], "train_loss": train_log["train_loss"],
            "final_margin": margins[-1] if margins else None, "final_accuracy": accuracies[-1] if accuracies else None}


def loss_shapes(margins: Sequence[float], beta: float = 0.1):
    """The per-pair loss of the DPO family as a function of the policy's log-ratio margin
    h = log pi(y_w|x)/pi_ref(y_w|x) - log pi(y_l|x)/pi_ref(y_l|x) (trl's formulas), for the
    notebook's picture: dpo = -log sigmoid(beta h), rso = max(0, 1 - beta h), ipo = (h - 1/(2 beta))^2."""
    import numpy as np
    import pandas as pd
    h = np.asarray(margins, dtype=float)
    losses = {"dpo (sigmoid)": np.logaddexp(0.0, -beta * h), "rso (hinge)": np.maximum(0.0, 1 - beta * h),
              "ipo": (h - 1 / (2 * beta)) ** 2}
    return pd.DataFrame([{"margin": m, "trainer": name, "loss": v} for name, values in losses.items()
                         for m, v in zip(h, values)])


def curves(run: store.Run, models: Sequence[str], metrics: Sequence[str] = ("loss", "rewards/margins")):
    """Long table of the logged training curves of ``models`` (for plots): model, step, metric, value."""
    import pandas as pd
    rows = []
    for name in models:
        for entry in read_log(run.model(name))["history"]:
            rows += [{"model": name, "step": entry.get("step"), "metric": m, "value": entry[m]}
                     for m in metrics if m in entry]
    return pd.DataFrame(rows, columns=["model", "step", "metric", "value"])


def _torch_threads() -> int:
    import torch
    return torch.get_num_threads()


def _peak_rss_mb() -> float:
    """Peak resident memory of this process so far (Linux reports KiB)."""
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def _peak_gpu_mb() -> float | None:
    import torch
    return round(torch.cuda.max_memory_allocated() / 2**20, 1) if torch.cuda.is_available() else None


def _jsonable(entries: list[dict]) -> list[dict]:
    return json.loads(json.dumps(entries, default=float))


# ---------------------------------------------------------------------------- measuring

def pair_logprobs(model, tokenizer, prefs: Iterable[dict] | Any) -> list[tuple[float, float]]:
    """Teacher-forced summed log-probs ``(chosen, rejected)`` of each pair, rendered with the chat
    template exactly as training sees it (prompt with the generation prompt, then the answer turn)."""
    import torch
    device = next(model.parameters()).device
    out = []
    model.eval()
    with torch.no_grad():
        for r in pair_records(prefs):
            prompt = _user(r["prompt"])
            prompt_ids = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True,
                                                       return_dict=True)["input_ids"]
            scores = []
            for answer in (r["chosen"], r["rejected"]):
                ids = tokenizer.apply_chat_template(prompt + _assistant(answer), tokenize=True,
                                                    return_dict=True)["input_ids"]
                tensor = torch.tensor([ids], device=device)
                logps = torch.log_softmax(model(input_ids=tensor).logits[0, :-1].float(), dim=-1)
                target = tensor[0, 1:]
                token_logps = logps.gather(-1, target[:, None])[:, 0]
                scores.append(token_logps[len(prompt_ids) - 1:].sum().item())
            out.append((scores[0], scores[1]))
    return out
