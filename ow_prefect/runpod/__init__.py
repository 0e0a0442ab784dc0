"""A small typed client for RunPod's REST API v2 (pods, pod logs, GPU catalog).

Not the `runpod` SDK: its pod functions send GraphQL, which RunPod retires in early 2027 (see
docs/architecture.md). Facts the OpenAPI spec leaves out are in shared/runpod/NOTES.md of the project.

The names below are loaded on first use (PEP 562): the pod's own helpers in this package (run_state, health,
agent: docker/entrypoint.sh runs them on every pod start) need neither the client nor its models.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ow_prefect.runpod.client import DEFAULT_BASE_URL, AsyncRunPodClient
    from ow_prefect.runpod.errors import (
        RunPodAuthError,
        RunPodConflict,
        RunPodError,
        RunPodInvalidSpec,
        RunPodNoCapacity,
        RunPodNotFound,
        RunPodPaymentRequired,
        RunPodRateLimited,
        RunPodServerError,
        RunPodUnreachable,
    )
    from ow_prefect.runpod.models import GpuType, LogLine, Pod

_MODULES = {
    "ow_prefect.runpod.client": ["DEFAULT_BASE_URL", "AsyncRunPodClient"],
    "ow_prefect.runpod.errors": [
        "RunPodAuthError",
        "RunPodConflict",
        "RunPodError",
        "RunPodInvalidSpec",
        "RunPodNoCapacity",
        "RunPodNotFound",
        "RunPodPaymentRequired",
        "RunPodRateLimited",
        "RunPodServerError",
        "RunPodUnreachable",
    ],
    "ow_prefect.runpod.models": ["GpuType", "LogLine", "Pod"],
}
_LAZY = {name: module for module, names in _MODULES.items() for name in names}

__all__ = [
    "DEFAULT_BASE_URL",
    "AsyncRunPodClient",
    "GpuType",
    "LogLine",
    "Pod",
    "RunPodAuthError",
    "RunPodConflict",
    "RunPodError",
    "RunPodInvalidSpec",
    "RunPodNoCapacity",
    "RunPodNotFound",
    "RunPodPaymentRequired",
    "RunPodRateLimited",
    "RunPodServerError",
    "RunPodUnreachable",
]


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'ow_prefect.runpod' has no attribute {name!r}")
    value = getattr(importlib.import_module(_LAZY[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_LAZY])
