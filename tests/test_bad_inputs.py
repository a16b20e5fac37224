"""A corpus of malformed data files, one parametrised test per loader.

Each case copies a small slice of the real file (WOW_DATA_DIR; COM2, which has no real file here,
gets a synthetic one), breaks it in one way and points the task at the copy (``data_dir=``). Every
broken file must give a DataError (FileNotFoundError when the file is missing) whose message names
the file; some cases also check that the message names the line or item and what was expected.
A few cases are NOT errors and say so (``ACCEPTED``): a UTF-8 byte-order mark is dropped, so the
copy with a BOM loads exactly what the copy without one loads. The last test covers a task whose
requested train/val/test split comes out empty.
"""
from __future__ import annotations

import json
import random
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from wowlib.tasks import DataError
from wowlib.tasks.chess import ChessPuzzles
from wowlib.tasks.kc import KnowledgeCrosswords
from wowlib.tasks.medmcqa import MedMCQA
from wowlib.tasks.nlgraph import Matching, MaximumFlow, ShortestPath
from wowlib.tasks.open_ended import COM2, BioGeneration
from wowlib.tasks.scibench import BOOKS, SciBench
from wowlib.tasks.similarity import HellaSwag, MMLUPro

ACCEPTED = None          # a case's ``error`` when the file must load


@dataclass(frozen=True)
class Case:
    kind: str
    breaks: Callable[[Path], None]      # edits the slice in place
    error: type[Exception] | None = DataError
    says: str = ""                      # a regex the message must match besides the file name


def ids(cases) -> list[str]:
    return [c.kind for c in cases]


def check(make_task: Callable[[], object], path: Path, case: Case):
    """Load a fresh task; the case's error must name ``path`` (and match ``says``)."""
    if case.error is ACCEPTED:
        return make_task().load()
    with pytest.raises(case.error) as err:
        make_task().load()
    message = str(err.value)
    assert str(path) in message, f"the message does not name the file: {message}"
    assert re.search(case.says, message), f"{case.says!r} not in: {message}"
    return None


# ---------------------------------------------------------------------------- ways to break a file

def missing(path: Path) -> None:
    path.unlink()


def empty(path: Path) -> None:
    path.write_bytes(b"")


def blank(path: Path) -> None:
    path.write_text("\n \n\t\n", encoding="utf-8")


def binary(path: Path) -> None:
    path.write_bytes(random.Random(0).randbytes(4096))


