"""MedMCQA (Pal et al., 2022): four-option medical questions; right/wrong only.

Only the validation split (``dev.json``, original JSONL) is available offline, so train, val and
test are all drawn from it. In this file ``cop`` is 1-based (1..4). Every wrong option has proxy 0,
so there are no proxy-ordered wrong-over-wrong pairs: the paper uses this task with score-judge
preferences only.
"""
from __future__ import annotations

from .base import (
    DataError,
    MultipleChoiceTask,
    Question,
    field_of,
    mc_question,
    read_jsonl,
    require_items,
)
from .registry import register

SOURCE = "MedMCQA validation split, github.com/medmcqa/medmcqa (dev.json; MIT)"


@register
class MedMCQA(MultipleChoiceTask):
    name = "medmcqa"
    description = "MedMCQA (4 options); binary proxy"
    source = SOURCE
    domain = "medical"
    graded = False

    def _load(self) -> list[Question]:
        path = self.path("medmcqa/dev.json")
        items = []
        for lineno, rec in read_jsonl(path, "one MedMCQA question (a JSON object) per line"):
            where = f"{path}: line {lineno}"
            options = [field_of(rec, key, str, where) for key in ("opa", "opb", "opc", "opd")]
            cop = field_of(rec, "cop", int, where)
            if not 1 <= cop <= 4:
                raise DataError(f"{where}: 'cop' must be 1..4 (1-based in this file), got {cop}")
            question = field_of(rec, "question", str, where)
            proxies = [1.0 if i == cop - 1 else 0.0 for i in range(4)]
            items.append(mc_question(self.name, str(field_of(rec, "id", str, where)),
                                     f"Question: {question}", options, proxies, cop - 1, where,
                                     meta={"subject": rec.get("subject_name")}))
        return require_items(items, path, "MedMCQA questions, one JSON object per line")
