"""``python -m wowlib.scale.train --config cfg.yaml``: train one LoRA adapter outside the notebook,
e.g. on GPUs with ``accelerate launch --config_file configs/accelerate/single_gpu.yaml -m
wowlib.scale.train --config configs/align_example.yaml``; notebook 03 calls the same
``wowlib.align.train`` in-process. The YAML:

    base_model: tiny                  # a named model (wowlib.llm.models) or a checkpoint directory
    prefs: runs/cpu/prefs/self-oracle-kc.jsonl
    out_dir: runs/cpu/models/self-oracle-kc--cli
    align: {trainer: dpo, learning_rate: 5.0e-5, max_steps: -1}     # AlignConfig fields

Relative paths are taken from the repository root (as everywhere in wowlib), never the cwd.
Precision follows ``build_trainer``: bf16 only on a CUDA device that supports it, fp32 on CPU
(the accelerate configs say the same); 4-/8-bit loading is not offered by ``build_trainer``.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .. import store
from ..align import (DPO_LOSSES, LOG_FILE, AlignConfig, is_trained, pair_records, portable_model_name,
                     recorded_settings, run_key, train)

log = logging.getLogger(__name__)

CLI_KEYS = ("base_model", "prefs", "out_dir", "align")


class CLIConfigError(ValueError):
    """A bad entry in the entry point's YAML; the message names the key."""


@dataclass(frozen=True)
class CLIJob:
    config: AlignConfig
    base_model: str
    prefs: Path
    out_dir: Path


def _cli_path(value: Any, key: str) -> Path:
    from ..paths import REPO_ROOT
    if not isinstance(value, str) or not value.strip():
        raise CLIConfigError(f"{key}: must be a path (a non-empty string), got {value!r}")
    path = Path(value).expanduser()
    return path if path.is_absolute() else REPO_ROOT / path


def load_cli_config(path: str | Path) -> CLIJob:
    """The entry point's YAML, checked; every error names the offending key."""
    import yaml
    path = Path(path)
    if not path.exists():
        raise CLIConfigError(f"--config: no such file: {path}")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        raise CLIConfigError(f"{path}: not valid YAML ({err})") from None
    if not isinstance(data, dict):
        raise CLIConfigError(f"{path}: must be a mapping with keys {list(CLI_KEYS)}, got {type(data).__name__}")
    unknown = sorted(set(data) - set(CLI_KEYS))
    if unknown:
        raise CLIConfigError(f"{unknown[0]}: unknown key (known keys: {list(CLI_KEYS)})")
    for key in ("base_model", "prefs", "out_dir"):
        if data.get(key) in (None, ""):
            raise CLIConfigError(f"{key}: missing (required keys: base_model, prefs, out_dir)")
    base_model = data["base_model"]
    if not isinstance(base_model, str):
        raise CLIConfigError(f"base_model: must be a model name or a checkpoint directory, got {base_model!r}")
    fields = {f.name for f in dataclasses.fields(AlignConfig)}
    align_cfg = data.get("align") or {}
    if not isinstance(align_cfg, dict):
        raise CLIConfigError(f"align: must be a mapping of AlignConfig fields, got {align_cfg!r}")
    bad = sorted(set(align_cfg) - fields)
    if bad:
        raise CLIConfigError(f"align.{bad[0]}: unknown AlignConfig field (fields: {sorted(fields)})")
    try:
        config = AlignConfig(**align_cfg)
    except ValueError as err:                    # "AlignConfig.<field>: <why>" -> "align.<field>: <why>"
        raise CLIConfigError(str(err).replace("AlignConfig.", "align.", 1)) from None
    prefs = _cli_path(data["prefs"], "prefs")
    if not prefs.is_file():
        raise CLIConfigError(f"prefs: no such file: {prefs}")
    return CLIJob(config, base_model, prefs, _cli_path(data["out_dir"], "out_dir"))


def _cli_model_dir(base_model: str) -> str | Path:
    from ..llm.models import MODELS, get_spec, model_path
    if base_model in MODELS:
        return model_path(base_model)
    try:
        get_spec(base_model)
        return model_path(base_model)
    except KeyError:
        pass
    directory = _cli_path(base_model, "base_model")
    if (directory / "config.json").exists():
        return directory
    raise CLIConfigError(f"base_model: {base_model!r} is neither a named model ({', '.join(sorted(MODELS))}) "
                         "nor a checkpoint directory with a config.json")