def truncated(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def with_bom(path: Path) -> None:
    path.write_bytes(b"\xef\xbb\xbf" + path.read_bytes())


def latin1_on_line(lineno: int) -> Callable[[Path], None]:
    """A Latin-1 byte (0xe9, "é") inside line ``lineno``: not UTF-8."""
    def edit(path: Path) -> None:
        lines = path.read_bytes().split(b"\n")
        lines[lineno - 1] = lines[lineno - 1][:10] + b"caf\xe9" + lines[lineno - 1][10:]
        path.write_bytes(b"\n".join(lines))
    return edit


def on_line(lineno: int, edit_line: Callable[[str], str]) -> Callable[[Path], None]:
    def edit(path: Path) -> None:
        lines = path.read_text(encoding="utf-8").split("\n")
        lines[lineno - 1] = edit_line(lines[lineno - 1])
        path.write_text("\n".join(lines), encoding="utf-8")
    return edit


def set_json(lineno: int, change: Callable[[dict], None], raw: dict[str, str] | None = None):
    """JSONL: apply ``change`` to the record on ``lineno``; ``raw``: keys whose JSON text is written
    verbatim (NaN, Infinity, a 5,000-digit number: things json.dumps would not write)."""
    def edit_line(line: str) -> str:
        record = json.loads(line)
        change(record)
        text = json.dumps(record)
        for key, value in (raw or {}).items():
            text = text[:-1] + f', "{key}": {value}}}'
        return text
    return on_line(lineno, edit_line)


def set_key(key, value):
    def change(record: dict) -> None:
        record[key] = value
    return change


def drop_key(key):
    def change(record: dict) -> None:
        del record[key]
    return change


def write_json(value) -> Callable[[Path], None]:
    def edit(path: Path) -> None:
        path.write_text(json.dumps(value), encoding="utf-8")
    return edit


def edit_json(change: Callable[[object], object]) -> Callable[[Path], None]:
    """JSON: replace the document by ``change(document)`` (which may edit it in place)."""
    def edit(path: Path) -> None:
        document = json.loads(path.read_text(encoding="utf-8"))
        result = change(document)
        path.write_text(json.dumps(document if result is None else result), encoding="utf-8")
    return edit


def replace_text(old: str, new: str) -> Callable[[Path], None]:
    """Replace the first ``old`` by ``new`` in the file's text."""
    def edit(path: Path) -> None:
        text = path.read_text(encoding="utf-8")
        assert old in text, f"{old!r} not in {path}"
        path.write_text(text.replace(old, new, 1), encoding="utf-8")
    return edit


def copy_lines(source: Path, target: Path, n: int) -> Path:
    target.parent.mkdir(parents=True, exist_ok=True)
    lines = source.read_text(encoding="utf-8").splitlines(keepends=True)
    target.write_text("".join(lines[:n]), encoding="utf-8")
    return target


# ---------------------------------------------------------------------------- the text-file kinds

def text_cases(first_record_line: int) -> list[Case]:
    """Kinds every text format shares; ``first_record_line``: a line holding data."""
    return [
        Case("missing_file", missing, FileNotFoundError, "WOW_DATA_DIR"),
        Case("empty_file", empty, DataError, "empty file; expected"),
        Case("blank_lines_only", blank, DataError, "empty file; expected"),
        Case("non_utf8_byte", latin1_on_line(first_record_line), DataError,
             rf"line {first_record_line}: not UTF-8 text \(byte 0xe9"),
        Case("binary_garbage", binary, DataError, ""),
        Case("utf8_bom", with_bom, ACCEPTED),
    ]


# ---------------------------------------------------------------------------- Knowledge Crosswords

KC_FILE = "knowledge_crosswords/MC_medi.jsonl"
KC_FIRST_THREE_BLANKS = 38                 # lines 1-37 have two blanks (the paper keeps three)

KC_CASES = text_cases(KC_FIRST_THREE_BLANKS) + [
    Case("truncated_json", truncated, DataError, r"line \d+ column \d+: invalid JSON"),
    Case("truncated_line", on_line(40, lambda line: line[: len(line) // 2]), DataError,
         r"line 40 column \d+: invalid JSON"),
    Case("line_not_an_object", on_line(39, lambda line: "[1, 2, 3]"), DataError,
         "line 39: expected a JSON object, got list"),
    Case("no_three_blank_item", lambda p: copy_lines(p, p, KC_FIRST_THREE_BLANKS - 1), DataError,
         r"0 items loaded; expected items with exactly 3 blanks .* none among the 37 records"),
    Case("options_of_wrong_type", set_json(38, lambda r: r.update(options=list(r["options"].values()))),
         DataError, "line 38: key 'options' should be dict"),
    Case("missing_key", set_json(40, drop_key("answer_all")), DataError, "line 40: missing key 'answer_all'"),
    Case("nan_id", set_json(38, drop_key("id"), raw={"id": "NaN"}), DataError,
         "line 38: key 'id' should be str/int, got float nan"),
    Case("blanks_of_mixed_types", set_json(38, set_key("blanks", ["blank 1", 2, None])), DataError,
         "line 38: expected blanks"),
    Case("no_wrong_candidate", set_json(38, lambda r: r["options"].update(
        {"blank 1": [r["answer_all"][0]] * 3})), DataError, "line 38: candidates of 'blank 1'"),
    Case("huge_integer", set_json(38, drop_key("id"), raw={"id": "9" * 5000}), DataError,
         "line 38: unreadable JSON"),
]


@pytest.mark.parametrize("case", KC_CASES, ids=ids(KC_CASES))
def test_kc_bad_input(data_dir, tmp_path, case):
    path = copy_lines(data_dir / KC_FILE, tmp_path / KC_FILE, 45)
    case.breaks(path)
    items = check(lambda: KnowledgeCrosswords(data_dir=tmp_path), path, case)
    if items is not None:
        assert len(items) == 8


# ---------------------------------------------------------------------------- NLGraph

NLGRAPH = {"nlgraph_shortest_path": (ShortestPath, "shortest_path"), "nlgraph_flow": (MaximumFlow, "flow"),
           "nlgraph_matching": (Matching, "matching")}


def first_item(change: Callable[[dict], None]) -> Callable[[Path], None]:
    def edit_document(document: dict) -> None:
        change(document[next(iter(document))])
    return edit_json(edit_document)


def unknown_node(record: dict) -> None:
    # the question asks about a node the graph does not have (networkx: NodeNotFound / NetworkXError);
    # for matching, an applicant beyond the declared count
    q = record["question"]
    if "job applicants" in q:
        record["question"] = re.sub(r"Applicant \d+ is", "Applicant 99 is", q, count=1)
    else:
        record["question"] = re.sub(r"to node (\d+)([?.])\nA:", r"to node 99\2\nA:", q)


NLGRAPH_CASES = text_cases(2) + [
    Case("truncated_json", truncated, DataError, r"line \d+ column \d+: invalid JSON"),
    Case("empty_object", write_json({}), DataError, "0 items loaded; expected a JSON object of NLGraph items"),
    Case("list_not_object", write_json([1, 2]), DataError, "expected a JSON object of items keyed by id, got list"),
    Case("answer_of_wrong_type", first_item(set_key("answer", 17)), DataError, "item '0': key 'answer' should be str"),
    Case("item_not_object", first_item(lambda r: r.clear()), DataError, "item '0': missing key 'question'"),
    Case("nan_number", first_item(lambda r: r.update(question=re.sub(r"(weight|capacity|in job) \d+", r"\1 nan",
                                                                       r["question"], count=1))),
         DataError, r"item '0': parsed \d+ of \d+"),
    Case("unknown_node", first_item(unknown_node), DataError, "item '0'"),
    Case("wrong_gold", first_item(lambda r: r.update(answer=re.sub(r"\d+(?=\D*$)", "999", r["answer"]))),
         DataError, "item '0': gold answer 999"),
]


@pytest.mark.parametrize("case", NLGRAPH_CASES, ids=ids(NLGRAPH_CASES))
@pytest.mark.parametrize("name", sorted(NLGRAPH))
def test_nlgraph_bad_input(data_dir, tmp_path, name, case):
    task, subdir = NLGRAPH[name]
    relative = f"nlgraph/{subdir}/main.json"
    raw = json.loads((data_dir / relative).read_text(encoding="utf-8"))
    path = tmp_path / relative
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps({k: raw[k] for k in list(raw)[:5]}, indent=1), encoding="utf-8")
    case.breaks(path)
    items = check(lambda: task(data_dir=tmp_path), path, case)
    if items is not None:
        assert len(items) == 5


# ---------------------------------------------------------------------------- chess (CSV)

CHESS_FILE = "chess/lichess_db_puzzle.csv"


def csv_row(lineno: int, edit_fields: Callable[[list[str]], list[str]]) -> Callable[[Path], None]:
    import csv
    import io

    def edit_line(line: str) -> str:
        fields = next(csv.reader([line]))
        out = io.StringIO()
        csv.writer(out, lineterminator="").writerow(edit_fields(fields))
        return out.getvalue()
    return on_line(lineno, edit_line)


def set_field(index: int, value: str) -> Callable[[list[str]], list[str]]:
    def edit(fields: list[str]) -> list[str]:
        return fields[:index] + [value] + fields[index + 1:]
    return edit


def every_row(edit_fields) -> Callable[[Path], None]:
    def edit(path: Path) -> None:
        n = len(path.read_text(encoding="utf-8").splitlines())
        for lineno in range(2, n + 1):
            csv_row(lineno, edit_fields)(path)
    return edit


def header_only(path: Path) -> None:
    path.write_text(path.read_text(encoding="utf-8").splitlines(keepends=True)[0], encoding="utf-8")


# lichess columns: PuzzleId,FEN,Moves,Rating,RatingDeviation,Popularity,NbPlays,Themes,GameUrl,...
CHESS_CASES = text_cases(3) + [
    Case("header_only", header_only, DataError, "a header and no data rows; expected lichess puzzles"),
    Case("short_row", csv_row(3, lambda f: f[:4]), DataError, "line 3: 4 fields, expected 11"),
    Case("long_row", csv_row(3, lambda f: [*f, "extra"]), DataError, "line 3: 12 fields, expected 11"),
    Case("missing_column", replace_text("Rating,", "Elo,"), DataError, r"line 1: missing columns \['Rating'\]"),
    Case("nan_rating", csv_row(2, set_field(3, "nan")), DataError, "line 2: bad Rating or FEN"),
    Case("rating_of_wrong_type", csv_row(2, set_field(3, "eight hundred")), DataError, "line 2: bad Rating"),
    Case("bad_fen", csv_row(2, set_field(1, "not a position")), DataError, "line 2: bad Rating or FEN"),
    Case("impossible_position", every_row(set_field(1, "8/8/8/8/8/8/8/8 w - - 0 1")), DataError,
         "is not a valid position"),
    Case("illegal_move", every_row(lambda f: f[:2] + ["a1a1 " + f[2].split(" ", 1)[1], *f[3:]]), DataError,
         "illegal puzzle move"),
    Case("no_puzzle_passes_the_filter", every_row(set_field(3, "1500")), DataError,
         r"0 items loaded; expected puzzles rated strictly between 600 and 1000 .* none among the 40 rows"),
    Case("empty_puzzle_id", csv_row(2, set_field(0, "")), DataError, "line 2: empty PuzzleId"),
    Case("unterminated_quote", on_line(3, lambda line: line.replace(",", ',"', 1)), DataError,
         r"lines 3-41: 2 fields, expected 11"),
]


@pytest.mark.parametrize("case", CHESS_CASES, ids=ids(CHESS_CASES))
def test_chess_bad_input(data_dir, tmp_path, case):
    path = copy_lines(data_dir / CHESS_FILE, tmp_path / CHESS_FILE, 41)
    clean = tmp_path / "clean"
    copy_lines(data_dir / CHESS_FILE, clean / CHESS_FILE, 41)
    case.breaks(path)
    items = check(lambda: ChessPuzzles(data_dir=tmp_path, depth=1), path, case)
    if items is not None:
        assert items == ChessPuzzles(data_dir=clean, depth=1).load() and items


# ---------------------------------------------------------------------------- MMLU-Pro (parquet)

MMLU_FILE = "mmlu_pro/test-00000-of-00001.parquet"


@pytest.fixture(scope="module")
def mmlu_slice(data_dir):
    """40 rows: 30 of the paper's subjects, then 10 others (as in the file, kept in file order)."""
    import pandas as pd
    frame = pd.read_parquet(data_dir / MMLU_FILE)
    ours = frame["src"].str.startswith("ori_mmlu-business_ethics")
    return pd.concat([frame[ours].head(30), frame[~frame["src"].str.startswith("ori_mmlu-")].head(10)])


# A parquet case breaks the file: ``file_kind(breaks)`` edits the written slice like a text case;
# ``frame_kind(change)`` writes ``change(slice)`` instead of the slice.

def file_kind(breaks: Callable[[Path], None]):
    return lambda path, frame: breaks(path)


def frame_kind(change):
    return lambda path, frame: change(frame).to_parquet(path, index=False)


def cell(column: str, value, row: int = 3):
    def change(frame):
        frame = frame.copy()
        if isinstance(value, float) and frame[column].dtype.kind == "i":
            frame[column] = frame[column].astype("float64")
        frame.iloc[row, frame.columns.get_loc(column)] = value
        return frame
    return frame_kind(change)


def column_as(column: str, values):
    def change(frame):
        frame = frame.copy()
        frame[column] = values(frame)
        return frame
    return frame_kind(change)


MMLU_CASES = [
    Case("missing_file", file_kind(missing), FileNotFoundError, "WOW_DATA_DIR"),
    Case("empty_file", file_kind(empty), DataError, "not a readable parquet file"),
    Case("binary_garbage", file_kind(binary), DataError, "not a readable parquet file"),
    Case("truncated", file_kind(truncated), DataError, "not a readable parquet file"),
    Case("zero_rows", frame_kind(lambda f: f.head(0)), DataError, "0 rows; expected MMLU-Pro questions"),
    Case("src_without_prefix", column_as("src", lambda f: f["src"].str.removeprefix("ori_mmlu-")), DataError,
         r"0 items in the paper's 23 subjects .* among its 40 rows; src values seen: .*\bbusiness_ethics\b"),
    Case("only_other_subjects", frame_kind(lambda f: f.tail(10)), DataError,
         "0 items in the paper's 23 subjects .* src values seen: "),
    Case("missing_column", frame_kind(lambda f: f.drop(columns=["answer_index"])), DataError,
         r"missing columns \['answer_index'\]"),
    Case("nan_answer_index", cell("answer_index", float("nan")), DataError,
         r"row 3 .*answer_index should be an integer, got nan"),
    Case("fractional_answer_index", column_as("answer_index", lambda f: f["answer_index"] + 0.5), DataError,
         r"row 0 .*answer_index should be an integer, got \d+\.5"),
    Case("answer_index_out_of_range", cell("answer_index", 10), DataError, r"row 3 .*gold index 10 outside 0\.\.\d"),
    Case("options_as_text", column_as("options", lambda f: ["A B C D"] * len(f)), DataError,
         "options should be a list of strings, got str"),
    Case("option_of_wrong_type", column_as("options", lambda f: [[*map(str, o[:-1]), None] for o in f["options"]]),
         DataError, "expected 2..26 option strings"),
    Case("question_missing", column_as("question", lambda f: [None] * len(f)), DataError,
         "question should be a non-empty string"),
    Case("nan_question_id", column_as("question_id", lambda f: [float("nan")] * len(f)), DataError,
         "question_id should be an integer or a string"),
]


@pytest.mark.parametrize("case", MMLU_CASES, ids=ids(MMLU_CASES))
def test_mmlu_pro_bad_input(tmp_path, mmlu_slice, case):
    path = tmp_path / MMLU_FILE
    path.parent.mkdir(parents=True)
    mmlu_slice.to_parquet(path, index=False)
    case.breaks(path, mmlu_slice)
    check(lambda: MMLUPro(data_dir=tmp_path), path, case)


def test_mmlu_pro_slice_loads(tmp_path, mmlu_slice):
    """The baseline of the cases above: the unbroken slice loads its 30 rows in the paper's subjects."""
    path = tmp_path / MMLU_FILE
    path.parent.mkdir(parents=True)
    mmlu_slice.to_parquet(path, index=False)
    assert len(MMLUPro(data_dir=tmp_path).load()) == 30


# ---------------------------------------------------------------------------- HellaSwag (JSON)

HELLASWAG_FILE = "hellaswag/hellaswag.json"


def first_dev(change: Callable[[dict], None]) -> Callable[[Path], None]:
    def edit_document(document: dict) -> None:
        change(document["dev"][0])
    return edit_json(edit_document)


HELLASWAG_CASES = text_cases(3) + [
    Case("truncated_json", truncated, DataError, r"line \d+ column \d+: invalid JSON"),
    Case("empty_lists", write_json({"dev": [], "test": []}), DataError,
         "0 items loaded; expected HellaSwag items"),
    Case("list_not_object", write_json([]), DataError, "expected an object with 'dev' and 'test' lists"),
    Case("choices_of_wrong_type", first_dev(lambda r: r.update(choices=list(r["choices"].values()))), DataError,
         r"dev\[0\]: key 'choices' should be dict"),
    Case("answer_not_a_choice", first_dev(set_key("answer", "E")), DataError,
         r"dev\[0\]: answer 'E' is not one of the choices"),
    Case("choice_of_wrong_type", first_dev(lambda r: r["choices"].update(B=None)), DataError,
         r"dev\[0\]: expected 2..26 option strings"),
    Case("nan_answer", replace_text('"answer": "D"', '"answer": NaN'), DataError,
         r"dev\[0\]: key 'answer' should be str, got float nan"),
    Case("item_not_object", first_dev(lambda r: r.clear()), DataError, r"dev\[0\]: missing key 'choices'"),
]


@pytest.mark.parametrize("case", HELLASWAG_CASES, ids=ids(HELLASWAG_CASES))
def test_hellaswag_bad_input(data_dir, tmp_path, case):
    raw = json.loads((data_dir / HELLASWAG_FILE).read_text(encoding="utf-8"))
    path = tmp_path / HELLASWAG_FILE
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps({"dev": raw["dev"][:4], "test": raw["test"][:4]}, indent=1), encoding="utf-8")
    case.breaks(path)
    items = check(lambda: HellaSwag(data_dir=tmp_path), path, case)
    if items is not None:
        assert len(items) == 8


# ---------------------------------------------------------------------------- MedMCQA (JSONL)

MEDMCQA_FILE = "medmcqa/dev.json"

MEDMCQA_CASES = text_cases(3) + [
    Case("truncated_json", truncated, DataError, r"line \d+ column \d+: invalid JSON"),
    Case("line_not_an_object", on_line(4, lambda line: '"a string"'), DataError,
         "line 4: expected a JSON object, got str"),
    Case("cop_of_wrong_type", set_json(4, set_key("cop", "2")), DataError, "line 4: key 'cop' should be int, got str"),
    Case("cop_out_of_range", set_json(4, set_key("cop", 0)), DataError, r"line 4: 'cop' must be 1\.\.4"),
    Case("nan_cop", set_json(4, drop_key("cop"), raw={"cop": "NaN"}), DataError,
         "line 4: key 'cop' should be int, got float nan"),
    Case("infinite_cop", set_json(4, drop_key("cop"), raw={"cop": "Infinity"}), DataError,
         "line 4: key 'cop' should be int, got float inf"),
    Case("missing_option", set_json(6, drop_key("opc")), DataError, "line 6: missing key 'opc'"),
    Case("option_of_wrong_type", set_json(6, set_key("opa", ["x"])), DataError, "line 6: key 'opa' should be str"),
]


@pytest.mark.parametrize("case", MEDMCQA_CASES, ids=ids(MEDMCQA_CASES))
def test_medmcqa_bad_input(data_dir, tmp_path, case):
    path = copy_lines(data_dir / MEDMCQA_FILE, tmp_path / MEDMCQA_FILE, 8)
    case.breaks(path)
    items = check(lambda: MedMCQA(data_dir=tmp_path), path, case)
    if items is not None:
        assert len(items) == 8


# ---------------------------------------------------------------------------- SciBench (JSON, 10 books)

def answer_of_item(index: int, value) -> Callable[[Path], None]:
    def edit_document(document: list) -> None:
        document[index]["answer_number"] = value
    return edit_json(edit_document)


SCIBENCH_CASES = text_cases(3) + [
    Case("truncated_json", truncated, DataError, r"line \d+ column \d+: invalid JSON"),
    Case("empty_list", write_json([]), DataError, "0 items loaded; expected SciBench problems"),
    Case("object_not_list", write_json({"0": {}}), DataError, "expected a JSON list of problems, got dict"),
    Case("infinite_answer", answer_of_item(1, "inf"), DataError, "item 1: answer_number 'inf' is not a finite number"),
    Case("overflowing_answer", answer_of_item(1, "1e400"), DataError, "item 1: answer_number '1e400' is not a finite"),
    Case("nan_answer", answer_of_item(1, "nan"), DataError, "item 1: answer_number 'nan' is not a finite number"),
    Case("negative_infinite_answer", answer_of_item(2, "-Infinity"), DataError, "item 2: answer_number '-Infinity'"),
    Case("answer_not_a_number", answer_of_item(1, "about twelve"), DataError, "item 1: answer_number 'about twelve'"),
    Case("answer_of_wrong_type", answer_of_item(1, 12.5), DataError, "item 1: key 'answer_number' should be str"),
    Case("nan_literal_answer", replace_text('"answer_number": "', '"answer_number": NaN, "x": "'), DataError,
         "item 0: key 'answer_number' should be str, got float nan"),
    Case("item_not_object", edit_json(lambda d: [1, *d]), DataError, "item 0: expected an object, got int"),
]


@pytest.mark.parametrize("case", SCIBENCH_CASES, ids=ids(SCIBENCH_CASES))
def test_scibench_bad_input(data_dir, tmp_path, case):
    for book in BOOKS:
        records = json.loads((data_dir / f"scibench/{book}.json").read_text(encoding="utf-8"))
        target = tmp_path / f"scibench/{book}.json"
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(json.dumps(records[:3], indent=1), encoding="utf-8")
    path = tmp_path / "scibench/fund.json"
    case.breaks(path)
    items = check(lambda: SciBench(data_dir=tmp_path), path, case)
    if items is not None:
        assert len(items) == 3 * len(BOOKS)


# ---------------------------------------------------------------------------- BioGeneration (JSONL)

BIO_FILE = "biogeneration/GPT-4.jsonl"

BIO_CASES = text_cases(3) + [
    Case("truncated_json", truncated, DataError, r"line \d+ column \d+: invalid JSON"),
    Case("topic_of_wrong_type", set_json(2, set_key("topic", 7)), DataError, "line 2: key 'topic' should be str"),
    Case("missing_input", set_json(3, drop_key("input")), DataError, "line 3: missing key 'input'"),
    Case("nan_topic", set_json(2, drop_key("topic"), raw={"topic": "NaN"}), DataError,
         "line 2: key 'topic' should be str, got float nan"),
    Case("line_not_an_object", on_line(2, lambda line: "null"), DataError, "line 2: expected a JSON object"),
]


@pytest.mark.parametrize("case", BIO_CASES, ids=ids(BIO_CASES))
def test_biogeneration_bad_input(data_dir, tmp_path, case):
    path = copy_lines(data_dir / BIO_FILE, tmp_path / BIO_FILE, 6)
    case.breaks(path)
    items = check(lambda: BioGeneration(data_dir=tmp_path), path, case)
    if items is not None:
        assert len(items) == 6


# ---------------------------------------------------------------------------- COM2 (CSV; no real file here)

COM2_FILE = "com2/com2.csv"
COM2_ROWS = [
    ("What will PersonX do next?", "PersonX goes to the market.",
     repr(["buy food", "sleep", "fly away", "sing", "none of the above"]), "0", "2i"),
    ("Why did PersonX leave?", "PersonX left the party early.",
     repr(["was tired", "was hungry", "it's late", "won a prize", "none of the above"]), "2", "3i"),
    ("Q3", "C3", repr(["a", "b", "c", "d", "none of the above"]), "4", "2i"),     # answer "none": dropped
    ("Q4", "C4", repr(["a", "b", "c", "d", "none of the above"]), "1", "1i"),     # single hop: dropped
]


def write_com2(path: Path) -> Path:
    import csv
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["question", "context", "options", "label", "type"])
        writer.writerows(COM2_ROWS)
    return path


