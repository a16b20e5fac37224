"""The call cache: every LLM call keyed by a hash of (backend + model id + adapter hash, messages,
decoding parameters, sample index, seed), appended to a JSONL file as each batch finishes.

A rerun skips what is done; killing a run (even kill -9) loses at most the batch in flight and
duplicates nothing. Batches are planned over the FULL request list and a batch is rerun whole
if any of its requests is missing, so a resumed run computes every answer in exactly the batch
it would have had uninterrupted: the results are identical, not merely similar. Failed calls
are returned with status "error" and never cached.
"""
from __future__ import annotations

import hashlib
import json
import logging
import re
from collections.abc import Sequence
from pathlib import Path

from tqdm.auto import tqdm

from .. import store
from .base import LLM, Completion, Request

log = logging.getLogger(__name__)


def request_key(llm_key: str, request: Request) -> str:
    payload = json.dumps({"llm": llm_key, **request.as_json()}, sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(payload.encode()).hexdigest()


def cache_file_name(llm_key: str) -> str:
    readable = re.sub(r"[^A-Za-z0-9._+-]+", "_", llm_key)[:80]
    return f"{readable}-{hashlib.sha256(llm_key.encode()).hexdigest()[:8]}"


class CachedLLM:
    """An LLM behind the call cache of one run directory."""

    def __init__(self, llm: LLM, cache_dir: Path) -> None:
        self.llm = llm
        self.path = Path(cache_dir) / f"{cache_file_name(llm.key)}.jsonl"
        self._done: dict[str, dict] = {r["key"]: r for r in store.iter_jsonl(self.path)}
        self.stats = {"cached": 0, "computed": 0, "errors": 0}

    @property
    def name(self) -> str:
        return self.llm.name

    @property
    def key(self) -> str:
        return self.llm.key

    @property
    def supports_constraints(self) -> bool:
        return bool(getattr(self.llm, "supports_constraints", False))

    def __len__(self) -> int:
        return len(self._done)

    def generate(self, requests: Sequence[Request], desc: str = "generating") -> list[Completion]:
        keys = [request_key(self.llm.key, r) for r in requests]
        results: dict[str, Completion] = {}
        todo = [b for b in self.llm.plan(requests) if any(keys[i] not in self._done for i in b)]
        n_todo = sum(len(b) for b in todo)
        self.stats["cached"] += len(requests) - n_todo
        with tqdm(total=n_todo, desc=f"{desc} [{self.llm.name}]", unit="call", disable=n_todo == 0) as bar:
            for batch in todo:
                completions = self.llm.run_batch([requests[i] for i in batch])
                fresh = []
                for i, completion in zip(batch, completions):
                    if completion.status != "ok":
                        results[keys[i]] = completion
                        self.stats["errors"] += 1
                    elif keys[i] not in self._done:
                        record = {"key": keys[i], **completion.as_json()}
                        self._done[keys[i]] = record
                        fresh.append(record)
                store.append_jsonl(self.path, fresh)
                self.stats["computed"] += len(fresh)
                bar.update(len(batch))
        return [results.get(k) or _completion(self._done[k]) for k in keys]


def _completion(record: dict) -> Completion:
    fields = {k: record[k] for k in ("text", "n_tokens", "mean_logprob", "finish", "status", "error")}
    return Completion(**fields)
