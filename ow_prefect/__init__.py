"""ow_prefect: OpenWeights as a Prefect plugin.

    from ow_prefect import OpenWeights
    ow = OpenWeights()

Importing this package stays light (no Prefect server code, no torch): Prefect and the ML stack are
imported where they are used.
"""

from __future__ import annotations

import sys

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
from ow_prefect.storage import FileObject

Jobs = CustomJob  # OpenWeights' name for the base class of custom job types (`class MyJob(Jobs)`)

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

# Prefect loads this package through the `prefect.collections` entry point; the worker types register
# with Prefect when their module is imported. Only do that when Prefect itself is loaded, so that
# `import ow_prefect` alone stays fast.
if "prefect" in sys.modules:
    import ow_prefect.workers  # noqa: F401