COM2_CASES = text_cases(2) + [
    Case("header_only", header_only, DataError, "a header and no data rows; expected COM2 items"),
    Case("short_row", csv_row(3, lambda f: f[:3]), DataError, "line 3: 3 fields, expected 5"),
    Case("long_row", csv_row(3, lambda f: [*f, "x"]), DataError, "line 3: 6 fields, expected 5"),
    Case("missing_column", replace_text("label,", "answer,"), DataError, r"missing columns \['label'\]"),
    Case("nan_label", csv_row(2, set_field(3, "nan")), DataError, "line 2: 'label' must be an int"),
    Case("label_of_wrong_type", csv_row(2, set_field(3, "first")), DataError, "line 2: 'label' must be an int"),
    Case("options_not_a_list", csv_row(2, set_field(2, "'buy food'")), DataError,
         "line 2: 'options' must be a list of strings"),
    Case("options_as_code", csv_row(2, set_field(2, "__import__('os').getcwd()")), DataError,
         "line 2: 'label' must be an int and 'options' a list literal"),
    Case("options_nested_too_deep", csv_row(2, set_field(2, "[" * 5000 + "]" * 5000)), DataError, "line 2"),
    Case("label_out_of_range", csv_row(2, set_field(3, "7")), DataError, "line 2: label 7 outside the 4 options"),
    Case("no_item_passes_the_filter", every_row(set_field(4, "1i")), DataError,
         r"0 items loaded; expected multi-hop .* none among the 4 rows"),
]


