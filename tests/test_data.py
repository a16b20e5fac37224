"""wowlib.data: the table of sources, ``fetch`` against a local HTTP server laid out as the sources
(<owner>/<repo>/<commit>/<path>, files copied from the real data directory), and ``check``."""
from __future__ import annotations

import hashlib
import http.server
import os
import re
import shlex
import subprocess
import sys
import threading
import urllib.parse
from pathlib import Path

import pytest

from wowlib import data, paths
from wowlib.evaluate import GENERALISATION
from wowlib.tasks import base as task_base
from wowlib.tasks import get_task, task_names

REPO = paths.REPO_ROOT
SMALL = ("scibench/quan.json", "scibench/chemmc.json")     # two of the smallest files (13-15 kB)


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# ---------------------------------------------------------------------------- a local mirror

class RangeHandler(http.server.BaseHTTPRequestHandler):
    """Serves files under ``server.root``, honours ``Range: bytes=a-[b]`` (206) unless
    ``server.honour_range`` is False, logs every request with its Range header, and can drop the
    connection after ``server.cut_after[0]`` bytes of the body (once per entry)."""

    def do_GET(self) -> None:
        server = self.server
        rng = self.headers.get("Range")
        server.requests.append({"path": self.path, "range": rng})
        rel = urllib.parse.unquote(urllib.parse.urlsplit(self.path).path).lstrip("/")
        file = (server.root / rel).resolve()
        if not file.is_file() or server.root not in file.parents:
            self.send_error(404)
            return
        body = file.read_bytes()
        total, status = len(body), 200
        if rng and server.honour_range:
            match = re.fullmatch(r"bytes=(\d+)-(\d*)", rng)
            start = int(match.group(1))
            end = int(match.group(2)) if match.group(2) else total - 1
            if start >= total:
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{total}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            body, status = body[start:end + 1], 206
            server.requests[-1]["status"] = 206
        self.send_response(status)
        if status == 206:
            self.send_header("Content-Range", f"bytes {start}-{start + len(body) - 1}/{total}")
        if server.honour_range:
            self.send_header("Accept-Ranges", "bytes")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if server.cut_after:
            self.wfile.write(body[:server.cut_after.pop(0)])
            self.wfile.flush()
            self.close_connection = True
            return
        self.wfile.write(body)

    def log_message(self, *args) -> None:
        pass


class Mirror:
    def __init__(self, root: Path, real: Path) -> None:
        self.root, self.real = root, real
        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), RangeHandler)
        self.server.root = root.resolve()
        self.server.requests = []
        self.server.honour_range = True
        self.server.cut_after = []
        self.base = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def requests(self) -> list[dict]:
        return self.server.requests

    def add(self, source: data.Source, content: bytes | None = None) -> Path:
        """Serve ``source`` at <owner>/<repo>/<commit>/<path>: the real file, or ``content``."""
        path = self.root / source.repo / source.commit / source.upstream
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content if content is not None else (self.real / source.path).read_bytes())
        return path

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def mirror(tmp_path, data_dir):
    m = Mirror(tmp_path / "mirror", data_dir)
    yield m
    m.close()


@pytest.fixture
def small() -> list[data.Source]:
    return [s for s in data.SOURCES if s.path in SMALL]


@pytest.fixture
def only_small(monkeypatch, small):
    """The table reduced to the small files (for the command line)."""
    monkeypatch.setattr(data, "SOURCES", tuple(small))
    monkeypatch.delenv(data.MIRROR_ENV, raising=False)
    return small


# ---------------------------------------------------------------------------- fetch

