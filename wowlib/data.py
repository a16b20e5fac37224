"""The datasets' files: one table of sources, a fetcher and a checker.

    python -m wowlib.data fetch [--tasks kc chess ...] [--data-dir DIR] [--mirror URL]
    python -m wowlib.data check <profile>      # a name in configs/ (smoke, cpu, paper) or a YAML path
    python -m wowlib.data table                # the table below as Markdown (docs/data.md)

``SOURCES`` has one row for every file a task loader reads (every ``Task.path(...)``): where it
goes under the data directory, the upstream file pinned to a commit, its sha256 and size, the
licence. ``fetch`` streams each file into ``<dest>.part`` (an interrupted download is resumed with
an HTTP Range request), checks the sha256 and only then renames it to its final name; a file
already present with the right hash is skipped. ``check`` lists the files a profile needs (its
``tasks`` and, with ``generalisation: true``, the generalisation targets) as present, missing or
corrupt, and prints the fetch command for whatever is not there.

Every URL is ``https://raw.githubusercontent.com/<owner>/<repo>/<commit>/<path>``. ``--mirror`` or
the environment variable ``WOW_DATA_MIRROR`` replaces the ``https://raw.githubusercontent.com``
part, so a mirror (or a test server) only has to serve the same ``<owner>/<repo>/<commit>/<path>``
layout.

Not fetchable, so not in the table: COM2 (only on a dataset hub; put ``com2/com2.csv`` in place by
hand), the Vera model, FActScore's Wikipedia database, the full lichess puzzle database (several
GB; the chess task reads a 1,499-row excerpt), MedMCQA's train split and OpenAI embeddings.
"""
from __future__ import annotations

import argparse
import hashlib
import logging
import os
import re
import shlex
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from . import config, paths

log = logging.getLogger(__name__)

RAW_BASE = "https://raw.githubusercontent.com"
MIRROR_ENV = "WOW_DATA_MIRROR"


@dataclass(frozen=True)
class Source:
    """One file of the data directory and where it comes from."""

    path: str                   # relative to the data directory (what the loader passes to Task.path)
    tasks: tuple[str, ...]      # the registered tasks that read it
    repo: str                   # upstream GitHub repository, owner/name
    commit: str                 # the pinned commit (40 hex digits unless a comment says otherwise)
    upstream: str               # the file's path inside that repository
    sha256: str
    size: int                   # bytes
    licence: str
    items: str                  # what the file holds (for the docs)
    optional: bool = False      # read only when a task option asks for it (not needed by a profile)

    def url(self, base: str | None = None) -> str:
        return f"{(base or RAW_BASE).rstrip('/')}/{self.repo}/{self.commit}/{self.upstream}"

    @property
    def repo_url(self) -> str:
        return f"https://github.com/{self.repo}"

    @property
    def file_url(self) -> str:
        return f"https://github.com/{self.repo}/blob/{self.commit}/{self.upstream}"


# Upstream repositories and pinned commits. Each sha256 is that of the file the loaders and tests
# were developed against; a full commit id below was either the one that file was taken from or
# one whose copy of the file has the same length and ending (the hash check settles the rest).
KC = ("Wenwen-D/KnowledgeCrosswords", "be2f751299cdb077c49fb1d7c2389212fc751e4f")
NLGRAPH = ("Arthur-Heng/NLGraph", "5ba0e9343de160501530e82c4b4ed5ce0d999c03")
# nlgraph/matching/main.json was taken at a369f32, whose full id could not be looked up; the copy
# at 5ba0e93 is a different version of that file (1,072,177 characters against 1,069,344), so the
# short id is kept (raw.githubusercontent.com accepts an unambiguous abbreviated commit id; not
# tried from the development machines, which have no internet).
NLGRAPH_MATCHING = ("Arthur-Heng/NLGraph", "a369f32")
# MMLU-Pro is the TIGER-Lab/MMLU-Pro test split (data/test-00000-of-00001.parquet, MIT), but the
# exact file pinned here is the copy kept in the FuseAI repository, at 7d9a307 (full id not found;
# short id kept): its hash is the one the code was tested on.
MMLU_PRO = ("18907305772/FuseAI", "7d9a307")
HELLASWAG = ("BunsenFeng/AbstainQA", "1cb616f8dfc0ba62564f7e1a72104d6a35107080")   # taken at 283c10b
# A 1,499-row excerpt of the lichess puzzle database (CC0) kept in a GitHub repository; the full
# database (several GB, database.lichess.org/#puzzles) is not fetched.
CHESS = ("Darlinx25/Chess-Practice", "6a129710ded57cabdf39c30f7008f6da71750bc1")   # taken at f7c962e
# Also known as gzxiong/MIRAGE.
MEDMCQA = ("Teddy-XiongGZ/MIRAGE", "392943af99cd94cafd50a0de2e7fca24bbf65494")
# SciBench's dataset/original/*.json at e14e0ca (full id not found; short id kept): later and
# earlier commits hold other versions of these files.
SCIBENCH = ("mandyyyyii/scibench", "e14e0ca")
BIOGENERATION = ("HillZhang1999/ICD", "20ee87accc12012dd06e7962623f0dbb0785af69")  # taken at d96efb3