@pytest.mark.parametrize("case", COM2_CASES, ids=ids(COM2_CASES))
def test_com2_bad_input(tmp_path, case):
    path = write_com2(tmp_path / COM2_FILE)
    case.breaks(path)
    items = check(lambda: COM2(data_dir=tmp_path), path, case)
    if items is not None:
        assert [q.gold for q in items] == [0, 2]


# ---------------------------------------------------------------------------- empty splits

def test_an_empty_split_names_the_task_the_items_and_the_split_sizes(data_dir, tmp_path):
    """Three items split 8:1:1 leave the val split empty: asking for it says so (the other
    splits still work, and iterating over the splits shows the empty one)."""
    copy_lines(data_dir / KC_FILE, tmp_path / KC_FILE, KC_FIRST_THREE_BLANKS + 2)
    task = KnowledgeCrosswords(data_dir=tmp_path)
    assert len(task.load()) == 3
    assert len(task.questions("train")) == 2 and len(task.questions("test")) == 1
    assert {name: len(qs) for name, qs in task.splits().items()} == {"train": 2, "val": 0, "test": 1}
    for ask in (lambda: task.questions("val"), lambda: task.questions("val", 5), lambda: task.splits()["val"]):
        with pytest.raises(DataError) as err:
            ask()
        message = str(err.value)
        assert "task kc" in message and "'val' split is empty" in message
        assert "3 items loaded" in message and "train 2, val 0, test 1" in message