def test_a_full_fetch_into_an_empty_dir_gives_the_right_files(mirror, small, tmp_path) -> None:
    for s in small:
        mirror.add(s)
    dest = tmp_path / "data"
    results = data.fetch(small, dest, base=mirror.base, progress=False)
    assert [r.outcome for r in results] == ["downloaded"] * len(small), results
    for s in small:
        assert sha256(dest / s.path) == s.sha256
    assert not list(dest.rglob("*.part"))
    assert {r["path"] for r in mirror.requests} == {f"/{s.repo}/{s.commit}/{s.upstream}" for s in small}
    # a second fetch finds every file with its hash and asks the server for nothing
    n = len(mirror.requests)
    assert [r.outcome for r in data.fetch(small, dest, base=mirror.base, progress=False)] == ["skipped"] * len(small)
    assert len(mirror.requests) == n


def test_the_command_line_fetches_from_the_mirror_setting(mirror, only_small, tmp_path, monkeypatch, capsys) -> None:
    for s in only_small:
        mirror.add(s)
    dest = tmp_path / "data"
    assert data.main(["fetch", "--data-dir", str(dest), "--mirror", mirror.base, "--no-progress"]) == 0
    assert f"{len(only_small)} downloaded (0 resumed), 0 already present, 0 failed" in capsys.readouterr().out
    # WOW_DATA_MIRROR does the same as --mirror
    monkeypatch.setenv(data.MIRROR_ENV, mirror.base + "/")
    (dest / only_small[0].path).unlink()
    assert data.main(["fetch", "--data-dir", str(dest), "--tasks", "scibench", "--no-progress"]) == 0
    assert f"1 downloaded (0 resumed), {len(only_small) - 1} already present, 0 failed" in capsys.readouterr().out
    assert all(sha256(dest / s.path) == s.sha256 for s in only_small)


def test_a_mismatching_checksum_fails_and_leaves_no_file(mirror, small, tmp_path) -> None:
    s = small[0]
    good = (mirror.real / s.path).read_bytes()
    bad = good[:-2] + b"XX"                                   # same size, other bytes
    mirror.add(s, bad)
    dest = tmp_path / "data"
    with pytest.raises(data.ChecksumError) as err:
        data.fetch_file(s, dest, base=mirror.base, progress=False)
    message = str(err.value)
    assert s.path in message and s.sha256 in message and hashlib.sha256(bad).hexdigest() in message
    assert not (dest / s.path).exists()
    assert not list(dest.rglob("*.part"))


def test_a_mismatching_checksum_fails_the_command_with_a_summary(mirror, only_small, tmp_path, capsys) -> None:
    bad, good = only_small
    mirror.add(bad, b"not the file")
    mirror.add(good)
    dest = tmp_path / "data"
    assert data.main(["fetch", "--data-dir", str(dest), "--mirror", mirror.base, "--no-progress"]) == 1
    out, err = capsys.readouterr()
    assert "1 downloaded (0 resumed), 0 already present, 1 failed" in out
    assert f"FAILED {bad.path}" in err and bad.sha256 in err and hashlib.sha256(b"not the file").hexdigest() in err
    assert not (dest / bad.path).exists() and sha256(dest / good.path) == good.sha256


def test_a_file_missing_on_the_server_is_reported_by_url(mirror, only_small, tmp_path, capsys) -> None:
    s = only_small[0]
    dest = tmp_path / "data"
    with pytest.raises(data.FetchError, match="404") as err:
        data.fetch_file(s, dest, base=mirror.base, progress=False)
    url = f"{mirror.base}/{s.repo}/{s.commit}/{s.upstream}"
    assert url in str(err.value)
    assert not (dest / s.path).exists() and not list(dest.rglob("*.part"))
    assert data.main(["fetch", "--data-dir", str(dest), "--mirror", mirror.base, "--no-progress"]) == 1
    assert url in capsys.readouterr().err


def test_a_part_file_is_resumed_with_a_range_request(mirror, small, tmp_path) -> None:
    s = small[0]
    mirror.add(s)
    whole = (mirror.real / s.path).read_bytes()
    half = len(whole) // 2
    dest = tmp_path / "data"
    part = dest / (s.path + ".part")
    part.parent.mkdir(parents=True)
    part.write_bytes(whole[:half])
    assert data.fetch_file(s, dest, base=mirror.base, progress=False) == "resumed"
    assert mirror.requests == [{"path": f"/{s.repo}/{s.commit}/{s.upstream}", "range": f"bytes={half}-", "status": 206}]
    assert sha256(dest / s.path) == s.sha256 and not part.exists()