def _scibench(book: str, sha256: str, size: int, n: int) -> Source:
    return Source(f"scibench/{book}.json", ("scibench",), *SCIBENCH, f"dataset/original/{book}.json",
                  sha256, size, "MIT", f"{n} problems")


SOURCES: tuple[Source, ...] = (
    Source("knowledge_crosswords/MC_medi.jsonl", ("kc",), *KC, "KnowledgeCrosswords_dataset/MC/MC_medi.jsonl",
           "c35f8c06b401cb3e167370892b3441e020c852ce8a9dbc8584280f7f2ecc66ad", 1957123,
           "none stated (derived from YAGO)", "873 (441 with 3 blanks)"),
    Source("knowledge_crosswords/MC_easy.jsonl", ("kc",), *KC, "KnowledgeCrosswords_dataset/MC/MC_easy.jsonl",
           "681f2e223fe4830153f1872e888cdbdcfe88ae5e956b2dff7da5f7cbe28cd807", 1945789,
           "none stated (derived from YAGO)", "869 (439 with 3 blanks); read with variant='MC_easy'",
           optional=True),
    Source("nlgraph/shortest_path/main.json", ("nlgraph_shortest_path",), *NLGRAPH, "NLGraph/shortest_path/main.json",
           "8fd7ebb313dee1416c38348a83d9ebc876cdb3ca87b9c5bda09d23412b5587bc", 524399, "MIT", "380"),
    Source("nlgraph/flow/main.json", ("nlgraph_flow",), *NLGRAPH, "NLGraph/flow/main.json",
           "09140fdb660dcaa3993b64da31c9a05ad8c13df0feafdd73728107cdd2d173a3", 747966, "MIT", "350"),
    Source("nlgraph/matching/main.json", ("nlgraph_matching",), *NLGRAPH_MATCHING, "NLGraph/matching/main.json",
           "8134d7099efc7687a1788f26051fb20d174d402027afe410f1d252b5350b51b6", 1069344, "MIT", "510"),
    Source("mmlu_pro/test-00000-of-00001.parquet", ("mmlu_pro",), *MMLU_PRO,
           "FuseChat-3.0/FuseEval/General-Eval/MC-Eval/data/MMLU-Pro/data/test-00000-of-00001.parquet",
           "2bd1ae25ec6c21d94ccc6d29be57cd489c4983e376f12531a968f61f666d8e5c", 4149487, "MIT",
           "12,032 (3,098 in the paper's 23 subjects)"),
    Source("hellaswag/hellaswag.json", ("hellaswag",), *HELLASWAG, "data/hellaswag.json",
           "6c2e7ab3dcbf800cb02b598e2a6fb9180163daf81a85eebd1c2079a83bba58e9", 2106547, "MIT (HellaSwag)",
           "2,000 in A-D form"),
    Source("chess/lichess_db_puzzle.csv", ("chess",), *CHESS, "lichess_db_puzzle.csv",
           "4ca7e935cc5f4ba5e6fa8848f7a7641b784112c0092bc2a4a5bb76fce257b100", 268703, "CC0 (lichess data)",
           "1,499 puzzles (339 with rating 600-1000 and > 2 moves)"),
    Source("medmcqa/dev.json", ("medmcqa",), *MEDMCQA, "rawdata/medmcqa/data/dev.json",
           "a2b5f53890f4e742b728378fb847bc5338088d48ea01218676379f587270af31", 2594517, "MIT",
           "4,183 (validation split; cop 1-based)"),
    _scibench("atkins", "d2dd481ade7a3a2c6a108e2539bddaf2df83ecb5ef4021f04f520d55ec51f5ac", 60902, 105),
    _scibench("calculus", "69779c85d33afe2bf17d6f2a0cb7ccbb172e609cc21c3e86b17e1c21eb9fb2c6", 19450, 42),
    _scibench("chemmc", "134baf281dc7636fd01729b7f3b52465a44ea55fec5cb00e76a5fe809da520a0", 15124, 38),
    _scibench("class", "113f73bf829e73ed4ab7ccb97a3a8cc50531075ebdb13e5421d62230a96e239a", 33182, 56),
    _scibench("diff", "009547bcb646c7c88532908b9c3a689f02af66233869ea6e35c2d7c676478565", 22193, 50),
    _scibench("fund", "d6b90173970bfa5ed04355c77731c5a28921a0224a0fb7240817f6cb18ea3790", 39573, 71),
    _scibench("matter", "641291cb3d62b18bd73daa1f62988733d039f4df940f77f46052e92ac284ea94", 23846, 47),
    _scibench("quan", "a3c4f483b5dd7ce162d3d95610bb56614b5003ecba80f450c79755811176e4f1", 13582, 33),
    _scibench("stat", "a0f84cf8fbb94512174e4ecddb5a7bfa2b6ce7ddde0094c70d886a51a003dcfb", 32125, 72),
    _scibench("thermo", "723e550d350dbb13644bf72eda5f19a5d8978aa5abd1c779399051618604494b", 32399, 66),
    Source("biogeneration/GPT-4.jsonl", ("biogeneration",), *BIOGENERATION, "data/factscore/GPT-4.jsonl",
           "1430425b2ca37f25aea15b2ed96b54a27cf617e24cffe0b25cff306e3eaf90d1", 848143, "MIT",
           "500 topics (`input`, `topic`; ignore `output`)"),
)

