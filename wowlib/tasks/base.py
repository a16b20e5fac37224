"""The task abstraction: questions, prompts, answer parsing, proxy correctness, splits.

A *proxy* maps an answer to [0, 1]: how right it is (1 = the gold answer). It is the ground truth
of "how wrong": wrong-over-wrong (WoW) pairs are ordered by it. Every task says how it reads its
original data files, how it asks (the paper's chain-of-thought prompt + the task's query and
options), how it extracts the final answer (a second user turn + a regex), and how it grades.
"""
from __future__ import annotations

import csv
import io
import json
import math
import random
import re
import unicodedata
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from .. import paths
from ..seeds import stable_seed

LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
SPLITS = ("train", "val", "test")


class DataError(ValueError):
    """Input data that does not have the expected shape. The message names the file, the line or
    item, and what was expected."""


class ProxyUnavailable(RuntimeError):
    """The task's proxy needs a resource that is not available here (e.g. Vera, FActScore)."""


def missing_file(path: Path, data_dir: Path, what: str, source: str) -> FileNotFoundError:
    return FileNotFoundError(
        f"{what}: file not found: {path}\n"
        f"  looked in the data directory {data_dir} (set WOW_DATA_DIR to change it)\n"
        f"  get it from: {source}"
    )


# ---------------------------------------------------------------------------- reading files
#
# Every reader names the file (and the line, row or item) in its errors and no reader accepts an
# empty result: an empty file, a CSV header without rows, a parquet file without rows is a
# DataError saying what was expected. Text files are UTF-8; a leading byte-order mark is dropped
# (editors on Windows write one, and the CSV module would glue it to the first column's name); any
# other byte that is not UTF-8 is a DataError naming its line.

def read_text(path: Path, expected: str) -> str:
    """The text of ``path`` (UTF-8, a leading BOM dropped). A byte that is not UTF-8, or a file
    with nothing but whitespace, is a DataError naming the file and ``expected`` (what it should
    hold)."""
    data = Path(path).read_bytes()
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = data.count(b"\n", 0, err.start) + 1
        raise DataError(f"{path}: line {line}: not UTF-8 text (byte 0x{data[err.start]:02x} at offset "
                        f"{err.start}); expected {expected}, in UTF-8") from None
    if not text.strip():
        raise DataError(f"{path}: empty file; expected {expected}")
    return text