def test_an_interrupted_download_resumes_where_it_stopped(mirror, small, tmp_path) -> None:
    s = small[0]
    mirror.add(s)
    half = s.size // 2
    mirror.server.cut_after = [half]                        # the first response stops halfway
    dest = tmp_path / "data"
    part = dest / (s.path + ".part")
    with pytest.raises(data.FetchError, match="run fetch again to resume"):
        data.fetch_file(s, dest, base=mirror.base, progress=False)
    assert part.stat().st_size == half and not (dest / s.path).exists()
    assert data.fetch_file(s, dest, base=mirror.base, progress=False) == "resumed"
    assert [r["range"] for r in mirror.requests] == [None, f"bytes={half}-"]
    assert sha256(dest / s.path) == s.sha256 and not part.exists()


def test_a_server_that_ignores_range_gets_a_full_download(mirror, small, tmp_path) -> None:
    s = small[0]
    mirror.add(s)
    mirror.server.honour_range = False
    whole = (mirror.real / s.path).read_bytes()
    dest = tmp_path / "data"
    part = dest / (s.path + ".part")
    part.parent.mkdir(parents=True)
    part.write_bytes(whole[:100])
    assert data.fetch_file(s, dest, base=mirror.base, progress=False) == "downloaded"
    assert mirror.requests[0]["range"] == "bytes=100-" and "status" not in mirror.requests[0]
    assert sha256(dest / s.path) == s.sha256 and not part.exists()


def test_a_part_that_is_no_prefix_fails_the_check_then_downloads_again(mirror, small, tmp_path) -> None:
    s = small[0]
    mirror.add(s)
    dest = tmp_path / "data"
    part = dest / (s.path + ".part")
    part.parent.mkdir(parents=True)
    part.write_bytes(b"x" * 100)
    with pytest.raises(data.ChecksumError, match=s.sha256):
        data.fetch_file(s, dest, base=mirror.base, progress=False)
    assert not part.exists() and not (dest / s.path).exists()
    assert data.fetch_file(s, dest, base=mirror.base, progress=False) == "downloaded"
    assert sha256(dest / s.path) == s.sha256


def test_a_corrupt_file_in_place_is_downloaded_again(mirror, small, tmp_path) -> None:
    s = small[0]
    mirror.add(s)
    dest = tmp_path / "data"
    (dest / s.path).parent.mkdir(parents=True)
    (dest / s.path).write_bytes(b"stale")
    assert data.fetch_file(s, dest, base=mirror.base, progress=False) == "downloaded"
    assert sha256(dest / s.path) == s.sha256


# ---------------------------------------------------------------------------- check

def needs(profile: str) -> set[str]:
    """The default files of the profile's tasks and generalisation targets (its settings, defaults included)."""
    from wowlib import config
    values = config.resolved(config.load_profile(REPO / "configs" / f"{profile}.yaml"))
    tasks = set(values["tasks"])
    if values.get("generalisation") is True:
        tasks |= {t for task in values["tasks"] for t in GENERALISATION.get(task, ())}
    return {s.path for s in data.SOURCES if set(s.tasks) & tasks and not s.optional}


@pytest.mark.parametrize("profile", ["smoke", "cpu", "paper"])
def test_check_on_an_empty_dir_fails_and_lists_every_needed_file(profile, tmp_path, capsys) -> None:
    assert data.main(["check", profile, "--data-dir", str(tmp_path)]) == 1
    out = capsys.readouterr().out
    files = needs(profile)
    assert files
    for rel in files:
        assert f"missing: {tmp_path / rel}" in out
    assert f"{len(files)} of {len(files)} needed files are missing or corrupt" in out
    assert re.search(r"python -m wowlib\.data fetch --tasks .+ --data-dir ", out)


