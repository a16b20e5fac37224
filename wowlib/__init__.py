"""wowlib: the library behind the notebooks of "Varying Shades of Wrong", reproduced.

Stages, in the order data flows: ``tasks`` -> ``sample`` -> ``judge``/``elicit`` -> ``prefs`` ->
``align`` -> ``evaluate`` -> ``report``; ``store`` holds the run-directory layout and ``llm`` the
model backends. Submodules are imported on first use (``wl.sample``), so ``import wowlib`` stays
cheap and never pulls torch by itself.
"""
from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_SUBMODULES = {
    "paths", "tasks", "llm", "store", "sample", "judge", "elicit", "prefs", "align",
    "evaluate", "report", "config", "scale", "stats", "data", "seeds",
}


def show(*objects: Any):
    """The source of library functions, as a notebook shows them (the method in view, read from
    the code that runs it, never a copy that could drift)."""
    import inspect

    from IPython.display import Markdown
    return Markdown("\n\n".join(f"```python\n{inspect.getsource(obj).rstrip()}\n```" for obj in objects))


def __getattr__(name: str) -> Any:
    if name in _SUBMODULES:
        module = importlib.import_module(f"{__name__}.{name}")
        globals()[name] = module
        return module
    raise AttributeError(f"module 'wowlib' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | _SUBMODULES)
