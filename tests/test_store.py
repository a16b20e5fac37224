"""The run directory under concurrency (wowlib.store): one writer per run, manifests and appends
that lose nothing when several processes write at once, stale locks and temporary leftovers of
killed processes, the refusal to overwrite outputs made with other settings, and machine paths.

Every concurrency test uses real processes (``subprocess``), as the failures it guards against
were seen: two samplers in one run, manifest entries lost in a read-modify-write race, a tail
repair that cut another process's append in flight.
"""
from __future__ import annotations

import inspect
import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from wowlib import store

HOLD = """
import sys
from pathlib import Path
from wowlib import store
with store.Run(Path(sys.argv[1])).writer(sys.argv[2]):
    print("holding", flush=True)
    sys.stdin.readline()
"""


def _python(script: str, *args: str, **kwargs) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", script, *map(str, args)], text=True, **kwargs)


def _holder(root: Path, stage: str) -> subprocess.Popen:
    """A process that holds ``root``'s writer lock until its stdin gets a line (or it is killed)."""
    proc = _python(HOLD, root, stage, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    assert proc.stdout.readline().strip() == "holding"
    return proc


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    assert not store.pid_alive(proc.pid)
    return proc.pid


# ---------------------------------------------------------------------------- one writer per run

@pytest.mark.slow
def test_a_second_writer_fails_at_once_naming_the_holder(tmp_path):
    run = store.Run(tmp_path / "run")
    holder = _holder(run.root, "sample")
    try:
        start = time.perf_counter()
        with pytest.raises(store.RunLockedError) as err:
            with run.writer("judge"):
                pass
        assert time.perf_counter() - start < 2, "the second writer must fail at once, not wait"
        message = str(err.value)
        info = json.loads((run.root / store.WRITER_LOCK).read_text())
        assert f"pid {holder.pid}" in message and f"on host {store.HOST}" in message
        assert "stage 'sample'" in message and f"started {info['started']}" in message
        assert str(run.root / store.WRITER_LOCK) in message        # what to delete if the holder is dead
        assert info["pid"] == holder.pid and info["stage"] == "sample"
    finally:
        holder.stdin.write("\n")
        holder.stdin.close()
        assert holder.wait(timeout=30) == 0
    assert not (run.root / store.WRITER_LOCK).exists(), "a released lock leaves no lock file"
    with run.writer("judge") as info:                                # free again
        assert info["pid"] == os.getpid()


def test_the_writer_lock_is_reentrant_within_a_process(tmp_path):
    run = store.Run(tmp_path / "run")
    with run.writer("align") as outer:
        with run.writer("align") as inner:                         # e.g. run_evaluation -> answer_split
            assert inner == outer
        assert (run.root / store.WRITER_LOCK).exists()              # still held by the outer writer
        assert json.loads((run.root / store.WRITER_LOCK).read_text())["stage"] == "align"
    assert not (run.root / store.WRITER_LOCK).exists()


@pytest.mark.slow
def test_a_lock_left_by_a_killed_writer_is_taken_over(tmp_path, caplog):
    run = store.Run(tmp_path / "run")
    holder = _holder(run.root, "sample")
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    assert (run.root / store.WRITER_LOCK).exists()                  # kill -9: nothing was cleaned up
    with caplog.at_level(logging.WARNING, logger="wowlib.store"):
        with run.writer("sample") as info:
            assert info["pid"] == os.getpid()
    assert f"pid {holder.pid}" in caplog.text and "no longer running" in caplog.text


def test_a_stale_lock_file_of_a_dead_pid_is_taken_over(tmp_path, caplog):
    run = store.Run(tmp_path / "run")
    run.root.mkdir(parents=True)
    dead = _dead_pid()
    (run.root / store.WRITER_LOCK).write_text(json.dumps(
        {"pid": dead, "host": store.HOST, "stage": "judge", "started": "2026-01-01T00:00:00+0000"}))
    with caplog.at_level(logging.WARNING, logger="wowlib.store"):
        with run.writer("evaluate"):
            pass
    assert f"pid {dead}" in caplog.text and "taking over" in caplog.text
    assert not (run.root / store.WRITER_LOCK).exists()


def test_a_lock_file_of_another_machine_is_refused(tmp_path):
    """Its holder cannot be checked from here: refused, naming the file to delete if it is dead."""
    run = store.Run(tmp_path / "run")
    run.root.mkdir(parents=True)
    lock = run.root / store.WRITER_LOCK
    lock.write_text(json.dumps({"pid": 4242, "host": "elsewhere", "stage": "align", "started": "2026-01-01"}))
    with pytest.raises(store.RunLockedError, match=r"pid 4242 on host elsewhere.*delete .*\.writer\.lock"):
        with run.writer("align"):
            pass
    assert lock.exists()


@pytest.mark.slow
def test_stage_writer_holds_the_lock_and_takes_overwrite(tmp_path):
    seen = {}

    @store.stage_writer("toy")
    def stage(run, x, *, y=1):
        seen["lock"] = json.loads((run.root / store.WRITER_LOCK).read_text())
        seen["overwrite"] = store.overwrite_allowed()
        return x + y

    run = store.Run(tmp_path / "run")
    assert "overwrite" in inspect.signature(stage).parameters
    assert stage(run, 1, y=2) == 3
    assert seen["lock"]["stage"] == "toy" and seen["lock"]["pid"] == os.getpid() and seen["overwrite"] is False
    assert stage(run, 1, overwrite=True) == 2 and seen["overwrite"] is True
    assert not (run.root / store.WRITER_LOCK).exists()
    holder = _holder(run.root, "other")
    try:
        with pytest.raises(store.RunLockedError, match=f"pid {holder.pid}"):
            stage(run, 1)
    finally:
        holder.stdin.write("\n")
        holder.stdin.close()
        holder.wait(timeout=30)


# ---------------------------------------------------------------------------- manifests and appends

MANIFEST = """
import sys
from pathlib import Path
from wowlib import store
directory, who, n = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3])
for k in range(n):
    store.write_manifest(directory, "sample", {"who": who, "k": k}, entry=f"{who}-{k}")
"""


@pytest.mark.slow
def test_concurrent_manifest_entries_are_all_kept(tmp_path):
    """4 processes each add 40 entries to one manifest at the same time: none is lost (without
    the lock about half were, each process overwriting the others' read-modify-write)."""
    procs = [_python(MANIFEST, tmp_path, f"p{i}", 40) for i in range(4)]
    assert [p.wait(timeout=120) for p in procs] == [0] * 4
    entries = store.read_json(tmp_path / "manifest.json")["entries"]
    assert sorted(entries) == sorted(f"p{i}-{k}" for i in range(4) for k in range(40))
    assert all(entries[f"p{i}-{k}"]["params"] == {"who": f"p{i}", "k": k} for i in range(4) for k in range(40))


APPEND = """
import sys
from pathlib import Path
from wowlib import store
path, who, n = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3])
for k in range(n):
    store.append_jsonl(path, [{"who": who, "k": k, "j": j, "pad": "x" * (3000 * (k % 4))} for j in range(1 + k % 3)])
"""


@pytest.mark.slow
def test_concurrent_appends_and_a_truncated_tail_lose_no_record(tmp_path, caplog):
    """A file whose last line a kill cut, then 4 processes appending at once (records up to
    ~9 kB, so writes are large): every appended record is there exactly once, the cut line is
    dropped, and no line is corrupt."""
    path = tmp_path / "cache.jsonl"
    store.append_jsonl(path, [{"who": "before", "k": k, "j": 0} for k in range(3)])
    with open(path, "a") as f:
        f.write('{"who": "killed", "k": 0, "j": 0, "pad": "xxxx')              # no newline: a kill
    n = 120
    procs = [_python(APPEND, path, f"p{i}", n) for i in range(4)]
    assert [p.wait(timeout=300) for p in procs] == [0] * 4
    records = store.read_jsonl(path)                                     # raises on a corrupt line
    got = sorted((r["who"], r["k"], r["j"]) for r in records)
    expected = sorted([("before", k, 0) for k in range(3)]
                      + [(f"p{i}", k, j) for i in range(4) for k in range(n) for j in range(1 + k % 3)])
    assert got == expected
    assert path.read_bytes().endswith(b"\n")


HALF_APPEND = """
import fcntl, sys, time
path = sys.argv[1]
with open(path, "a") as f:
    fcntl.flock(f.fileno(), fcntl.LOCK_EX)          # the lock append_jsonl takes
    f.write('{"who": "slow", "part": ')
    f.flush()
    print("half", flush=True)
    time.sleep(1.0)
    f.write('1}\\n')
    f.flush()
    fcntl.flock(f.fileno(), fcntl.LOCK_UN)
"""


@pytest.mark.slow
def test_a_tail_repair_never_cuts_an_append_in_flight(tmp_path):
    """While another process is half-way through an append (its line not yet ended), an append
    here waits for it instead of taking the partial line for the trace of a kill and cutting it."""
    path = tmp_path / "cache.jsonl"
    store.append_jsonl(path, [{"who": "first"}])
    slow = _python(HALF_APPEND, path, stdout=subprocess.PIPE)
    assert slow.stdout.readline().strip() == "half"
    assert not path.read_bytes().endswith(b"\n")                        # looks exactly like a kill
    store.append_jsonl(path, [{"who": "mine"}])
    assert slow.wait(timeout=30) == 0
    assert store.read_jsonl(path) == [{"who": "first"}, {"who": "slow", "part": 1}, {"who": "mine"}]


def test_an_append_heals_a_killed_writers_tail(tmp_path, caplog):
    path = tmp_path / "x.jsonl"
    path.write_text('{"a": 1}\n{"a": ')
    with caplog.at_level(logging.WARNING, logger="wowlib.store"):
        store.append_jsonl(path, [{"a": 2}])
    assert store.read_jsonl(path) == [{"a": 1}, {"a": 2}] and "truncated last line" in caplog.text


# ---------------------------------------------------------------------------- leftovers of killed writers

def test_leftovers_of_dead_processes_are_removed_and_live_ones_kept(tmp_path):
    dead = _dead_pid()
    models = tmp_path / "models"
    (models / f".adapter.tmp{dead}" / "_trainer").mkdir(parents=True)       # a killed training run
    (models / f".adapter.tmp{os.getpid()}").mkdir()                         # a live one (this process)
    (models / f".summary.csv.tmp{dead}").write_text("half")
    (models / "adapter").mkdir()
    removed = store.remove_stale_tmp(models)
    assert sorted(p.name for p in removed) == sorted([f".adapter.tmp{dead}", f".summary.csv.tmp{dead}"])
    assert sorted(p.name for p in models.iterdir()) == sorted(["adapter", f".adapter.tmp{os.getpid()}"])


def test_an_atomic_write_clears_its_targets_leftovers(tmp_path):
    dead = _dead_pid()
    (tmp_path / f".metrics.csv.tmp{dead}").write_text("half")
    (tmp_path / f".other.json.tmp{dead}").write_text("half")                # another target: left alone
    store.write_json(tmp_path / "metrics.csv", {"a": 1})
    assert sorted(p.name for p in tmp_path.iterdir()) == [f".other.json.tmp{dead}", "metrics.csv"]


# ---------------------------------------------------------------------------- reruns with other settings

def test_an_overwrite_with_other_settings_is_refused_naming_file_and_keys(tmp_path, monkeypatch):
    monkeypatch.delenv(store.OVERWRITE_ENV, raising=False)
    out = tmp_path / "samples" / "kc.jsonl"
    out.parent.mkdir(parents=True)
    out.write_text("{}\n")
    old = {"n_samples": 5, "seed": 0, "tasks": ["kc"], "hash": "a", "removed_since": 1}
    new = {"n_samples": 10, "seed": 0, "tasks": ("kc",), "hash": "b", "added_since": 2}
    with pytest.raises(store.OverwriteError) as err:
        store.refuse_overwrite(out, old, new)
    message = str(err.value)
    assert str(out) in message and "n_samples: 5 -> 10" in message
    assert "overwrite=True" in message and "WOW_OVERWRITE=1" in message
    for quiet in ("seed", "tasks", "hash", "removed_since", "added_since"):
        assert quiet not in message              # equal, an input hash, or only on one side
    store.refuse_overwrite(out, old, {**old, "hash": "c"})          # the same settings: fine
    store.refuse_overwrite(tmp_path / "absent.jsonl", old, new)     # nothing to overwrite
    store.refuse_overwrite(out, None, new)                          # nothing recorded
    store.refuse_overwrite(out, old, new, overwrite=True)
    with store.Run(tmp_path).writer("sample", overwrite=True):
        store.refuse_overwrite(out, old, new)
    monkeypatch.setenv(store.OVERWRITE_ENV, "1")
    store.refuse_overwrite(out, old, new)
    with pytest.raises(store.OverwriteError):
        store.refuse_overwrite(out, old, new, overwrite=False)      # the argument wins over the environment


def test_manifest_params_reads_one_entry(tmp_path):
    assert store.manifest_params(tmp_path, "kc") is None
    store.write_manifest(tmp_path, "sample", {"n": 1}, entry="kc")
    assert store.manifest_params(tmp_path, "kc") == {"n": 1}
    assert store.manifest_params(tmp_path, "other") is None


# ---------------------------------------------------------------------------- machine paths

@pytest.mark.parametrize("text", [
    '"base_model": "/root/.cache/wowlib/models/smollm2-135m-b179c9523d0e6a0f"',
    "adapter=/home/alice/runs/cpu/models/x", "/tmp/pytest-of-bob/run", "/Users/carol/wow",
    "C:\\\\Users\\\\dave\\\\runs", "file:///home/erin/x"])
def test_machine_paths_are_found(text):
    assert store.absolute_paths(f"line one\n{text}\n")[0][0] == 2


@pytest.mark.parametrize("text", ["models/self-oracle-kc--dpo", "https://example.org/home/page", "1/2/3",
                                  "the /tmpfs option", "smollm2-135m"])
def test_portable_text_is_not_flagged(text):
    assert store.absolute_paths(text) == []


def test_local_roots_are_flagged(tmp_path):
    root = tmp_path / "somewhere" / "deep"
    assert store.absolute_paths(f"x {root}/file y", [root]) == [(1, f"{root}/file")]


def test_a_kill_inside_a_multibyte_character_is_a_truncated_tail(tmp_path, caplog):
    """A killed writer can stop between the bytes of one UTF-8 character: the reader skips that
    tail as it skips any other, and a bad byte on a complete line is still an error naming it."""
    path = tmp_path / "cache.jsonl"
    full = json.dumps({"text": "naïve ✓"}, ensure_ascii=False).encode()
    path.write_bytes(b'{"a": 1}\n' + full[:-4])
    with caplog.at_level(logging.WARNING, logger="wowlib.store"):
        assert store.read_jsonl(path) == [{"a": 1}]
    assert "truncated last line" in caplog.text
    path.write_bytes(b'{"a": 1}\n' + full[:-4] + b"\n")
    with pytest.raises(ValueError, match=r"cache.jsonl: line 2: corrupt JSON \(not UTF-8\)"):
        store.read_jsonl(path)
