"""Multiple-choice tasks graded by embedding similarity to the gold option: MMLU-Pro (the paper's
proxy, with a local embedding model) and HellaSwag (our stand-in for the unavailable Vera)."""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

from .base import LETTERS, DataError, MultipleChoiceTask, Question, field_of, read_json, read_parquet, require_items
from .embeddings import ProxyCache, similarities_to_gold
from .registry import register

MMLU_SUBJECTS = (
    "anatomy", "business_ethics", "college_medicine", "high_school_biology",
    "high_school_european_history", "high_school_geography", "high_school_government_and_politics",
    "high_school_macroeconomics", "high_school_microeconomics", "high_school_us_history",
    "high_school_world_history", "international_law", "jurisprudence", "logical_fallacies", "management",
    "moral_disputes", "philosophy", "prehistory", "professional_law", "professional_medicine",
    "security_studies", "sociology", "world_religions",
)


def _index(value, where: str) -> int:
    """An option index from a parquet cell: an integer, or a float holding one (a column with a
    missing value is read as floats); NaN, a fraction, a bool or text is a DataError."""
    import numpy as np
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise DataError(f"{where}: answer_index should be an integer, got {type(value).__name__} {value!r:.40}")
    if not math.isfinite(value) or not float(value).is_integer():
        raise DataError(f"{where}: answer_index should be an integer, got {value!r:.40}")
    return int(value)


class SimilarityTask(MultipleChoiceTask):
    """Options load cheaply; proxies are computed for the questions a run uses (materialise)."""

    data_file: str

    def materialise(self, items: list[Question]) -> list[Question]:
        cache = ProxyCache(self.name, self.path(self.data_file))
        todo = [q for q in items if q.qid not in cache.values]
        if todo:
            sims = similarities_to_gold([list(q.options) for q in todo], [q.gold for q in todo])
            cache.values.update({q.qid: s for q, s in zip(todo, sims)})
            cache.save()
        return [dataclasses.replace(q, option_proxies=tuple(cache.values[q.qid])) for q in items]

    def is_correct(self, q: Question, answer) -> bool:
        return answer is not None and int(answer) == q.gold

    def _check(self, options: Sequence, gold: int, where: str) -> None:
        if not 2 <= len(options) <= len(LETTERS) or not all(isinstance(o, str) for o in options):
            raise DataError(f"{where}: expected 2..26 option strings, got {options!r:.120}")
        if not 0 <= gold < len(options):
            raise DataError(f"{where}: gold index {gold} outside 0..{len(options) - 1}")


@register
class MMLUPro(SimilarityTask):
    name = "mmlu_pro"
    description = "MMLU-Pro, the paper's 23 non-STEM MMLU subjects; proxy = MiniLM similarity to gold"
    source = "MMLU-Pro test split (TIGER-Lab/MMLU-Pro, data/test-00000-of-00001.parquet; MIT)"
    data_file = "mmlu_pro/test-00000-of-00001.parquet"
    domain = "knowledge"

    def _load(self) -> list[Question]:
        import numpy as np
        path = self.path(self.data_file)
        frame = read_parquet(path, ("question_id", "question", "options", "answer_index", "src"),
                             "MMLU-Pro questions (one per row)")
        keep = frame[frame["src"].isin([f"ori_mmlu-{s}" for s in MMLU_SUBJECTS])]
        items = []
        for row_no, row in keep.iterrows():
            qid = row["question_id"]
            where = f"{path}: row {row_no} (question_id {qid!r})"
            if not isinstance(qid, (str, int, np.integer)) or isinstance(qid, bool) or qid == "":
                raise DataError(f"{where}: question_id should be an integer or a string")
            if not isinstance(row["question"], str) or not row["question"].strip():
                raise DataError(f"{where}: question should be a non-empty string, got {row['question']!r:.80}")
            options = row["options"]
            if not isinstance(options, (list, tuple, np.ndarray)) or getattr(options, "ndim", 1) != 1:
                raise DataError(f"{where}: options should be a list of strings, got {type(options).__name__} "
                                f"{options!r:.80}")
            options = list(options)
            gold = _index(row["answer_index"], where)
            self._check(options, gold, where)
            items.append(Question(task=self.name, qid=str(qid), gold=gold,
                                  query=f"Question: {row['question']}", options=tuple(options),
                                  meta={"subject": row["src"].removeprefix("ori_mmlu-")}))
        if not items:
            seen = sorted({str(v) for v in frame["src"].unique()})
            shown = ", ".join(seen[:12]) + (f", ... ({len(seen)} distinct)" if len(seen) > 12 else "")
            raise DataError(f"{path}: 0 items in the paper's {len(MMLU_SUBJECTS)} subjects (src values "
                            f"'ori_mmlu-<subject>', e.g. 'ori_mmlu-{MMLU_SUBJECTS[0]}') among its "
                            f"{len(frame)} rows; src values seen: {shown}")
        return items


@register
class HellaSwag(SimilarityTask):
    name = "hellaswag"
    description = "HellaSwag (A-D); stand-in proxy = MiniLM similarity of the ending to the gold ending"
    source = ("HellaSwag in A-D form (the AbstainQA copy, data/hellaswag.json, with 'dev' and 'test' lists; "
              "HellaSwag: MIT)")
    data_file = "hellaswag/hellaswag.json"
    domain = "commonsense"

    def _load(self) -> list[Question]:
        path = self.path(self.data_file)
        raw = read_json(path, "an object with 'dev' and 'test' lists of HellaSwag items")
        if not isinstance(raw, dict) or not all(isinstance(raw.get(k), list) for k in ("dev", "test")):
            raise DataError(f"{path}: expected an object with 'dev' and 'test' lists")
        items = []
        for part in ("dev", "test"):
            for i, rec in enumerate(raw[part]):
                where = f"{path}: {part}[{i}]"
                if not isinstance(rec, dict):
                    raise DataError(f"{where}: expected an object, got {type(rec).__name__}")
                choices = field_of(rec, "choices", dict, where)
                letters = sorted(choices)
                answer = field_of(rec, "answer", str, where)
                if answer not in choices:
                    raise DataError(f"{where}: answer {answer!r} is not one of the choices {letters}")
                options = [choices[k] for k in letters]
                self._check(options, letters.index(answer), where)
                items.append(Question(
                    task=self.name, qid=f"{part}-{i}", gold=letters.index(answer), options=tuple(options),
                    query=("Instruction: Pick the correct completion for given context.\n"
                           f"Context: {field_of(rec, 'question', str, where)}")))
        return require_items(items, path, "HellaSwag items in the 'dev' and 'test' lists (both are empty)")

    def format_options(self, q: Question, order: list[int]) -> str:
        return "".join(f'{LETTERS[i]}. "{q.options[j]}"\n' for i, j in enumerate(order))
