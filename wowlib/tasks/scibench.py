"""SciBench (Wang et al., 2024) textbook problems: a numeric answer, correct within 5% (relative).

There is no graded proxy for wrong answers: proxy = 1 for a correct answer and 0 otherwise, so
the task has no proxy-ordered wrong-over-wrong pairs; the paper uses it with score-judge
preferences only.
"""
from __future__ import annotations

import math

from .base import DataError, Question, Task, field_of, read_json, require_items
from .registry import register

SOURCE = "SciBench, github.com/mandyyyyii/scibench, dataset/original/*.json (MIT)"
BOOKS = ("atkins", "calculus", "chemmc", "class", "diff", "fund", "matter", "quan", "stat", "thermo")
INSTRUCTION = ("Instruction: Please provide a clear and step-by-step solution for a scientific problem in the "
               "categories of Chemistry, Physics or Mathematics. The problem will specify the unit of "
               "measurement, which should not be included in the answer. Express the final answer as a decimal.")
TOLERANCE = 0.05


@register
class SciBench(Task):
    name = "scibench"
    kind = "numeric"
    description = "SciBench textbook problems; correct within 5%; binary proxy"
    source = SOURCE
    extract_prompt = "extract_science"
    answer_phrase = "The final answer is"    # the official extraction instruction's opening
    answer_sign = True
    answer_decimal = True
    domain = "science"
    graded = False

    def _load(self) -> list[Question]:
        items = []
        for book in BOOKS:
            path = self.path(f"scibench/{book}.json")
            records = read_json(path, "a JSON list of problems")
            if not isinstance(records, list):
                raise DataError(f"{path}: expected a JSON list of problems, got {type(records).__name__}")
            require_items(records, path, "SciBench problems (a non-empty JSON list)")
            for i, rec in enumerate(records):
                where = f"{path}: item {i}"
                if not isinstance(rec, dict):
                    raise DataError(f"{where}: expected an object, got {type(rec).__name__}")
                text = field_of(rec, "problem_text", str, where).strip()
                unit = field_of(rec, "unit", str, where)
                raw = field_of(rec, "answer_number", str, where)
                try:
                    gold = float(raw.replace(",", "").replace("\u2212", "-"))
                except ValueError:
                    raise DataError(f"{where}: answer_number {raw!r} is not a number") from None
                if not math.isfinite(gold):     # inf would make every answer correct, nan none
                    raise DataError(f"{where}: answer_number {raw!r} is not a finite number")
                pid = field_of(rec, "problemid", str, where).strip()
                items.append(Question(
                    task=self.name, qid=f"{book}-{i}-{pid}", gold=gold,
                    query=f"{INSTRUCTION}\nQuestion: {text} The desired unit for your answer is: {unit}.",
                    meta={"book": book}))
        return items

    def is_correct(self, q: Question, answer: float | None) -> bool:
        return answer is not None and abs(answer - q.gold) <= TOLERANCE * abs(q.gold)

    def proxy(self, q: Question, answer: float | None) -> float | None:
        return None if answer is None else float(self.is_correct(q, answer))
