"""Tasks: the paper's datasets in their original formats, with prompts, parsing and proxies.

``get_task(name)`` returns a task; ``task.questions(split, n)`` the first ``n`` questions of a
deterministic train/val/test split. See ``base.py`` for the design.
"""
from .base import (LETTERS, SPLITS, DataError, ProxyUnavailable, Question, Task, parse_letter,
                   parse_number)
from .registry import get_task, register, task_names
from . import chess, kc, medmcqa, nlgraph, open_ended, scibench, similarity  # noqa: F401  (register)
from .nlgraph import generate_problems, write_problems

__all__ = ["LETTERS", "SPLITS", "DataError", "ProxyUnavailable", "Question", "Task", "get_task",
           "register", "task_names", "parse_letter", "parse_number", "generate_problems", "write_problems"]