# Tasks whose files cannot be fetched: the file a loader reads and what to do about it.
MANUAL: dict[str, tuple[str, str]] = {
    "com2": ("com2/com2.csv", "COM2 is distributed only on a dataset hub: put the original CSV there by hand"),
}

# What the project does not fetch at all (for the docs and the CLI's help).
NOT_FETCHED = (
    "COM2 (only on a dataset hub; put com2/com2.csv in place by hand)",
    "the Vera plausibility model (HellaSwag's and COM2's proxy in the paper)",
    "FActScore's Wikipedia database (~20 GB) and its ChatGPT backend",
    "the full lichess puzzle database (several GB; the chess task reads a 1,499-row excerpt)",
    "MedMCQA's train split (train, val and test are drawn from the validation split)",
    "OpenAI embeddings (MMLU-Pro's proxy uses all-MiniLM-L6-v2 instead)",
)


class FetchError(RuntimeError):
    """A file could not be downloaded; the message names the file and the URL."""


class ChecksumError(FetchError):
    """A downloaded file does not have the expected sha256; the message names both hashes."""


# ---------------------------------------------------------------------------- the table

def fetchable_tasks() -> list[str]:
    return sorted({t for s in SOURCES for t in s.tasks})


def known_tasks() -> list[str]:
    return sorted(set(fetchable_tasks()) | set(MANUAL))


def _unknown(names: Iterable[str]) -> list[str]:
    known = set(known_tasks())
    return [n for n in names if n not in known]


def sources_for(tasks: Iterable[str] | None = None, *, optional: bool = True) -> list[Source]:
    """The rows for ``tasks`` (all tasks if None), in table order; ``optional=False`` leaves out
    the files a task reads only when an option asks for them."""
    tasks = None if tasks is None else list(tasks)
    if tasks is not None and (bad := _unknown(tasks)):
        raise KeyError(f"unknown task(s) {', '.join(bad)}; known: {', '.join(known_tasks())}")
    return [s for s in SOURCES if (tasks is None or set(s.tasks) & set(tasks)) and (optional or not s.optional)]


def markdown_table() -> str:
    """The table as Markdown: task, file, source repository @ commit, licence, items."""
    lines = ["| task | file (under the data directory) | source repository @ commit | licence | items |",
             "|---|---|---|---|---|"]
    for s in SOURCES:
        tasks = ", ".join(f"`{t}`" for t in s.tasks) + (" (optional)" if s.optional else "")
        lines.append(f"| {tasks} | `{s.path}` | [{s.repo} @ {s.commit[:7]}]({s.file_url}) | {s.licence} | {s.items} |")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------- checking

