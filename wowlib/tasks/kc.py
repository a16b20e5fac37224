"""Knowledge Crosswords (Ding et al., 2023), multiple-choice form, three-blank items.

Each item is a small knowledge graph with three blanks. As in the paper, every question gets
four options with exactly 0, 1, 2 and 3 correctly filled blanks (the wrong blanks take a random
wrong candidate of that blank); proxy = share of right blanks.
"""
from __future__ import annotations

import random

from .base import (
    DataError,
    MultipleChoiceTask,
    Question,
    field_of,
    mc_question,
    read_jsonl,
    require_items,
)
from ..seeds import stable_seed
from .registry import register

SOURCE = ("Knowledge Crosswords, github.com/Wenwen-D/KnowledgeCrosswords, "
          "KnowledgeCrosswords_dataset/MC/MC_easy.jsonl and MC_medi.jsonl")
INSTRUCTION = "Instruction: Pick the correct answer for each blank that satisfies all the given constraints."
BLANKS = ("blank 1", "blank 2", "blank 3")


@register
class KnowledgeCrosswords(MultipleChoiceTask):
    name = "kc"
    description = "Knowledge Crosswords, 3 blanks; proxy = share of blanks right"
    source = SOURCE
    domain = "knowledge"
    options_header = "\nOptions: "

    def __init__(self, data_dir=None, variant: str = "MC_medi") -> None:
        super().__init__(data_dir)
        if variant not in ("MC_easy", "MC_medi", "MC_hard"):
            raise ValueError(f"kc variant must be MC_easy, MC_medi or MC_hard, got {variant!r}")
        self.variant = variant

    def _load(self) -> list[Question]:
        path = self.path(f"knowledge_crosswords/{self.variant}.jsonl")
        items, n_records = [], 0
        for lineno, rec in read_jsonl(path, "one Knowledge Crosswords item (a JSON object) per line"):
            n_records += 1
            where = f"{path}: line {lineno}"
            blanks = field_of(rec, "blanks", list, where)
            if len(blanks) != 3:
                continue                       # the paper keeps three-blank items only
            items.append(self._question(rec, where))
        return require_items(items, path, f"items with exactly 3 blanks (the paper's); none among the "
                                          f"{n_records} records of the file")

    def _question(self, rec: dict, where: str) -> Question:
        item_id = field_of(rec, "id", (str, int), where)
        sources = field_of(rec, "source", list, where)
        relations = field_of(rec, "relation", list, where)
        targets = field_of(rec, "target", list, where)
        candidates = field_of(rec, "options", dict, where)
        answers = field_of(rec, "answer_all", list, where)
        if not len(sources) == len(relations) == len(targets):
            raise DataError(f"{where}: source/relation/target lists differ in length")
        blanks = field_of(rec, "blanks", list, where)
        if (not all(isinstance(b, str) for b in blanks) or sorted(blanks) != list(BLANKS)
                or len(answers) != 3):
            raise DataError(f"{where}: expected blanks {list(BLANKS)} and 3 answers, got {blanks!r:.120}, "
                            f"{answers!r:.120}")
        for blank, answer in zip(BLANKS, answers):
            cands = candidates.get(blank)
            if not isinstance(cands, list) or answer not in cands or all(c == answer for c in cands):
                raise DataError(f"{where}: candidates of {blank!r} must be a list holding the answer "
                                f"{answer!r} and at least one wrong filler, got {cands!r}")
        rng = random.Random(stable_seed("kc", self.variant, item_id))
        fillings = []
        for n_right in range(4):               # exactly 0, 1, 2, 3 right blanks
            right = set(rng.sample(range(3), n_right))
            fillings.append([answers[k] if k in right else
                             rng.choice([c for c in candidates[BLANKS[k]] if c != answers[k]])
                             for k in range(3)])
        order = list(range(4))
        rng.shuffle(order)
        options = [", ".join(f"blank {k + 1}: {fillings[i][k]}" for k in range(3)) for i in order]
        proxies = [i / 3 for i in order]
        constraints = "".join(f"({s}, {r}, {t}); " for s, r, t in zip(sources, relations, targets))
        query = f"{INSTRUCTION}\nConstraints: {constraints}"
        return mc_question(self.name, f"{self.variant}-{item_id}", query, options, proxies,
                           gold=proxies.index(1.0), where=where)

    def format_options(self, q: Question, order: list[int]) -> str:
        # The paper's layout: all options on one line, "A. blank 1: x, blank 2: y, blank 3: z; B. ..."
        return "".join(f"{chr(65 + i)}. {q.options[j]}; " for i, j in enumerate(order)) + "\n\n"
