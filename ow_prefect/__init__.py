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

from typing import TYPE_CHECKING

from ow_prefect._lazy import lazy_names

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


# `Jobs` is OpenWeights' name for the base class of custom job types (`class MyJob(Jobs)`); the SDK's modules come
# last: they import the others.
__getattr__, __dir__ = lazy_names(
    __name__,
    ["ow_prefect.errors", "ow_prefect.jobs", "ow_prefect.jobs.custom", "ow_prefect.storage", "ow_prefect.client"],
    aliases={"Jobs": "CustomJob"},
)
