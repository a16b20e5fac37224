"""Tasks: the paper's datasets in their original formats, with prompts, parsing and proxies.

``get_task(name)`` returns a task; ``task.questions(split, n)`` the first ``n`` questions of a
deterministic train/val/test split. See ``base.py`` for the design.
"""
from . import chess, kc, medmcqa, nlgraph, open_ended, scibench, similarity  # noqa: F401  (register)
from .base import (
                   LETTERS,
                   SPLITS,
                   Parsed,
                   DataError,
                   ProxyUnavailable,
                   Question,
                   Task,
                   parse_letter,
                   parse_number,
)
from .nlgraph import generate_problems, write_problems
from .registry import get_task, register, task_names

__all__ = [
                   "LETTERS",
                   "SPLITS",
                   "Parsed",
                   "DataError",
                   "ProxyUnavailable",
                   "Question",
                   "Task",
                   "generate_problems",
                   "get_task",
                   "parse_letter",
                   "parse_number",
                   "register",
                   "task_names",
                   "write_problems",
]
