"""Tasks whose proxy needs resources that cannot be had here: BioGeneration and COM2.

BioGeneration (FActScore biographies): the paper grades with FActScore, which needs a 20 GB
Wikipedia database and ChatGPT. The task loads the prompts; its proxy is a pluggable ``scorer``
(``scorer(topic, response) -> float in [0, 1]``). Without one, asking for a proxy raises
ProxyUnavailable instead of inventing scores.

COM2 (complex commonsense, multiple choice): the paper grades wrong options with the Vera
plausibility model, which is not obtainable offline, and the data is only on a dataset hub. The
loader reads the original CSV so users who have it can sample and judge; proxies are unavailable.
"""
from __future__ import annotations

import ast
from collections.abc import Callable

from .base import (
    DataError,
    MultipleChoiceTask,
    Parsed,
    ProxyUnavailable,
    Question,
    Task,
    field_of,
    read_csv,
    read_jsonl,
    require_items,
    unparsed,
)
from .registry import register

Scorer = Callable[[str, str], float]


@register
class BioGeneration(Task):
    name = "biogeneration"
    kind = "open"
    description = "FActScore biographies (prompts only; proxy needs a FActScore backend)"
    source = ("FActScore prompts, github.com/shmsw25/FActScore (data/labeled or unlabeled prompt "
              "files; the copy used here: ICD data/factscore/GPT-4.jsonl, `input` and `topic` columns)")
    extract_prompt = None
    domain = "biography"

    def __init__(self, data_dir=None, scorer: Scorer | None = None) -> None:
        super().__init__(data_dir)
        self.scorer = scorer

    def _load(self) -> list[Question]:
        path = self.path("biogeneration/GPT-4.jsonl")
        items = []
        for lineno, rec in read_jsonl(path, "one FActScore prompt (a JSON object with 'topic' and 'input') "
                                            "per line"):
            where = f"{path}: line {lineno}"
            topic = field_of(rec, "topic", str, where)
            items.append(Question(task=self.name, qid=topic, query=field_of(rec, "input", str, where),
                                  meta={"topic": topic}))
        return require_items(items, path, "FActScore prompts, one JSON object per line")

    @property
    def has_proxy(self) -> bool:
        return self.scorer is not None

    def _require_scorer(self) -> Scorer:
        if self.scorer is None:
            raise ProxyUnavailable(
                "biogeneration: the paper's proxy is FActScore (needs its 20 GB Wikipedia database and an "
                "OpenAI key); pass scorer=callable(topic, response) -> [0, 1] to get_task('biogeneration', ...)")
        return self.scorer

    def parse(self, text: str, q: Question) -> Parsed:
        text = text.strip()                    # the answer is the response itself
        return Parsed(text, "response") if text else unparsed("empty")

    def proxy(self, q: Question, answer: str | None) -> float | None:
        scorer = self._require_scorer()
        if answer is None:
            return None
        score = float(scorer(q.meta["topic"], answer))
        if not 0.0 <= score <= 1.0:
            raise ValueError(f"biogeneration scorer returned {score} for {q.qid!r}; expected [0, 1]")
        return score

    def is_correct(self, q: Question, answer: str | None) -> bool:
        proxy = self.proxy(q, answer)
        return proxy is not None and proxy >= 0.9   # the paper's threshold




@register
class COM2(MultipleChoiceTask):
    name = "com2"
    description = "COM2 complex commonsense (loader only; Vera proxy unavailable)"
    source = ("COM2 (Fang et al., ACL 2024), distributed on the Hugging Face hub; put the original "
              "CSV at com2/com2.csv in the data directory")
    domain = "commonsense"
    instruction = ("Instruction: As an expert in commonsense reasoning, your task is to provide a concise "
                   "response to a question based on the given context. The question focuses on studying the "
                   "causes, effects, or attributes of personas related to the given context.")

    def __init__(self, data_dir=None, file: str = "com2/com2.csv") -> None:
        super().__init__(data_dir)
        self.file = file

    def _load(self) -> list[Question]:
        path = self.path(self.file)
        items, n_rows = [], 0
        rows = read_csv(path, ("question", "context", "options", "label", "type"), "COM2 items, one per row")
        for line, row in rows:
            n_rows += 1
            row_no = n_rows + 1        # the question id counts data rows from 2, as it always has;
            where = f"{path}: line {line}"   # ``line`` differs when a quoted field spans lines
            try:
                label = int(row["label"])
                options = ast.literal_eval(row["options"])   # a Python list literal; never eval
            except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
                raise DataError(f"{where}: 'label' must be an int and 'options' a list literal") from None
            if not isinstance(options, list) or not all(isinstance(o, str) for o in options):
                raise DataError(f"{where}: 'options' must be a list of strings")
            # The paper keeps multi-hop (2i/3i) items whose answer is not "none of the above".
            if label == 4 or not ("2i" in row["type"] or "3i" in row["type"]):
                continue
            options = options[:-1]
            if not 0 <= label < len(options):
                raise DataError(f"{where}: label {label} outside the {len(options)} options")
            items.append(Question(
                task=self.name, qid=f"com2-{row_no}", gold=label, options=tuple(options),
                option_proxies=(),
                query=f"{self.instruction}\nContext: {row['context']}\nQuestion: {row['question']}"))
        return require_items(items, path, f"multi-hop (type 2i/3i) items whose answer is not 'none of the "
                                          f"above' (label 4), the paper's COM2 items; none among the "
                                          f"{n_rows} rows")

    @property
    def has_proxy(self) -> bool:
        return False

    def proxy(self, q: Question, answer) -> float | None:
        raise ProxyUnavailable("com2: the paper's proxy is the Vera plausibility model (liujch1998/vera), "
                               "which is not available offline; COM2 can be sampled and judged, not graded")

    def is_correct(self, q: Question, answer) -> bool:
        return answer is not None and int(answer) == q.gold
