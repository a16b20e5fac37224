"""The run directory: its layout (DESIGN.md section 4), JSONL/JSON/CSV I/O and manifests.

Records are appended and flushed as they complete, so a killed run loses at most the line it was
writing; readers drop a truncated LAST line (the trace of a kill) with a warning and reject a
corrupt line anywhere else, naming it.
"""
from __future__ import annotations

import csv
import fcntl
import hashlib
import io
import json
import logging
import os
import platform
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

from . import paths

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------- files

def append_jsonl(path: Path, records: Iterable[dict]) -> int:
    """Append records (one JSON object per line), flushed and fsynced; returns the count."""
    lines = [json.dumps(r, ensure_ascii=False, sort_keys=True) + "\n" for r in records]
    if not lines:
        return 0
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as f:
        _heal_truncated_tail(f, path)
        f.write("".join(lines))
        f.flush()
        os.fsync(f.fileno())
    return len(lines)


def _heal_truncated_tail(f: io.TextIOWrapper, path: Path) -> None:
    """If a kill left the file without a final newline, cut the partial line before appending."""
    size = f.seek(0, os.SEEK_END)
    if size == 0:
        return
    with open(path, "rb") as raw:
        raw.seek(size - 1)
        if raw.read(1) == b"\n":
            return
        data = path.read_bytes()
    keep = data.rfind(b"\n") + 1
    log.warning("%s: dropping a truncated last line (%d bytes) left by an interrupted run", path, size - keep)
    f.flush()
    os.truncate(path, keep)
    f.seek(keep)


def read_jsonl(path: Path) -> list[dict]:
    """All records of a JSONL file ([] if it does not exist)."""
    return list(iter_jsonl(path))


def iter_jsonl(path: Path) -> Iterator[dict]:
    if not path.exists():
        return
    with open(path, encoding="utf-8") as f:
        lines = f.readlines()
    for lineno, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            yield json.loads(line)
        except json.JSONDecodeError as err:
            if lineno == len(lines) and not line.endswith("\n"):
                log.warning("%s: ignoring a truncated last line (interrupted run)", path)
                return
            raise ValueError(f"{path}: line {lineno}: corrupt JSON ({err.msg})") from None


def write_jsonl(path: Path, records: Iterable[dict]) -> None:
    """Write a whole JSONL file atomically."""
    _atomic_write(path, "".join(json.dumps(r, ensure_ascii=False, sort_keys=True) + "\n" for r in records))


def write_json(path: Path, obj: Any) -> None:
    _atomic_write(path, json.dumps(obj, indent=1, ensure_ascii=False, sort_keys=True) + "\n")


def read_json(path: Path) -> Any:
    return json.loads(path.read_text(encoding="utf-8"))


def write_csv(path: Path, rows: list[dict], columns: list[str] | None = None) -> None:
    """A CSV with a header; ``columns`` fixes the order (default: keys in first-seen order)."""
    if columns is None:
        columns = list(dict.fromkeys(k for row in rows for k in row))
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, lineterminator="\n", extrasaction="ignore")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: _csv_value(row.get(k)) for k in columns})
    _atomic_write(path, buf.getvalue())


def _csv_value(value: Any) -> Any:
    if isinstance(value, float):
        return f"{value:.6g}"
    return "" if value is None else value


def _atomic_write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def content_hash(obj: Any) -> str:
    """A short, stable hash of JSON-able content (configs, parameters)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


# ---------------------------------------------------------------------------- manifests

LIBRARIES = ("wowlib", "torch", "transformers", "trl", "peft", "accelerate", "datasets", "numpy", "pandas")


def library_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for name in LIBRARIES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def write_manifest(directory: Path, stage: str, params: dict, models: dict | None = None,
                   outputs: Iterable[Path] = (), entry: str | None = None) -> Path:
    """``<directory>/manifest.json``: parameters, model ids, library versions, output hashes.

    With ``entry`` (e.g. a task name), the manifest keeps one record per entry, so stages that
    write one file per task at different times never drop each other's records."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "manifest.json"
    record = {
        "written": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "params": params,
        "models": models or {},
        "outputs": {str(p.relative_to(directory)): file_sha256(p) for p in sorted(outputs) if p.exists()},
    }
    if entry is None:
        manifest = {"stage": stage, "libraries": library_versions(), **record}
    else:
        manifest = read_json(path) if path.exists() else {}
        if manifest.get("stage") != stage or "entries" not in manifest:
            manifest = {"stage": stage, "entries": {}}
        manifest["libraries"] = library_versions()
        manifest["entries"][entry] = record
    write_json(path, manifest)
    return path


@contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """An exclusive lock (``flock``) around work that two processes must not do at once, such as
    building the same model into the cache."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


# ---------------------------------------------------------------------------- layout

@dataclass(frozen=True)
class Run:
    """The layout of one run directory, ``runs/<name>/``."""

    root: Path

    @classmethod
    def named(cls, name: str | Path) -> Run:
        return cls(paths.run_dir(str(name)))

    def samples(self, generator: str, task: str) -> Path:
        return self.root / "samples" / generator / f"{task}.jsonl"

    def judgments(self, generator: str, judge: str, task: str, kind: str) -> Path:
        if kind not in ("pairwise", "score"):
            raise ValueError(f"judgment kind must be 'pairwise' or 'score', got {kind!r}")
        return self.root / "judgments" / generator / judge / f"{task}.{kind}.jsonl"

    @property
    def elicitation(self) -> Path:
        return self.root / "elicitation"

    def prefs(self, name: str) -> Path:
        return self.root / "prefs" / f"{name}.jsonl"

    def model(self, name: str) -> Path:
        return self.root / "models" / name

    def eval(self, model: str, task: str) -> Path:
        return self.root / "eval" / model / f"{task}.jsonl"

    @property
    def eval_dir(self) -> Path:
        return self.root / "eval"

    def llm_cache(self, model_key: str) -> Path:
        return self.root / "cache" / f"{model_key}.jsonl"

    @property
    def notebooks(self) -> Path:
        return self.root / "notebooks"