def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def file_status(source: Source, data_dir: Path) -> tuple[str, str]:
    """("present" | "missing" | "corrupt", what is wrong) for one file of the data directory."""
    path = Path(data_dir) / source.path
    if not path.is_file():
        return "missing", ""
    size = path.stat().st_size
    if size != source.size:
        return "corrupt", f"{size} bytes, expected {source.size}"
    actual = sha256_file(path)
    if actual != source.sha256:
        return "corrupt", f"sha256 {actual}, expected {source.sha256}"
    return "present", ""


# ---------------------------------------------------------------------------- fetching

def mirror_base(mirror: str | None = None) -> str:
    """The base URL that replaces https://raw.githubusercontent.com (--mirror, then WOW_DATA_MIRROR)."""
    return (mirror or os.environ.get(MIRROR_ENV) or RAW_BASE).rstrip("/")


def _client():
    import httpx

    return httpx.Client(follow_redirects=True, timeout=httpx.Timeout(30.0, read=120.0),
                        headers={"User-Agent": "wowlib-data-fetch"})


def _range_start(content_range: str | None) -> int | None:
    match = re.match(r"bytes (\d+)-\d+/(\d+|\*)", content_range or "")
    return int(match.group(1)) if match else None


def _download(client, url: str, part: Path, offset: int, source: Source, progress: bool) -> bool:
    """Stream ``url`` into ``part`` from byte ``offset`` (a Range request when > 0); returns whether
    the download resumed. When the server ignores the Range (200) the whole file is written anew;
    when it cannot serve it (416, or another range) the .part is dropped and the file fetched again."""
    headers = {"Accept-Encoding": "identity"}
    if offset:
        headers["Range"] = f"bytes={offset}-"
    with client.stream("GET", url, headers=headers) as response:
        status = response.status_code
        if status == 404:
            raise FetchError(f"{source.path}: not found on the server (HTTP 404): {url}")
        resumed = bool(offset) and status == 206
        encoded = response.headers.get("Content-Encoding", "identity") != "identity"   # ranges of other bytes
        restart = bool(offset) and (status == 416 or (resumed and encoded) or
                                    (resumed and _range_start(response.headers.get("Content-Range")) != offset))
        if not restart:
            if status not in (200, 206):
                raise FetchError(f"{source.path}: HTTP {status} from {url}")
            if offset and not resumed:
                log.info("%s: the server ignored the Range request; downloading the whole file", source.path)
            _write(response, part, offset if resumed else 0, source, url, progress)
            return resumed
    log.info("%s: the server cannot resume from byte %d; downloading the whole file", source.path, offset)
    part.unlink(missing_ok=True)
    return _download(client, url, part, 0, source, progress)


def _write(response, part: Path, offset: int, source: Source, url: str, progress: bool) -> None:
    """Append the response body to ``part`` (truncate it first when ``offset`` is 0), with a
    progress bar; a body longer than the expected file is cut short and fails the check."""
    from tqdm.auto import tqdm

    written, too_long = offset, False
    with open(part, "ab" if offset else "wb") as f, \
            tqdm(total=source.size, initial=offset, unit="B", unit_scale=True, unit_divisor=1024,
                 desc=source.path, disable=not progress, leave=False) as bar:
        for chunk in response.iter_bytes():         # as received: an interruption keeps every byte
            written += len(chunk)
            if written > source.size:
                too_long = True
                break
            f.write(chunk)
            bar.update(len(chunk))
    if too_long:
        part.unlink()
        raise ChecksumError(f"{source.path}: {url} sent more than the expected {source.size} bytes "
                            f"(expected sha256 {source.sha256}); the download was removed")


def fetch_file(source: Source, data_dir: Path, *, base: str | None = None, client=None,
               progress: bool = True) -> str:
    """Download one file into ``data_dir``; returns "skipped" (already there with the right hash),
    "downloaded" or "resumed". Raises FetchError (ChecksumError for a wrong hash)."""
    import httpx

    data_dir = Path(data_dir)
    dest = data_dir / source.path
    if dest.is_file():
        state, detail = file_status(source, data_dir)
        if state == "present":
            return "skipped"
        log.warning("%s is present but corrupt (%s): downloading it again", dest, detail)
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    url = source.url(mirror_base(base))
    offset = part.stat().st_size if part.is_file() else 0
    if offset > source.size:
        part.unlink()
        offset = 0
    own_client = client is None
    client = client or _client()
    try:
        resumed = False
        if offset < source.size:
            try:
                resumed = _download(client, url, part, offset, source, progress)
            except httpx.HTTPError as err:
                kept = (f"the partial file {part} is kept: run fetch again to resume"
                        if part.is_file() and part.stat().st_size else "run fetch again")
                raise FetchError(f"{source.path}: download from {url} failed "
                                 f"({type(err).__name__}: {err}); {kept}") from None
    finally:
        if own_client:
            client.close()
    actual = sha256_file(part)
    if actual != source.sha256:
        part.unlink()
        raise ChecksumError(f"{source.path}: checksum mismatch for {url}\n"
                            f"    expected sha256 {source.sha256}\n"
                            f"    actual   sha256 {actual}\n"
                            f"    the download was removed; no file was written to {dest}")
    os.replace(part, dest)
    return "resumed" if resumed else "downloaded"


