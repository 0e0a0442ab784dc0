"""The job types by name: `register` makes one available as ``ow.<name>`` on every client.

It sits above `base` (the `Job` class) and `custom` (custom job types), neither of which imports it back: a class
written in OpenWeights' spelling (a `Job` with `mount` / `params` / `get_entrypoint`) becomes a `CustomJob` here,
and the built-in `custom` type, whose class lives in `custom.py`, is registered here too.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable

from ow_prefect.jobs.base import Job
from ow_prefect.jobs.custom import CommandJob, CustomJob

_REGISTRY: dict[str, type[Job]] = {}
# The built-in types register themselves when their module is imported. A lookup imports them first, so that a
# process that never imported the SDK (a worker, a flow run: `import ow_prefect` is lazy) knows them all too.
_BUILTIN_MODULES = ("api", "evals", "finetune", "inference", "logprob")
_builtins_loaded = False


def _load_builtins() -> None:
    global _builtins_loaded
    if not _builtins_loaded:
        _builtins_loaded = True
        for module in _BUILTIN_MODULES:
            importlib.import_module(f"ow_prefect.jobs.{module}")


def register(name: str) -> Callable[[type[Job]], type[Job]]:
    """Class decorator: make the job type available as ``ow.<name>`` on every client."""
    if not name.isidentifier() or name.startswith("_"):
        raise ValueError(f"job type name {name!r} must be a Python identifier not starting with '_'")

    def decorator(cls: type[Job]) -> type[Job]:
        if not (isinstance(cls, type) and issubclass(cls, Job)):
            raise TypeError(f"@register({name!r}) decorates Job subclasses, not {cls!r}")
        if not hasattr(cls, "deployment") and "get_entrypoint" in vars(cls):
            # OpenWeights' spelling, `class MyJob(Job)` with mount/params/get_entrypoint: a custom job type
            cls = type(cls.__name__, (cls, CustomJob), {"__module__": cls.__module__, "__doc__": cls.__doc__})
        for attr in ("deployment", "entrypoint", "params"):
            if not hasattr(cls, attr):
                raise TypeError(f"job type {cls.__name__} must define '{attr}'")
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return decorator


def get_job_type(name: str) -> type[Job]:
    _load_builtins()
    try:
        return _REGISTRY[name]
    except KeyError:
        raise AttributeError(f"no job type '{name}' is registered; known: {sorted(_REGISTRY)}") from None


def job_types() -> dict[str, type[Job]]:
    _load_builtins()
    return dict(_REGISTRY)


register("custom")(CommandJob)
