"""Seeds derived from text: the same in every process, on every machine and Python version
(Python's own ``hash`` of a string changes per process). Every stage and both model backends take
their random streams from here."""
from __future__ import annotations

import hashlib
from typing import Any


def stable_seed(*parts: Any) -> int:
    """A 64-bit seed derived from the parts' text."""
    digest = hashlib.sha256("\x1f".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "little")
