"""Where things live. Every path is resolved from the repository root, never from the cwd.

Environment settings (all optional):
- ``WOW_DATA_DIR``: the raw datasets in their original formats (default ``<repo>/data``).
- ``WOW_RUNS_DIR``: run artefacts, one folder per run (default ``<repo>/runs``).
- ``WOW_CACHE_DIR``: slow, reusable work shared by runs: converted model checkpoints, chess
  engine analyses, sentence embeddings (default ``$XDG_CACHE_HOME/wowlib`` or ``~/.cache/wowlib``).
A relative value is taken relative to the repository root.
"""
from __future__ import annotations

import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
PROMPTS_DIR = Path(__file__).resolve().parent / "prompts"


def _from_env(var: str, default: Path) -> Path:
    value = os.environ.get(var)
    if not value:
        return default
    path = Path(value).expanduser()
    return path if path.is_absolute() else (REPO_ROOT / path).resolve()


def data_dir() -> Path:
    return _from_env("WOW_DATA_DIR", REPO_ROOT / "data")


def runs_dir() -> Path:
    return _from_env("WOW_RUNS_DIR", REPO_ROOT / "runs")


def cache_dir() -> Path:
    xdg = os.environ.get("XDG_CACHE_HOME")
    default = (Path(xdg) if xdg else Path.home() / ".cache") / "wowlib"
    return _from_env("WOW_CACHE_DIR", default)


def run_dir(run: str) -> Path:
    """``runs/<run>``; ``run`` may also be an absolute path, or relative with ``..`` (e.g.
    ``../results/cpu``, the committed results), normalised so that it does not need ``runs/`` to exist."""
    path = Path(run)
    return path if path.is_absolute() else Path(os.path.normpath(runs_dir() / run))


def prompt_text(name: str) -> str:
    """A prompt template from ``wowlib/prompts/<name>.txt``, verbatim."""
    path = PROMPTS_DIR / f"{name}.txt"
    if not path.exists():
        known = sorted(p.stem for p in PROMPTS_DIR.glob("*.txt"))
        raise FileNotFoundError(f"no prompt template {path}; known templates: {known}")
    return path.read_text(encoding="utf-8")
