"""The run directory: its layout (docs/design.md), JSONL/JSON/CSV I/O and manifests.

Records are appended and flushed as they complete, so a killed run loses at most the line it was
writing; readers drop a truncated LAST line (the trace of a kill) with a warning and reject a
corrupt line anywhere else, naming it.

Several processes may share a run directory, so:

- appends to a JSONL file hold an exclusive ``flock`` on that file, and the repair of a truncated
  last line happens under the same lock (it can never cut another process's append in flight);
- a manifest's read-modify-write (``write_manifest(..., entry=)``) holds a lock on its folder's
  ``.manifest.lock``;
- a stage writes a run directory only while it holds the run's writer lock (``Run.writer``): a
  second writer fails at once, naming the holder (pid, host, stage, start time) and the lock file;
- a stage refuses to overwrite an output that its manifest says was made with other settings
  (``refuse_overwrite``) unless asked to: ``overwrite=True`` or ``WOW_OVERWRITE=1``.
"""
from __future__ import annotations

import contextvars
import csv
import fcntl
import functools
import hashlib
import inspect
import io
import json
import logging
import os
import platform
import re
import shutil
import socket
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any, TypeVar

from . import paths

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------- files

def append_jsonl(path: Path, records: Iterable[dict]) -> int:
    """Append records (one JSON object per line), flushed and fsynced; returns the count.

    The append holds an exclusive ``flock`` on the file from before the tail check to after the
    fsync, so appends of several processes never interleave, and a partial last line seen under the
    lock can only be the trace of a killed writer (cut before appending), never an append in flight."""
    lines = [json.dumps(r, ensure_ascii=False, sort_keys=True) + "\n" for r in records]
    if not lines:
        return 0
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            _heal_truncated_tail(f, path)
            f.write("".join(lines))
            f.flush()
            os.fsync(f.fileno())
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)
    return len(lines)


def _heal_truncated_tail(f: io.TextIOWrapper, path: Path) -> None:
    """If a kill left the file without a final newline, cut the partial line before appending
    (called with the file's append lock held)."""
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
    """The records of a JSONL file. A last line without its newline is the trace of a killed
    writer (cut anywhere, even inside a multi-byte character): skipped with a warning. Any other
    bad line is an error naming the file and line."""
    if not path.exists():
        return
    *lines, tail = path.read_bytes().split(b"\n")
    for lineno, raw in enumerate(lines + [tail], start=1):
        truncated = lineno > len(lines)  # the text after the last newline
        try:
            line = raw.decode("utf-8")
            if not line.strip():
                continue
            yield json.loads(line)
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            if truncated:
                log.warning("%s: ignoring a truncated last line (interrupted run)", path)
                return
            reason = err.msg if isinstance(err, json.JSONDecodeError) else "not UTF-8"
            raise ValueError(f"{path}: line {lineno}: corrupt JSON ({reason})") from None


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
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    remove_stale_tmp(path.parent, path.name)