def test_the_printed_fetch_command_fetches_what_check_missed(mirror, tmp_path, capsys, monkeypatch) -> None:
    empty = tmp_path / "data"
    assert data.main(["check", "cpu", "--data-dir", str(empty)]) == 1
    command = capsys.readouterr().out.strip().splitlines()[-1]
    argv = shlex.split(command)
    assert argv[1:4] == ["-m", "wowlib.data", "fetch"]
    for s in data.SOURCES:
        if s.path in needs("cpu"):
            mirror.add(s)
    monkeypatch.setenv(data.MIRROR_ENV, mirror.base)
    assert data.main([*argv[3:], "--no-progress"]) == 0
    assert data.main(["check", "cpu", "--data-dir", str(empty)]) == 0
    n = len(needs("cpu"))
    assert f"all {n} needed file{'s' if n > 1 else ''} present" in capsys.readouterr().out


@pytest.mark.slow
@pytest.mark.parametrize("profile", ["smoke", "configs/cpu.yaml"])
def test_check_passes_with_the_real_data(profile, data_dir) -> None:
    result = subprocess.run([sys.executable, "-m", "wowlib.data", "check", profile], cwd=REPO, capture_output=True,
                            text=True, timeout=120, check=False, env={**os.environ, "WOW_DATA_DIR": str(data_dir)})
    assert result.returncode == 0, result.stdout + result.stderr
    assert "needed file" in result.stdout and " present" in result.stdout
    assert all(f"present  {rel}" in result.stdout for rel in needs(Path(profile).stem))


def test_check_names_a_corrupt_file(data_dir, tmp_path, capsys) -> None:
    rel = "nlgraph/shortest_path/main.json"
    (tmp_path / rel).parent.mkdir(parents=True)
    (tmp_path / rel).write_bytes((data_dir / rel).read_bytes()[:-1] + b"?")
    assert data.main(["check", "cpu", "--data-dir", str(tmp_path)]) == 1
    out = capsys.readouterr().out
    assert f"corrupt: {tmp_path / rel}" in out and "expected" in out


def test_check_reads_a_profile_path_and_its_generalisation_targets(tmp_path, capsys) -> None:
    profile = tmp_path / "mine.yaml"
    profile.write_text("run: mine\ntasks: [kc, com2]\ngeneralisation: true\n")
    assert data.main(["check", str(profile), "--data-dir", str(tmp_path)]) == 1
    out = capsys.readouterr().out
    for rel in ("knowledge_crosswords/MC_medi.jsonl", "mmlu_pro/test-00000-of-00001.parquet", "com2/com2.csv"):
        assert f"missing: {tmp_path / rel}" in out
    assert "knowledge_crosswords/MC_easy.jsonl" not in out            # optional: not needed by default
    assert "--tasks kc mmlu_pro " in out and "com2: not fetchable" in out
    profile.write_text("tasks: [no_such_task]\n")
    assert data.main(["check", str(profile), "--data-dir", str(tmp_path)]) == 2


@pytest.mark.slow
def test_run_all_stops_when_data_is_missing(tmp_path) -> None:
    env = {**os.environ, "WOW_DATA_DIR": str(tmp_path / "no-data"), "WOW_RUNS_DIR": str(tmp_path / "runs")}
    result = subprocess.run(["./run_all.sh", "cpu"], cwd=REPO, capture_output=True, text=True, timeout=600,
                            check=False, env=env)
    assert result.returncode != 0
    assert "missing: " in result.stdout and "nlgraph/shortest_path/main.json" in result.stdout
    assert "fetch them with:" in result.stdout and "data missing or corrupt" in result.stderr
    assert "[1/5]" not in result.stdout and not (tmp_path / "runs").exists()


# ---------------------------------------------------------------------------- the table

