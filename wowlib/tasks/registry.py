"""Task registry: ``get_task(name)`` returns a ready task object."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from .base import Task

_REGISTRY: dict[str, type[Task]] = {}
_INSTANCES: dict[tuple, Task] = {}


def register(cls: type[Task]) -> type[Task]:
    if cls.name in _REGISTRY:
        raise ValueError(f"task name {cls.name!r} registered twice")
    _REGISTRY[cls.name] = cls
    return cls


def task_names() -> list[str]:
    return sorted(_REGISTRY)


def get_task(name: str, data_dir: Path | str | None = None, **options: Any) -> Task:
    """The task called ``name``; one shared instance per (name, data directory, options), so
    loaded items and proxy caches are reused across notebook cells."""
    if name not in _REGISTRY:
        raise KeyError(f"unknown task {name!r}; known tasks: {', '.join(task_names())}")
    from .. import paths
    key = (name, str(Path(data_dir) if data_dir is not None else paths.data_dir()),
           tuple(sorted(options.items())))
    if key not in _INSTANCES:
        _INSTANCES[key] = _REGISTRY[name](data_dir=data_dir, **options)
    return _INSTANCES[key]