def _loads(text: str, path: Path, expected: str, lineno: int | None = None) -> Any:
    """``json.loads`` with every failure a DataError naming the file and line (``lineno``: the
    line of a JSONL record; otherwise the line the decoder reports)."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        line = err.lineno if lineno is None else lineno
        raise DataError(f"{path}: line {line} column {err.colno}: invalid JSON ({err.msg}); "
                        f"expected {expected}") from None
    except (ValueError, RecursionError) as err:     # a 5,000-digit integer, "[[[[..." nested too deep
        where = f"{path}: line {lineno}" if lineno is not None else f"{path}"
        raise DataError(f"{where}: unreadable JSON ({type(err).__name__}: {err!s:.100}); "
                        f"expected {expected}") from None


def read_json(path: Path, expected: str = "a JSON document") -> Any:
    """The JSON document in ``path``; invalid JSON is a DataError naming the file and line."""
    return _loads(read_text(path, expected), path, expected)


def read_jsonl(path: Path, expected: str = "one JSON object per line") -> Iterator[tuple[int, dict]]:
    """Yield (line number, record) for every non-blank line; a bad line is a DataError naming the
    file and line, and so is a file without any record."""
    text = read_text(path, expected)
    for lineno, line in enumerate(io.StringIO(text, newline=None), start=1):
        if not line.strip():
            continue
        record = _loads(line, path, expected, lineno)
        if not isinstance(record, dict):
            raise DataError(f"{path}: line {lineno}: expected a JSON object, got {type(record).__name__}")
        yield lineno, record


def read_csv(path: Path, columns: Iterable[str], expected: str) -> Iterator[tuple[int, dict[str, str]]]:
    """Yield (line number, {column: text}) for every data row of a CSV file with a header row
    (the row's first line, when a quoted field spans lines).

    The header must name every one of ``columns`` (a BOM before it is dropped, see ``read_text``);
    every row must have as many fields as the header: a short row (which ``csv.DictReader`` pads
    with None) or a long one is a DataError naming its line. Blank lines are skipped. A file with a
    header and no rows is a DataError; ``expected`` says what the rows should be."""
    columns = list(columns)
    text = read_text(path, f"a CSV file with a header row naming {columns}")
    reader = csv.reader(io.StringIO(text, newline=""))
    n_rows, first = 0, 1

    def lines() -> str:         # the lines of the last row read (a quoted field may span lines)
        return f"line {first}" if first >= reader.line_num else f"lines {first}-{reader.line_num}"

    try:
        header = next(row for row in reader if row)      # the text is not blank: a row exists
        if missing := [c for c in columns if c not in header]:
            raise DataError(f"{path}: line {reader.line_num}: missing columns {missing} in the header "
                            f"{header!r:.200}")
        first = reader.line_num + 1
        for row in reader:
            if row and len(row) != len(header):
                raise DataError(f"{path}: {lines()}: {len(row)} fields, expected {len(header)} "
                                f"(the header's columns)")
            if row:
                n_rows += 1
                yield first, dict(zip(header, row))
            first = reader.line_num + 1
    except csv.Error as err:
        raise DataError(f"{path}: {lines()}: malformed CSV ({err})") from None
    if n_rows == 0:
        raise DataError(f"{path}: a header and no data rows; expected {expected}")


def read_parquet(path: Path, columns: Iterable[str], expected: str):
    """The parquet file as a pandas DataFrame holding ``columns``; an unreadable file, a missing
    column or a file without rows is a DataError naming the file."""
    import pandas as pd
    import pyarrow
    try:
        frame = pd.read_parquet(path)
    except (OSError, ValueError, pyarrow.ArrowException) as err:   # ArrowInvalid is a ValueError
        raise DataError(f"{path}: not a readable parquet file ({err!s:.200}); expected {expected}") from None
    if missing := sorted(set(columns) - set(frame.columns)):
        raise DataError(f"{path}: missing columns {missing} (columns present: {sorted(map(str, frame.columns))})")
    if len(frame) == 0:
        raise DataError(f"{path}: 0 rows; expected {expected}")
    return frame


def require_items(items: list, path: Path, expected: str) -> list:
    """``items`` unless empty: a loader that finds no usable item raises a DataError naming the
    file and what it expected (an empty task would only fail later, far from its cause)."""
    if not items:
        raise DataError(f"{path}: 0 items loaded; expected {expected}")
    return items


def field_of(record: dict, key: str, kind: type | tuple[type, ...], where: str) -> Any:
    """``record[key]``, checked to be of ``kind``; ``where`` names the file and line/item."""
    if key not in record:
        raise DataError(f"{where}: missing key {key!r} (keys present: {sorted(record)})")
    value = record[key]
    if not isinstance(value, kind) or (isinstance(value, bool) and bool not in _as_tuple(kind)):
        names = "/".join(k.__name__ for k in _as_tuple(kind))
        raise DataError(f"{where}: key {key!r} should be {names}, got {type(value).__name__} {value!r:.80}")
    return value


def _as_tuple(kind: type | tuple[type, ...]) -> tuple[type, ...]:
    return kind if isinstance(kind, tuple) else (kind,)


# ---------------------------------------------------------------------------- questions

@dataclass(frozen=True)
class Question:
    """One item of a task. For multiple choice, ``options`` and ``option_proxies`` are in the
    ORIGINAL order and ``gold`` is the index of the correct option; for numeric tasks ``gold`` is
    the number; for open-ended tasks it is None."""

    task: str
    qid: str
    query: str
    options: tuple[str, ...] = ()
    option_proxies: tuple[float, ...] = ()
    gold: Any = None
    meta: dict = field(default_factory=dict, compare=False)

    @property
    def is_mc(self) -> bool:
        return bool(self.options)


def normalise_text(text: str) -> str:
    """NFKC (full-width letters/digits -> ASCII), unicode minus -> '-', markdown emphasis and
    surrounding brackets/quotes removed, whitespace stripped."""
    text = unicodedata.normalize("NFKC", text or "").replace("\u2212", "-")
    text = re.sub(r"[*_`$]+", "", text)
    return text.strip().strip("\"'()[]").strip()


@dataclass(frozen=True)
class Parsed:
    """What a final-answer parser read: the ``value`` (the SHOWN option index, or a number) and
    the ``rule`` that read it, or ``value`` None and the ``reason`` it could not.

    Rules (text mode): ``letter`` (a reply that is only an option letter, as the multiple-choice
    instruction asks, possibly followed by the option's text), ``phrase`` (the opening the
    instruction asked for, "The total weight is 7", "The answer is B"), ``bare`` (a numeric reply
    that is only the number). Constrained mode (``sample``) records ``constrained``. Reasons:
    ``empty``, ``none`` (the model said "None", as the instruction allows), ``no_answer`` (none of
    the rules applies: never a number or letter picked out of free text), ``ambiguous`` (two
    different answers, or an expression rather than a value), ``not_integer``, ``out_of_range``."""

    value: float | int | str | None
    rule: str | None = None
    reason: str | None = None

    def __post_init__(self) -> None:
        if (self.value is None) == (self.reason is None):
            raise ValueError(f"a Parsed has a value or a reason, not both or neither: {self}")


def unparsed(reason: str) -> Parsed:
    return Parsed(None, reason=reason)


_NONE = re.compile(r"none\.?", re.IGNORECASE)
MAX_REPLY_CHARS = 4000      # a final-answer reply is a phrase (32 tokens): longer text is cut here
                            # so no pattern ever scans a runaway reply

# ---- multiple choice
# The official pattern ``([A-Z])(\.|\. .+)?$`` read the reply's last capital letter followed by the
# end (or ". option text"); searched anywhere, it makes "A or B" read as B. Here the letter must
# START the reply (optionally in brackets, then the end, a full stop, a colon, or ". <option text>"),
# or follow an explicit answer phrase.
_LETTER_REPLY = re.compile(r"\(?([A-Za-z])\)?(?:[.:)]?|[.:)] .*)", re.DOTALL)
_LETTER_PHRASE = re.compile(
    r"\b(?:the )?(?:correct |final |best )?(?:answer|option|choice)(?: is)?(?: option)? ?:? ?\(?((?-i:[A-Z]))\)?(?![A-Za-z])",
    re.IGNORECASE)
_SEVERAL = re.compile(r" ?(?:and|or|&|,|/|then)(?: (?:and|or|then))? ?\(?[A-Z]\)?(?![A-Za-z])")      # "A or B", "A, B"


def parse_letter(text: str | None, n_options: int) -> Parsed:
    """The SHOWN option index in a final-answer reply (rules ``letter`` and ``phrase``, see
    ``Parsed``); a letter beyond the options, a lowercase word, "A or B" / "A, B" / two answer
    phrases with different letters are unparsed with their reason."""
    text = re.sub(r"\s+", " ", normalise_text((text or "")[:MAX_REPLY_CHARS]))
    if not text:
        return unparsed("empty")
    if _NONE.fullmatch(text):
        return unparsed("none")
    if (lead := re.match(r"\(?[A-Z]\)?", text)) and _SEVERAL.match(text, lead.end()):
        return unparsed("ambiguous")                    # "A or B", "A, B"
    letter, rule = None, None
    if match := _LETTER_REPLY.fullmatch(text):
        letter, rule = match.group(1), "letter"
        if letter.islower() and len(text) > 2:          # "a. Paris"? a lowercase word, not an answer
            return unparsed("no_answer")
        tail = text[match.end(1):]
    else:
        found = list(_LETTER_PHRASE.finditer(text))
        if not found:
            return unparsed("no_answer")
        if len({m.group(1).upper() for m in found}) > 1:
            return unparsed("ambiguous")
        letter, rule, tail = found[-1].group(1), "phrase", text[found[-1].end():]
    if _SEVERAL.match(tail.lstrip(")")):
        return unparsed("ambiguous")
    index = LETTERS.index(letter.upper())
    return Parsed(index, rule) if index < n_options else unparsed("out_of_range")


# ---- numbers
_DIGITS = r"(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|\.\d+"
_EXPONENT = r"(?:\s?[eE]\s?([-+]?\d{1,3})|\s?(?:x|\*|\u00d7|\\times|\\cdot)\s?10\s?\^\s?\{?\s?([-+]?\d{1,3})\s?\}?)"
NUMBER_RE = re.compile(rf"([-+])?\s?({_DIGITS})(?:{_EXPONENT})?(?:\s?/\s?(\d+(?:\.\d+)?))?")
_EXPRESSION = re.compile(r"\s?(?:[-+*/x\u00d7^=]|\\times)\s?\d")


def read_number(match: re.Match) -> float:
    """The value of a ``NUMBER_RE`` match: thousands separators, a power of ten and a fraction
    ("1/2" -> 0.5) are read, not cut ("6.02 x 10^23" is 6.02e23, not 6.02)."""
    sign, digits, exp_e, exp_ten, denominator = match.groups()
    value = float(digits.replace(",", ""))
    exponent = exp_e or exp_ten
    if exponent is not None:
        value *= 10.0 ** int(exponent)
    if denominator is not None:
        if float(denominator) == 0:
            raise ValueError("division by zero")
        value /= float(denominator)
    return -value if sign == "-" else value


def parse_number(text: str | None, phrase: str | None = None, integer: bool = False) -> Parsed:
    """A number from a final-answer reply, by rule ``phrase`` (the number right after ``phrase``,
    e.g. "The total weight is", as the official instruction asks the model to start; every
    occurrence must agree) or ``bare`` (the reply is only the number). Never the last number of
    free text: "There is no path from node 7 to node 3" is ``no_answer``, not 3. "7 + 3 = 10"
    after the phrase is ``ambiguous``; with ``integer`` a value like 7.5 is ``not_integer``."""
    text = re.sub(r"\s+", " ", normalise_text((text or "")[:MAX_REPLY_CHARS]))
    if not text:
        return unparsed("empty")
    if _NONE.fullmatch(text):
        return unparsed("none")
    values, rule = [], None
    bare = NUMBER_RE.fullmatch(text.rstrip(".").strip())
    if bare:
        values, rule = [bare], "bare"
    elif phrase:
        pattern = re.compile(re.escape(phrase).replace(r"\ ", r"\s") + r"\s?:?\s?(?:approximately\s|about\s|~\s?)?",
                             re.IGNORECASE)
        for head in pattern.finditer(text):
            match = NUMBER_RE.match(text, head.end())
            if match is None:
                continue
            if _EXPRESSION.match(text, match.end()):
                return unparsed("ambiguous")
            values.append(match)
        rule = "phrase"
    if not values:
        return unparsed("no_answer")
    try:
        numbers = {read_number(m) for m in values}
    except (ValueError, OverflowError):
        return unparsed("ambiguous")
    if len(numbers) > 1:
        return unparsed("ambiguous")
    value = numbers.pop()
    if not math.isfinite(value):
        return unparsed("ambiguous")
    if integer:
        if not value.is_integer():
            return unparsed("not_integer")
        value = int(value)
    return Parsed(value, rule)


# ---------------------------------------------------------------------------- tasks

class Splits(dict):
    """{split: questions} of a task. Looking up a split that is empty raises a DataError naming the
    task, the number of items and the size of every split, instead of handing an empty list to a
    stage that would fail far from the cause (or silently do nothing); iterating over the splits
    (``items()``, ``values()``) shows them as they are."""

    def __init__(self, parts: dict[str, list[Question]], task: str, n_items: int) -> None:
        super().__init__(parts)
        self.task, self.n_items = task, n_items

    def __getitem__(self, split: str) -> list[Question]:
        questions = super().__getitem__(split)
        if not questions:
            sizes = ", ".join(f"{name} {len(qs)}" for name, qs in self.items())
            raise DataError(f"task {self.task}: the {split!r} split is empty ({self.n_items} items loaded -> "
                            f"{sizes}); the data has too few items for a {split} split")
        return questions


class Task:
    """Base class. Subclasses set the class attributes and implement ``_load``."""

    name: ClassVar[str]
    kind: ClassVar[str]                 # "mc" | "numeric" | "open"
    description: ClassVar[str]
    source: ClassVar[str]               # where the data comes from (shown when a file is missing)
    extract_prompt: ClassVar[str | None] = "extract_multiple_choice"
    n_questions: ClassVar[int] = 625    # paper: sample up to 625 questions, seed 42
    split_ratio: ClassVar[tuple[float, float, float]] = (0.8, 0.1, 0.1)
    split_seed: ClassVar[int] = 42
    domain: ClassVar[str] = ""          # tasks of one domain form generalisation pairs
    options_header: ClassVar[str] = "\nOptions:\n"
    graded: ClassVar[bool] = True       # False: wrong answers all share proxy 0 (no proxy-ordered pairs)
    # The final answer: the opening the extraction instruction asks for (the text-mode parser reads
    # the number right after it; constrained mode prefills it), and what a numeric answer may hold.
    answer_phrase: ClassVar[str] = "The answer is"
    integer_answer: ClassVar[bool] = False
    answer_sign: ClassVar[bool] = False
    answer_decimal: ClassVar[bool] = False

    def __init__(self, data_dir: Path | str | None = None) -> None:
        self.data_dir = Path(data_dir) if data_dir is not None else paths.data_dir()
        self._items: list[Question] | None = None

    def __repr__(self) -> str:
        return f"<task {self.name}: {self.description}>"

    # -- data
    def path(self, relative: str) -> Path:
        path = self.data_dir / relative
        if not path.exists():
            raise missing_file(path, self.data_dir, f"task {self.name!r}", self.source)
        return path

    def _load(self) -> list[Question]:
        raise NotImplementedError

    def load(self) -> list[Question]:
        """Every usable item of the original files, in file order."""
        if self._items is None:
            items = self._load()
            seen: set[str] = set()
            for q in items:
                if q.qid in seen:
                    raise DataError(f"task {self.name}: duplicate question id {q.qid!r}")
                seen.add(q.qid)
            self._items = items
        return self._items

    def splits(self) -> Splits:
        """Sample up to ``n_questions`` with ``split_seed``, then cut train/val/test 8:1:1.
        Deterministic; a smaller profile takes a prefix of each split, so it is a subset.
        Asking for a split that came out empty (a file of 7 items has no test split) is a
        DataError naming the task, its item count and every split's size (``Splits``)."""
        items = self.load()
        chosen = random.Random(self.split_seed).sample(items, min(self.n_questions, len(items)))
        n_train = round(len(chosen) * self.split_ratio[0])
        n_val = round(len(chosen) * self.split_ratio[1])
        return Splits({"train": chosen[:n_train], "val": chosen[n_train:n_train + n_val],
                       "test": chosen[n_train + n_val:]}, task=self.name, n_items=len(items))

    def questions(self, split: str, n: int | None = None) -> list[Question]:
        """The first ``n`` questions of ``split`` (all if None), ready to ask and grade."""
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        items = self.splits()[split]
        return self.materialise(items if n is None else items[:n])

    def materialise(self, items: list[Question]) -> list[Question]:
        """Complete questions whose options or proxies are expensive (engine analyses, sentence
        embeddings); done only for the questions a run uses, and cached on disk."""
        return items

    # -- asking
    def query(self, q: Question, order: list[int] | None = None) -> str:
        """The task text after the CoT instruction: the query, then the options in ``order``."""
        if not q.is_mc:
            return q.query
        order = order if order is not None else list(range(len(q.options)))
        return q.query + self.options_header + self.format_options(q, order)

    def format_options(self, q: Question, order: list[int]) -> str:
        return "".join(f"{LETTERS[i]}. {q.options[j]}\n" for i, j in enumerate(order))

    def prompt(self, q: Question, order: list[int] | None = None) -> str:
        """The user turn of the paper's sampling protocol: CoT instruction + query + options."""
        return paths.prompt_text("cot") + self.query(q, order)

    def judge_query(self, q: Question) -> str:
        """What a judge sees as the instruction: the query without the CoT instruction and, for
        multiple choice, without the options (as in the paper's code: each sample saw them in a
        different order, so letters mean different things)."""
        return q.query

    def option_order(self, q: Question, sample_idx: int, seed: int) -> list[int] | None:
        """The permutation shown to sample ``sample_idx`` (position -> original option index);
        independent of how many samples are drawn."""
        if not q.is_mc:
            return None
        order = list(range(len(q.options)))
        random.Random(stable_seed(self.name, q.qid, sample_idx, seed)).shuffle(order)
        return order

    def extraction_instruction(self) -> str:
        if self.extract_prompt is None:
            raise ValueError(f"task {self.name} has no answer extraction (open-ended)")
        return paths.prompt_text(self.extract_prompt)

    def constraint(self, q: Question) -> str:
        """What a constrained final answer may be (``wowlib.llm.constrain``): this question's
        option letters, or a number (with a sign and a decimal point where the task allows)."""
        if self.kind == "mc":
            return "letters:" + LETTERS[:len(q.options)]
        if self.kind == "numeric":
            flags = [f for f, on in (("signed", self.answer_sign), ("decimal", self.answer_decimal)) if on]
            return "number" + (":" + ",".join(flags) if flags else "")
        raise ValueError(f"task {self.name} ({self.kind}) has no constrained final answer")

    # -- grading
    def parse(self, text: str, q: Question) -> Parsed:
        """The answer in the reply to the extraction turn, with the rule that read it (``Parsed``):
        the SHOWN option index (mc) or the number after ``answer_phrase`` (numeric)."""
        if self.kind == "mc":
            return parse_letter(text, len(q.options))
        if self.kind == "numeric":
            return parse_number(text, self.answer_phrase, integer=self.integer_answer)
        raise NotImplementedError

    def to_answer(self, parsed: float | None, order: list[int] | None) -> float | int | None:
        """Map a parsed reply to the answer in the ORIGINAL option order (mc) or keep the number."""
        if parsed is None or order is None:
            return parsed
        return order[int(parsed)]

    def proxy(self, q: Question, answer: Any) -> float | None:
        if answer is None:
            return None
        if self.kind == "mc":
            return float(q.option_proxies[int(answer)])
        raise NotImplementedError

    def is_correct(self, q: Question, answer: Any) -> bool:
        """Multiple choice: the chosen option has the highest proxy (the paper's rule)."""
        if answer is None:
            return False
        if self.kind == "mc":
            return q.option_proxies[int(answer)] == max(q.option_proxies)
        raise NotImplementedError

    @property
    def has_proxy(self) -> bool:
        return True


class MultipleChoiceTask(Task):
    kind = "mc"


def mc_question(task: str, qid: str, query: str, options: list[str], proxies: list[float],
                gold: int, where: str, meta: dict | None = None) -> Question:
    """Build and check a multiple-choice question (the gold option must have the top proxy)."""
    if len(options) != len(proxies) or not 2 <= len(options) <= len(LETTERS):
        raise DataError(f"{where}: {len(options)} options with {len(proxies)} proxies")
    if not 0 <= gold < len(options):
        raise DataError(f"{where}: gold index {gold} outside 0..{len(options) - 1}")
    if any(not 0.0 <= p <= 1.0 for p in proxies) or proxies[gold] != max(proxies):
        raise DataError(f"{where}: proxies must lie in [0, 1] with the gold highest, got {proxies}")
    return Question(task=task, qid=qid, query=query, options=tuple(options),
                    option_proxies=tuple(float(p) for p in proxies), gold=gold, meta=meta or {})
