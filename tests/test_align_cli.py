"""The alignment entry point (``python -m wowlib.scale.train --config ...``) under ``accelerate launch``
on the CPU, its config errors (each names the YAML key), and the checked-in accelerate configs."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from wowlib import align
from wowlib.scale import train as cli

REPO = Path(__file__).resolve().parent.parent
ACCELERATE_CONFIGS = ("cpu", "single_gpu", "multi_gpu_ddp", "deepspeed_zero3")


def _prefs(path: Path, n: int = 4) -> Path:
    """Separable toy pairs, as in test_align (provenance columns included, as prefs.py writes)."""
    rows = [{"prompt": f"Question {i}: which option is right?\nOptions:\nA. yes\nB. no\n",
             "chosen": "I do not know at all.", "rejected": "The answer is A.", "task": "toy",
             "question_id": str(i), "source": "self", "method": "oracle", "chosen_proxy": 0.5, "rejected_proxy": 0.0}
            for i in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _config(tmp_path: Path, **changes) -> Path:
    data = {"base_model": "tiny", "prefs": str(_prefs(tmp_path / "prefs.jsonl")), "out_dir": str(tmp_path / "adapter"),
            "align": {"trainer": "dpo", "learning_rate": 5e-3, "max_steps": 2, "warmup_ratio": 0.0,
                      "logging_steps": 1, "max_length": 128, "device": "cpu"}}
    for key, value in changes.items():
        if value is None:
            data.pop(key)
        else:
            data[key] = value
    path = tmp_path / "align.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ACCELERATE_")}
    return {**env, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRL_EXPERIMENTAL_SILENCE": "1",
            "TOKENIZERS_PARALLELISM": "false", "PYTHONWARNINGS": "ignore"}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _launch(cmd: list[str], cwd: Path, timeout: float = 180) -> subprocess.CompletedProcess:
    """Run a launcher in its own process group, killed whole (workers included) on a timeout."""
    proc = subprocess.Popen(cmd, cwd=cwd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"{cmd[0]} timed out after {timeout} s: {err[-2000:]}")
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


@pytest.mark.slow
def test_accelerate_launch_trains_the_tiny_model_on_cpu(tiny_dir, tmp_path) -> None:
    config = _config(tmp_path)
    accelerate = Path(sys.executable).parent / "accelerate"
    cmd = [str(accelerate), "launch", "--config_file", str(REPO / "configs/accelerate/cpu.yaml"),
           "-m", "wowlib.scale.train", "--config", str(config)]
    done = _launch(cmd, tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    out = tmp_path / "adapter"
    assert all((out / f).exists() for f in align.ADAPTER_FILES)
    train_log = align.read_log(out)
    assert train_log["global_steps"] == 2 and train_log["device"] == "cpu"
    assert train_log["config"]["max_steps"] == 2 and train_log["n_pairs"] == 4
    # a rerun with the same config, data and base model skips training (in-process: no torch import cost)
    before = (out / "adapter_model.safetensors").stat().st_mtime_ns
    assert cli.main(["--config", str(config)]) == out
    assert (out / "adapter_model.safetensors").stat().st_mtime_ns == before


@pytest.mark.slow
def test_two_process_ddp_on_cpu_writes_one_adapter_from_rank_0(tiny_dir, tmp_path) -> None:
    """What multi_gpu_ddp.yaml runs (torchrun under accelerate), on 2 CPU processes (gloo): every
    rank trains, rank 0 alone writes out_dir, the other rank's scratch directory is removed."""
    align_cfg = {"trainer": "dpo", "learning_rate": 5e-3, "max_steps": 2, "warmup_ratio": 0.0, "logging_steps": 1,
                 "max_length": 128, "device": "cpu", "precompute_ref_log_probs": False}
    config = _config(tmp_path, align=align_cfg)
    torchrun = Path(sys.executable).parent / "torchrun"
    cmd = [str(torchrun), "--nproc_per_node", "2", "--master_addr", "127.0.0.1", "--master_port", str(_free_port()),
           "-m", "wowlib.scale.train", "--config", str(config)]
    done = _launch(cmd, tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert all((tmp_path / "adapter" / f).exists() for f in align.ADAPTER_FILES)
    assert align.read_log(tmp_path / "adapter")["global_steps"] == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter", "align.yaml", "prefs.jsonl"]
    # the precomputed reference cannot be shared between processes: a clear error, not a crash
    env = {**_env(), "WORLD_SIZE": "2"}
    fail = subprocess.run([sys.executable, "-m", "wowlib.scale.train", "--config", str(_config(tmp_path)), "--check"],
                          check=False, env=env, capture_output=True, text=True, timeout=120)
    assert fail.returncode == 2 and "align.precompute_ref_log_probs: must be false with 2 processes" in fail.stderr


@pytest.mark.parametrize(("changes", "message"), [
    ({"prefs": None}, "prefs: missing"),
    ({"base_model": None}, "base_model: missing"),
    ({"out_dir": ""}, "out_dir: missing"),
    ({"prefs": "/nonexistent/prefs.jsonl"}, "prefs: no such file"),
    ({"base_model": "no-such-model"}, "base_model: 'no-such-model' is neither a named model"),
    ({"align": {"learning_rate": -1}}, "align.learning_rate: must be a number > 0"),
    ({"align": {"lr": 1e-4}}, "align.lr: unknown AlignConfig field"),
    ({"align": ["dpo"]}, "align: must be a mapping"),
    ({"epochs": 3}, "epochs: unknown key"),
])
def test_config_errors_name_the_key(tmp_path, capsys, changes, message) -> None:
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--config", str(_config(tmp_path, **changes)), "--check"])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_bad_files_and_launches_are_clear_errors(tmp_path, capsys, monkeypatch) -> None:
    with pytest.raises(SystemExit):
        cli.main(["--config", str(tmp_path / "missing.yaml")])
    assert "no such file" in capsys.readouterr().err
    broken = tmp_path / "broken.yaml"
    broken.write_text("- just\n- a list\n")
    with pytest.raises(SystemExit):
        cli.main(["--config", str(broken)])
    assert "must be a mapping" in capsys.readouterr().err
    config = _config(tmp_path)
    (tmp_path / "prefs.jsonl").write_text(json.dumps({"prompt": "p", "chosen": "c"}) + "\n")
    with pytest.raises(SystemExit):
        cli.main(["--config", str(config), "--check"])
    assert "prefs:" in (err := capsys.readouterr().err) and "lacks ['rejected']" in err
    assert cli.launch_problem({"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_ZERO_STAGE": "3"})
    assert cli.launch_problem({"ACCELERATE_USE_FSDP": "true"})
    assert "mixed_precision=bf16" in cli.launch_problem({"ACCELERATE_MIXED_PRECISION": "bf16"})
    assert cli.launch_problem({"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_ZERO_STAGE": "2",
                                 "ACCELERATE_MIXED_PRECISION": "no"}) is None
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")
    with pytest.raises(SystemExit):
        cli.main(["--config", str(_config(tmp_path)), "--check"])
    assert "accelerate launch: mixed_precision=bf16" in capsys.readouterr().err


def test_relative_paths_are_taken_from_the_repo_root(tmp_path) -> None:
    config = _config(tmp_path, out_dir="runs/some-run/models/x")
    job = cli.load_cli_config(config)
    assert job.out_dir == REPO / "runs/some-run/models/x" and job.config.max_steps == 2


@pytest.mark.parametrize("name", ACCELERATE_CONFIGS)
def test_accelerate_configs_load_and_leave_precision_to_wowlib(name) -> None:
    from accelerate.commands.config.config_args import ClusterConfig
    path = REPO / "configs" / "accelerate" / f"{name}.yaml"
    config = ClusterConfig.from_yaml_file(str(path))
    assert config.mixed_precision == "no"
    assert (config.use_cpu, config.distributed_type) == {
        "cpu": (True, "NO"), "single_gpu": (False, "NO"), "multi_gpu_ddp": (False, "MULTI_GPU"),
        "deepspeed_zero3": (False, "DEEPSPEED")}[name]


def test_example_config_is_valid(tmp_path) -> None:
    data = yaml.safe_load((REPO / "configs" / "align_example.yaml").read_text())
    data["prefs"] = str(_prefs(tmp_path / "prefs.jsonl"))
    path = tmp_path / "example.yaml"
    path.write_text(yaml.safe_dump(data))
    job = cli.load_cli_config(path)
    assert job.base_model == "smollm2-135m" and job.config == align.AlignConfig(**data["align"])
