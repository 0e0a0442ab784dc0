"""ow_prefect: OpenWeights as a Prefect plugin.

    from ow_prefect import OpenWeights
    ow = OpenWeights()

Importing this package stays light (no Prefect server code, no torch): Prefect and the ML stack are
imported where they are used. The names below are loaded on first use (PEP 562), so that a process that needs
only one submodule — the pod's helpers run by docker/entrypoint.sh (`python -m ow_prefect.runpod.run_state`,
`...health`, `...agent`), a worker, Prefect's server loading its collections — does not pay for the SDK (~0.4 s of
CPU on every pod start).
"""

from __future__ import annotations

import importlib
import sys
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ow_prefect.client import AsyncOpenWeights, OpenWeights
    from ow_prefect.errors import (
        CodeMismatchError,
        ConfigurationError,
        DatasetValidationError,
        JobFailedError,
        NotFoundError,
        OWError,
        ParameterError,
        PrefectUnavailableError,
        StorageError,
    )
    from ow_prefect.jobs import Job, register
    from ow_prefect.jobs.custom import CustomJob
    from ow_prefect.jobs.custom import CustomJob as Jobs
    from ow_prefect.storage import FileObject

__version__ = "0.1.0"

# name -> (module, attribute); `Jobs` is OpenWeights' name for the base class of custom job types
_LAZY = {
    "AsyncOpenWeights": ("ow_prefect.client", "AsyncOpenWeights"),
    "OpenWeights": ("ow_prefect.client", "OpenWeights"),
    "CodeMismatchError": ("ow_prefect.errors", "CodeMismatchError"),
    "ConfigurationError": ("ow_prefect.errors", "ConfigurationError"),
    "DatasetValidationError": ("ow_prefect.errors", "DatasetValidationError"),
    "JobFailedError": ("ow_prefect.errors", "JobFailedError"),
    "NotFoundError": ("ow_prefect.errors", "NotFoundError"),
    "OWError": ("ow_prefect.errors", "OWError"),
    "ParameterError": ("ow_prefect.errors", "ParameterError"),
    "PrefectUnavailableError": ("ow_prefect.errors", "PrefectUnavailableError"),
    "StorageError": ("ow_prefect.errors", "StorageError"),
    "Job": ("ow_prefect.jobs", "Job"),
    "register": ("ow_prefect.jobs", "register"),
    "CustomJob": ("ow_prefect.jobs.custom", "CustomJob"),
    "Jobs": ("ow_prefect.jobs.custom", "CustomJob"),
    "FileObject": ("ow_prefect.storage", "FileObject"),
}

__all__ = [
    "AsyncOpenWeights",
    "CodeMismatchError",
    "ConfigurationError",
    "CustomJob",
    "DatasetValidationError",
    "FileObject",
    "Job",
    "JobFailedError",
    "Jobs",
    "NotFoundError",
    "OWError",
    "OpenWeights",
    "ParameterError",
    "PrefectUnavailableError",
    "StorageError",
    "register",
]


def __getattr__(name: str) -> Any:
    try:
        module, attribute = _LAZY[name]
    except KeyError:
        raise AttributeError(f"module 'ow_prefect' has no attribute {name!r}") from None
    value = getattr(importlib.import_module(module), attribute)
    globals()[name] = value  # once loaded, a plain attribute
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_LAZY])


# Prefect loads this package through the `prefect.collections` entry point; the worker types register
# with Prefect when their module is imported. Only do that when Prefect itself is loaded, so that
# `import ow_prefect` alone stays fast.
if "prefect" in sys.modules:
    import ow_prefect.workers  # noqa: F401
