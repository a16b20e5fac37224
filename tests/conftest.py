"""Shared test settings: offline hubs, the real data directory, a shared model cache."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def data_dir() -> Path:
    """The real datasets (WOW_DATA_DIR; CI points it at its copy). Missing data is a failure, not a
    skip: the task tests are the proof that the loaders read the original files."""
    from wowlib import paths
    path = paths.data_dir()
    if not (path / "knowledge_crosswords").exists():
        pytest.fail(f"real data not found in {path}: set WOW_DATA_DIR (see README, Data)")
    return path


@pytest.fixture(scope="session")
def tiny_dir() -> Path:
    """The tiny test model (built once per machine into the cache directory)."""
    from wowlib.llm.tiny import tiny_model_dir
    return tiny_model_dir()


def require_stockfish() -> str:
    """The Stockfish binary; without it a test is skipped with the reason, except in CI (CI=true),
    where a missing engine is a failure: CI must prove the chess task works."""
    from wowlib.tasks.chess import find_stockfish
    try:
        return find_stockfish()
    except FileNotFoundError as err:
        if os.environ.get("CI", "").strip().lower() in ("1", "true", "yes"):
            pytest.fail(f"CI=true but {err}")
        pytest.skip(f"chess needs Stockfish, absent here: {err}")


@pytest.fixture(scope="session")
def stockfish() -> str:
    return require_stockfish()