def test_every_row_is_pinned_and_well_formed() -> None:
    assert len({s.path for s in data.SOURCES}) == len(data.SOURCES)
    for s in data.SOURCES:
        assert re.fullmatch(r"[0-9a-f]{40}|[0-9a-f]{7}", s.commit), s
        assert re.fullmatch(r"[0-9a-f]{64}", s.sha256) and s.size > 0, s
        assert s.url() == f"https://raw.githubusercontent.com/{s.repo}/{s.commit}/{s.upstream}"
        assert s.licence and s.items and all(t in task_names() for t in s.tasks)


def test_every_row_matches_the_real_file(data_dir) -> None:
    for s in data.SOURCES:
        assert data.file_status(s, data_dir) == ("present", ""), s.path


def test_the_table_covers_every_file_each_task_reads(data_dir, tmp_path, monkeypatch) -> None:
    """Each task loads from a data directory holding only its own rows of the table, and every
    path it passes to Task.path is one of them; every row is read by some task."""
    requested: list[str] = []
    original = task_base.Task.path

    def spy(self, relative: str) -> Path:
        requested.append(relative)
        return original(self, relative)

    monkeypatch.setattr(task_base.Task, "path", spy)
    read: set[str] = set()
    for name in task_names():
        if name in data.MANUAL:                              # not fetchable: it only names its file
            requested.clear()
            with pytest.raises(FileNotFoundError):
                get_task(name, data_dir=tmp_path / "empty").load()
            assert set(requested) == {data.MANUAL[name][0]}
            continue
        variants = [{}] + ([{"variant": "MC_easy"}] if name == "kc" else [])
        for options in variants:
            rows = [s for s in data.sources_for([name], optional=bool(options))]
            own = tmp_path / f"{name}-{len(options)}"
            for s in rows:
                (own / s.path).parent.mkdir(parents=True, exist_ok=True)
                (own / s.path).symlink_to(data_dir / s.path)
            requested.clear()
            assert get_task(name, data_dir=own, **options).load(), name
            assert requested and set(requested) <= {s.path for s in rows}, (name, requested)
            read |= set(requested)
    assert read == {s.path for s in data.SOURCES}


def test_the_docs_hold_the_table() -> None:
    assert data.markdown_table() in (REPO / "docs" / "data.md").read_text()


@pytest.mark.slow
def test_a_fresh_checkout_fetches_its_data_and_runs_the_smoke_profile(mirror, tmp_path) -> None:
    """What a new user does: a checkout of the working tree (tracked and untracked files, no run,
    no data), the data the smoke profile needs fetched from the (local) mirror with the command
    ``check`` prints, then ``./run_all.sh smoke``: every stage runs and the figures are written."""
    clone = tmp_path / "clone"
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=REPO, check=True,
                           capture_output=True).stdout.decode().split("\0")
    for name in filter(None, files):
        if (REPO / name).is_file():
            (clone / name).parent.mkdir(parents=True, exist_ok=True)
            (clone / name).write_bytes((REPO / name).read_bytes())
            (clone / name).chmod((REPO / name).stat().st_mode)
    (clone / ".venv").symlink_to(REPO / ".venv")        # the environment, not the repository, is reused
    for s in data.SOURCES:
        if s.path in needs("smoke"):
            mirror.add(s)
    env = {**os.environ, "WOW_DATA_DIR": str(tmp_path / "data"), "WOW_RUNS_DIR": str(tmp_path / "runs"),
           data.MIRROR_ENV: mirror.base, "PYTHONPATH": str(clone)}
    check = subprocess.run([sys.executable, "-m", "wowlib.data", "check", "smoke"], cwd=clone, env=env,
                           capture_output=True, text=True, timeout=120)
    assert check.returncode == 1
    fetch = shlex.split(check.stdout.strip().splitlines()[-1])
    assert subprocess.run([*fetch, "--no-progress"], cwd=clone, env=env, timeout=300).returncode == 0
    result = subprocess.run(["./run_all.sh", "smoke"], cwd=clone, env=env, capture_output=True, text=True,
                            timeout=1800)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "[5/5] 05_figures done in" in result.stdout
    assert (tmp_path / "runs" / "smoke" / "figures" / "index.md").is_file()