@dataclass(frozen=True)
class FetchResult:
    path: str
    outcome: str          # skipped | downloaded | resumed | failed
    error: str = ""


def fetch(sources: Sequence[Source], data_dir: Path, *, base: str | None = None,
          progress: bool = True) -> list[FetchResult]:
    """Fetch every source (one failure does not stop the others)."""
    results = []
    with _client() as client:
        for source in sources:
            try:
                outcome = fetch_file(source, data_dir, base=base, client=client, progress=progress)
            except FetchError as err:
                results.append(FetchResult(source.path, "failed", str(err)))
            else:
                results.append(FetchResult(source.path, outcome))
                log.info("%s: %s", source.path, outcome)
    return results


# ---------------------------------------------------------------------------- profiles

def profile_tasks(profile: str) -> tuple[Path, list[str], list[str]]:
    """(the YAML file, the profile's tasks, the generalisation targets it adds), from the profile's
    checked settings (``wowlib.config``; a key it does not set takes its default)."""
    path = config.profile_path(profile)
    settings = config.resolved(config.load_profile(path))
    tasks = list(dict.fromkeys(settings["tasks"]))
    extra: list[str] = []
    if settings["generalisation"]:
        from .evaluate import GENERALISATION
        extra = [t for task in tasks for t in GENERALISATION.get(task, ()) if t not in tasks]
    return path, tasks, list(dict.fromkeys(extra))


def fetch_command(tasks: Sequence[str], data_dir: Path) -> str:
    """The command that fetches ``tasks`` into ``data_dir`` (run it from the repository root)."""
    in_venv = Path(sys.prefix).resolve() == (paths.REPO_ROOT / ".venv").resolve()
    return " ".join([".venv/bin/python" if in_venv else "python", "-m", "wowlib.data", "fetch",
                     "--tasks", *tasks, "--data-dir", shlex.quote(str(data_dir))])


@dataclass(frozen=True)
class Needed:
    """One file a profile needs, and its state in the data directory."""

    path: str
    tasks: tuple[str, ...]
    state: str            # present | missing | corrupt
    detail: str = ""
    manual: bool = False  # cannot be fetched (MANUAL)


def needed_files(tasks: Sequence[str], data_dir: Path) -> list[Needed]:
    """Every file ``tasks`` read by default (no optional files), with its state."""
    rows = []
    for source in sources_for(tasks, optional=False):
        state, detail = file_status(source, data_dir)
        rows.append(Needed(source.path, tuple(t for t in source.tasks if t in tasks), state, detail))
    for task in tasks:
        if task in MANUAL:
            rel, how = MANUAL[task]
            present = (Path(data_dir) / rel).is_file()
            rows.append(Needed(rel, (task,), "present" if present else "missing", "" if present else how, True))
    return rows