def launch_problem(env: dict[str, str] | None = None) -> str | None:
    """Why the ``accelerate launch`` settings in ``env`` cannot run ``train`` (None: they can).

    ``train`` saves the adapter with ``save_pretrained`` on the process that trained it: right
    for one process and for DDP (every rank holds the full adapter; only rank 0 writes
    ``out_dir``), wrong for DeepSpeed ZeRO-3 and FSDP, whose ranks hold parameter shards. Mixed
    precision is decided by ``build_trainer`` (bf16 on a CUDA device that supports it, fp32 on
    CPU), so a launcher-level ``mixed_precision`` would override it: it must be ``no``."""
    env = os.environ if env is None else env
    if env.get("ACCELERATE_USE_FSDP", "").lower() == "true" or (
            env.get("ACCELERATE_USE_DEEPSPEED", "").lower() == "true"
            and env.get("ACCELERATE_DEEPSPEED_ZERO_STAGE", "") == "3"):
        return ("FSDP / DeepSpeed ZeRO-3 shard the parameters, and train() saves the adapter with "
                "save_pretrained on each rank (it would save empty shards); use single_gpu.yaml or "
                "multi_gpu_ddp.yaml until train() saves through trainer.save_model()")
    precision = env.get("ACCELERATE_MIXED_PRECISION", "no")
    if precision != "no":
        return (f"mixed_precision={precision}: wowlib chooses the precision itself (bf16 on a CUDA device "
                "that supports it, fp32 on CPU); launch with --mixed_precision no (as configs/accelerate/*.yaml)")
    return None


def main(argv: Sequence[str] | None = None) -> Path | None:
    """``python -m wowlib.scale.train --config cfg.yaml [--check]``: train (or, with ``--check``, only
    validate) the adapter the YAML describes; returns the adapter directory.

    Under ``accelerate launch`` with several processes (DDP), every rank trains (gradients are
    synchronised by the trainer) and only rank 0 writes ``out_dir``; the other ranks save into
    a scratch directory beside it that is removed afterwards."""
    import argparse
    import sys
    parser = argparse.ArgumentParser(prog="python -m wowlib.scale.train",
                                     description="Train one LoRA adapter on a preference set (wowlib.align.train).")
    parser.add_argument("--config", required=True, help="YAML with base_model, prefs, out_dir and align")
    parser.add_argument("--check", action="store_true", help="validate the config and the data, do not train")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace an adapter in out_dir trained with another config or base model "
                             "(default: refused; also WOW_OVERWRITE=1)")
    args = parser.parse_args(argv)
    rank = int(os.environ.get("RANK", "0"))
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        job = load_cli_config(args.config)
        prefs = store.read_jsonl(job.prefs)
        try:
            pair_records(prefs)
        except ValueError as err:
            raise CLIConfigError(f"prefs: {job.prefs}: {err}") from None
        problem = launch_problem()
        if problem:
            raise CLIConfigError(f"accelerate launch: {problem}")
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
        if world_size > 1 and job.config.trainer in DPO_LOSSES and job.config.precompute_ref_log_probs:
            raise CLIConfigError(
                f"align.precompute_ref_log_probs: must be false with {world_size} processes (trl 1.16 "
                "precomputes the reference log-probs into a per-process temporary file that the other ranks "
                "cannot open); the reference is then computed on the fly (adapter disabled)")
        model_dir = _cli_model_dir(job.base_model)
    except CLIConfigError as err:
        print(f"error: {args.config}: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    log.info("%s: %s on %d pairs from %s (%s) -> %s", args.config, job.config.tag, len(prefs), job.prefs,
             job.base_model, job.out_dir)
    if args.check:
        return None
    if is_trained(job.out_dir, run_key(job.config, model_dir, prefs)):     # the same answer on every rank
        log.info("%s: already trained with this config, data and base model", job.out_dir)
        return job.out_dir
    base_name = portable_model_name(model_dir, job.base_model)
    try:                                  # decided on every rank alike, before any rank trains
        store.refuse_overwrite(job.out_dir / LOG_FILE, recorded_settings(job.out_dir),
                               {**job.config.identity(), "base_model": base_name},
                               overwrite=True if args.overwrite else None)
    except store.OverwriteError as err:
        print(f"error: {args.config}: {err} (command line: --overwrite)", file=sys.stderr)
        raise SystemExit(2) from None
    if rank == 0:
        out = train(job.config, model_dir, prefs, job.out_dir, base_model=base_name, overwrite=True)
        log.info("adapter and %s in %s", LOG_FILE, out)
        return out
    scratch = job.out_dir.with_name(f".{job.out_dir.name}.rank{rank}")
    try:
        train(job.config, model_dir, prefs, scratch, base_model=base_name)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return None


if __name__ == "__main__":
    main()