_TMP = re.compile(r"^\.(?P<name>.+)\.tmp(?P<pid>\d+)$")


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` exists on this machine (a zombie counts as alive)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:              # it exists, under another user
        return True
    return True


def remove_stale_tmp(directory: Path, name: str | None = None) -> list[Path]:
    """Remove the temporary siblings (``.<name>.tmp<pid>``, files or folders) that killed writers
    left in ``directory``: only those whose process is no longer alive on this machine, so a
    writer still at work keeps its own. ``name``: only the leftovers of that target. Returns what
    was removed."""
    removed = []
    try:
        entries = list(os.scandir(directory))
    except FileNotFoundError:
        return removed
    for entry in entries:
        match = _TMP.match(entry.name)
        if not match or (name is not None and match["name"] != name) or pid_alive(int(match["pid"])):
            continue
        path = Path(entry.path)
        if entry.is_dir(follow_symlinks=False):
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
        log.info("%s: removed a leftover of a killed writer (pid %s)", path, match["pid"])
        removed.append(path)
    return removed


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def content_hash(obj: Any) -> str:
    """A short, stable hash of JSON-able content (configs, parameters)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


# ---------------------------------------------------------------------------- portable files

# Machine-local absolute paths (user names, machine layout) that must not reach a committed file:
# POSIX home/temporary/system roots, macOS home and temporary folders, Windows user folders.
_ABSOLUTE = re.compile(r"(?<![\w.~-])(?:/(?:root|home|tmp|Users|mnt|scratch|private/var|var/folders)(?=[/\"'\s]|$)"
                       r"|[A-Za-z]:(?:\\{1,2}|/)(?:Users|Documents and Settings)\b)[^\s\"',;)\]}]*")


def absolute_paths(text: str, roots: Iterable[str | Path] = ()) -> list[tuple[int, str]]:
    """Machine-local absolute paths in ``text`` as ``(line number, path)``: paths under /root,
    /home, /tmp, /Users, /mnt, /scratch, macOS' /private/var and /var/folders, Windows user
    folders, and under any of ``roots`` (e.g. the repository, the cache directory)."""
    extra = [re.escape(str(r).rstrip("/")) for r in roots if len(Path(r).parts) > 2]
    pattern = _ABSOLUTE if not extra else re.compile(
        _ABSOLUTE.pattern + r"|(?<![\w.~-])(?:" + "|".join(extra) + r")(?=[/\"'\s]|$)[^\s\"',;)\]}]*")
    return [(lineno, m.group(0)) for lineno, line in enumerate(text.splitlines(), start=1)
            for m in pattern.finditer(line)]


def local_roots() -> list[Path]:
    """This machine's directories whose paths must not reach a committed file: the repository,
    the runs, the cache and the user's home."""
    return [paths.REPO_ROOT, paths.runs_dir(), paths.cache_dir(), Path.home()]


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
        write_json(path, {"stage": stage, "libraries": library_versions(), **record})
        return path
    libraries = library_versions()
    with file_lock(directory / MANIFEST_LOCK):      # read-modify-write: concurrent entries are all kept
        manifest = read_json(path) if path.exists() else {}
        if manifest.get("stage") != stage or "entries" not in manifest:
            manifest = {"stage": stage, "entries": {}}
        manifest["libraries"] = libraries
        manifest["entries"][entry] = record
        write_json(path, manifest)
    return path


MANIFEST_LOCK = ".manifest.lock"


def manifest_params(directory: Path, entry: str) -> dict | None:
    """The parameters recorded for ``entry`` in ``<directory>/manifest.json`` (None: no record)."""
    path = Path(directory) / "manifest.json"
    if not path.exists():
        return None
    try:
        params = read_json(path)["entries"][entry]["params"]
    except (KeyError, TypeError, ValueError):
        return None
    return params if isinstance(params, dict) else None


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


# ---------------------------------------------------------------------------- reruns with other settings

OVERWRITE_ENV = "WOW_OVERWRITE"
_OVERWRITE: contextvars.ContextVar[bool | None] = contextvars.ContextVar("wowlib_overwrite", default=None)


class OverwriteError(RuntimeError):
    """A stage was about to overwrite an output made with other settings."""


def overwrite_allowed(overwrite: bool | None = None) -> bool:
    """``overwrite`` if given, else the ``overwrite=`` of the enclosing ``Run.writer``, else the
    environment variable ``WOW_OVERWRITE`` (1/true/yes)."""
    if overwrite is not None:
        return bool(overwrite)
    if _OVERWRITE.get() is not None:
        return bool(_OVERWRITE.get())
    return os.environ.get(OVERWRITE_ENV, "").strip().lower() in ("1", "true", "yes")


def _as_json(obj: Any) -> Any:
    return json.loads(json.dumps(obj, sort_keys=True, default=str))


def _show(value: Any, limit: int = 80) -> str:
    text = json.dumps(value, sort_keys=True, default=str)
    return text if len(text) <= limit else text[:limit - 3] + "..."


def changed_settings(recorded: dict, params: dict, ignore: Iterable[str] = ("hash",)) -> dict[str, tuple]:
    """The keys whose values differ between two parameter records, as ``{key: (old, new)}``.
    Keys in ``ignore`` (hashes of inputs, not settings) and keys that only one side has (a
    setting added to, or removed from, the code since the output was written) are not compared."""
    old, new, skip = _as_json(recorded), _as_json(params), set(ignore)
    return {k: (old[k], new[k]) for k in sorted(set(old) & set(new)) if k not in skip and old[k] != new[k]}


def refuse_overwrite(path: Path, recorded: dict | None, params: dict, ignore: Iterable[str] = ("hash",),
                     overwrite: bool | None = None) -> None:
    """Raise ``OverwriteError`` when ``path`` exists and ``recorded`` (the parameters its manifest
    holds) differ from ``params`` (those of the run about to overwrite it), unless overwriting is
    allowed (``overwrite_allowed``). The same parameters, a missing file or no record: nothing to say."""
    if recorded is None or not Path(path).exists():
        return
    changes = changed_settings(recorded, params, ignore)
    if not changes:
        return
    listed = "; ".join(f"{k}: {_show(old)} -> {_show(new)}" for k, (old, new) in changes.items())
    if overwrite_allowed(overwrite):
        log.warning("%s: overwriting an output made with other settings (%s)", path, listed)
        return
    raise OverwriteError(
        f"{path} was made with other settings ({listed}); this run would overwrite it. To replace it, pass "
        f"overwrite=True (or set the environment variable {OVERWRITE_ENV}=1); to keep it, use another run name.")


# ---------------------------------------------------------------------------- one writer per run

WRITER_LOCK = ".writer.lock"
HOST = socket.gethostname()


class RunLockedError(RuntimeError):
    """Another process is writing the run directory."""


@dataclass
class _Held:
    pid: int
    fd: int
    depth: int
    info: dict


_HELD: dict[str, _Held] = {}
_HELD_GUARD = threading.Lock()


def _read_holder(source: Path | int) -> dict | None:
    """The holder record of a writer lock file (a path or an open descriptor); None if empty or unreadable."""
    try:
        if isinstance(source, int):
            os.lseek(source, 0, os.SEEK_SET)
            chunks = []
            while chunk := os.read(source, 1 << 16):
                chunks.append(chunk)
            raw = b"".join(chunks)
        else:
            raw = Path(source).read_bytes()
        info = json.loads(raw.decode("utf-8")) if raw.strip() else None
    except (OSError, ValueError):
        return None
    return info if isinstance(info, dict) else None


def _holder_text(info: dict | None) -> str:
    if not info:
        return "a process that has not yet recorded itself"
    return (f"pid {info.get('pid')} on host {info.get('host')}, stage {info.get('stage')!r}, "
            f"started {info.get('started')}")


def _acquire_writer(root: Path, stage: str) -> tuple[int, dict]:
    """Take the run's writer lock without waiting: an exclusive ``flock`` on ``<root>/.writer.lock``,
    whose content records the holder. A lock file left by a dead process on this machine is taken
    over (with a warning); one that names another machine is refused (its holder cannot be checked)."""
    root.mkdir(parents=True, exist_ok=True)
    path = root / WRITER_LOCK
    for _ in range(20):
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            holder = _read_holder(path)
            raise RunLockedError(
                f"{root} is being written by another process: {_holder_text(holder)}. Two writers would mix "
                f"their outputs: wait for it to finish, or use another run name. If that process is no longer "
                f"running, delete {path}") from None
        try:
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if not same:                      # its holder removed it as we opened it: take the new one
            os.close(fd)
            continue
        previous = _read_holder(fd)
        if previous and previous.get("host") not in (None, HOST):
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)
            raise RunLockedError(
                f"{root} has a writer lock of another machine: {_holder_text(previous)}. Its process cannot be "
                f"checked from here; if it is no longer running, delete {path}")
        if previous:
            pid = previous.get("pid")
            state = "still exists but does not hold the lock" if isinstance(pid, int) and pid_alive(pid) \
                else "is no longer running"
            log.warning("%s: taking over a writer lock left by %s (that process %s)", root,
                        _holder_text(previous), state)
        info = {"pid": os.getpid(), "host": HOST, "stage": stage,
                "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        os.ftruncate(fd, 0)
        os.lseek(fd, 0, os.SEEK_SET)
        os.write(fd, (json.dumps(info, sort_keys=True) + "\n").encode())
        os.fsync(fd)
        return fd, info
    raise RunLockedError(f"{root}: could not take the writer lock {path} (it kept being replaced)")


def _release_writer(root: Path, fd: int) -> None:
    path = root / WRITER_LOCK
    try:
        if os.fstat(fd).st_ino == os.stat(path).st_ino:
            path.unlink()                 # before unlocking: nobody can lock a file we then delete
    except FileNotFoundError:
        pass
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


@contextmanager
def writer_lock(root: Path, stage: str) -> Iterator[dict]:
    """Hold the writer lock of run directory ``root`` (re-entrant within one process); yields the
    holder record (pid, host, stage, started). See ``Run.writer``."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    key = str((root / WRITER_LOCK).resolve())
    with _HELD_GUARD:
        held = _HELD.get(key)
        if held is not None and held.pid == os.getpid():
            held.depth += 1
        else:
            held = None
    if held is not None:
        try:
            yield held.info
        finally:
            with _HELD_GUARD:
                held.depth -= 1
        return
    fd, info = _acquire_writer(root, stage)
    held = _Held(os.getpid(), fd, 1, info)
    with _HELD_GUARD:
        _HELD[key] = held
    try:
        yield info
    finally:
        with _HELD_GUARD:
            held.depth -= 1
            last = held.depth == 0
            if last:
                _HELD.pop(key, None)
        if last:
            _release_writer(root, fd)


F = TypeVar("F", bound=Callable[..., Any])


def stage_writer(stage: str) -> Callable[[F], F]:
    """Decorate a stage's writing entry point ``fn(run, ...)``: the call holds the run's writer
    lock (``Run.writer``) and accepts ``overwrite=`` (default None: ``WOW_OVERWRITE``), which lets
    the stage overwrite outputs made with other settings (``refuse_overwrite``)."""
    def decorate(fn: F) -> F:
        @functools.wraps(fn)
        def wrapper(run, *args, overwrite: bool | None = None, **kwargs):
            target = run if isinstance(run, Run) else Run.named(run) if isinstance(run, (str, Path)) else None
            if target is None:                # not a run directory (a stand-in): nothing to lock
                return fn(run, *args, **kwargs)
            with target.writer(stage, overwrite=overwrite):
                return fn(run, *args, **kwargs)

        signature = inspect.signature(fn)
        params = list(signature.parameters.values())
        extra = inspect.Parameter("overwrite", inspect.Parameter.KEYWORD_ONLY, default=None, annotation="bool | None")
        at = next((i for i, p in enumerate(params) if p.kind is inspect.Parameter.VAR_KEYWORD), len(params))
        wrapper.__signature__ = signature.replace(parameters=params[:at] + [extra] + params[at:])
        return wrapper  # type: ignore[return-value]
    return decorate


# ---------------------------------------------------------------------------- layout

@dataclass(frozen=True)
class Run:
    """The layout of one run directory, ``runs/<name>/``."""

    root: Path

    @classmethod
    def named(cls, name: str | Path) -> Run:
        return cls(paths.run_dir(str(name)))

    @contextmanager
    def writer(self, stage: str, overwrite: bool | None = None) -> Iterator[dict]:
        """Write this run directory as its only writer: ``with run.writer("sample"): ...``.

        Takes the run's writer lock (``<run>/.writer.lock``, which records the holder's pid, host,
        stage and start time) or fails at once with ``RunLockedError`` naming the holder and the
        lock file; re-entrant within one process; a lock left by a dead process on this machine is
        taken over with a warning. ``overwrite``: whether the stage may overwrite outputs made with
        other settings (None: the environment variable ``WOW_OVERWRITE``)."""
        token = _OVERWRITE.set(overwrite) if overwrite is not None else None
        try:
            with writer_lock(self.root, stage) as info:
                yield info
        finally:
            if token is not None:
                _OVERWRITE.reset(token)

    def samples(self, generator: str, task: str) -> Path:
        return self.root / "samples" / model_folder(generator) / f"{task}.jsonl"

    def judgments(self, generator: str, judge: str, task: str, kind: str) -> Path:
        if kind not in ("pairwise", "score"):
            raise ValueError(f"judgment kind must be 'pairwise' or 'score', got {kind!r}")
        return self.root / "judgments" / model_folder(generator) / model_folder(judge) / f"{task}.{kind}.jsonl"

    @property
    def elicitation(self) -> Path:
        return self.root / "elicitation"

    def prefs(self, name: str) -> Path:
        return self.root / "prefs" / f"{name}.jsonl"

    def model(self, name: str) -> Path:
        return self.root / "models" / name

    def eval(self, model: str, task: str) -> Path:
        return self.root / "eval" / model_folder(model) / f"{task}.jsonl"

    @property
    def eval_dir(self) -> Path:
        return self.root / "eval"

    def llm_cache(self, model_key: str) -> Path:
        return self.root / "cache" / f"{model_key}.jsonl"

    @property
    def notebooks(self) -> Path:
        return self.root / "notebooks"


def model_folder(name: str) -> str:
    """A model's folder name: short names as they are; a hub id or a checkpoint path by
    ``wowlib.llm.models.model_label`` (no "/" inside a folder name)."""
    if "/" not in name and "\\" not in name:
        return name
    from .llm.models import model_label
    return model_label(name)