def check(profile: str, data_dir: Path, out=None) -> int:
    """Print every file ``profile`` needs with its state; 0 when all are present, 1 when some are
    missing or corrupt (then the fetch command too), 2 for a profile naming an unknown task."""
    out = out or sys.stdout
    path, tasks, extra = profile_tasks(profile)
    needed = tasks + extra
    if bad := _unknown(needed):
        print(f"{path}: unknown task(s) {', '.join(bad)}; known: {', '.join(known_tasks())}", file=out)
        return 2
    print(f"data directory: {data_dir}", file=out)
    shown = path.resolve().relative_to(paths.REPO_ROOT) if path.resolve().is_relative_to(paths.REPO_ROOT) else path
    print(f"profile {shown} needs: {', '.join(tasks) or '(no tasks)'}"
          + (f" + generalisation targets {', '.join(extra)}" if extra else ""), file=out)
    rows = needed_files(needed, data_dir)
    width = max((len(r.path) for r in rows), default=0)
    for r in rows:
        print(f"  {r.state:<8} {r.path:<{width}}  {', '.join(r.tasks)}" + (f"  ({r.detail})" if r.detail else ""),
              file=out)
    bad_rows = [r for r in rows if r.state != "present"]
    if not bad_rows:
        print(f"all {len(rows)} needed file{'s' if len(rows) != 1 else ''} present", file=out)
        return 0
    print(f"{len(bad_rows)} of {len(rows)} needed files are missing or corrupt:", file=out)
    for r in bad_rows:
        print(f"  {r.state}: {Path(data_dir) / r.path}", file=out)
    to_fetch = [t for t in needed if any(t in r.tasks and not r.manual for r in bad_rows)]
    if to_fetch:
        print("fetch them with:", file=out)
        print(f"  {fetch_command(to_fetch, data_dir)}", file=out)
    for r in bad_rows:
        if r.manual:
            print(f"{r.tasks[0]}: not fetchable: {r.detail} ({Path(data_dir) / r.path})", file=out)
    return 1


# ---------------------------------------------------------------------------- command line

def _task_list(values: Sequence[str] | None) -> list[str] | None:
    if not values:
        return None
    return [t for v in values for t in v.split(",") if t]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m wowlib.data", description=__doc__.split("\n\n")[0],
        epilog="Not fetched: " + "; ".join(NOT_FETCHED) + ".")
    sub = parser.add_subparsers(dest="command", required=True)
    p_fetch = sub.add_parser("fetch", help="download the datasets' files, checked against their sha256")
    p_fetch.add_argument("--tasks", nargs="+", metavar="TASK",
                         help=f"only these tasks' files (default: all); known: {', '.join(fetchable_tasks())}")
    p_fetch.add_argument("--data-dir", type=Path, help="where to put them (default: WOW_DATA_DIR or data/)")
    p_fetch.add_argument("--mirror", help=f"base URL replacing {RAW_BASE} (default: ${MIRROR_ENV})")
    p_fetch.add_argument("--no-progress", action="store_true", help="no progress bars")
    p_fetch.add_argument("--with-optional", action="store_true",
                         help="with --tasks: also the files a task reads only on request (KC's MC_easy variant)")
    p_check = sub.add_parser("check", help="which files a profile needs: present, missing or corrupt")
    p_check.add_argument("profile", help="a profile name (configs/<name>.yaml) or a path to a YAML file")
    p_check.add_argument("--data-dir", type=Path, help="the data directory (default: WOW_DATA_DIR or data/)")
    sub.add_parser("table", help="print the table of sources as Markdown")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")

    if args.command == "table":
        print(markdown_table(), end="")
        return 0
    data_dir = (args.data_dir.expanduser().resolve() if args.data_dir else paths.data_dir())
    if args.command == "check":
        try:
            return check(args.profile, data_dir)
        except (FileNotFoundError, ValueError) as err:
            print(f"check: {err}", file=sys.stderr)
            return 2

    tasks = _task_list(args.tasks)
    if tasks is not None and (bad := _unknown(tasks)):
        print(f"fetch: unknown task(s) {', '.join(bad)}; known: {', '.join(known_tasks())}", file=sys.stderr)
        return 2
    manual = [t for t in tasks or [] if t in MANUAL]
    # every file when no task is named; for named tasks the files they read by default (and the
    # optional ones with --with-optional), which is what `check` asks for
    sources = sources_for(tasks, optional=tasks is None or args.with_optional)
    base = mirror_base(args.mirror)
    print(f"fetching {len(sources)} file{'s' if len(sources) != 1 else ''} into {data_dir} from {base}")
    results = fetch(sources, data_dir, base=base, progress=not args.no_progress)
    for r in results:
        print(f"  {r.outcome:<10} {r.path}")
    failed = [r for r in results if r.outcome == "failed"]
    counts = {k: sum(r.outcome == k for r in results) for k in ("downloaded", "resumed", "skipped")}
    print(f"{counts['downloaded'] + counts['resumed']} downloaded ({counts['resumed']} resumed), "
          f"{counts['skipped']} already present, {len(failed)} failed")
    for r in failed:
        print(f"FAILED {r.error}", file=sys.stderr)
    for task in manual:
        print(f"{task}: not fetchable: {MANUAL[task][1]} ({data_dir / MANUAL[task][0]})", file=sys.stderr)
    return 1 if failed or manual else 0


if __name__ == "__main__":
    sys.exit(main())
