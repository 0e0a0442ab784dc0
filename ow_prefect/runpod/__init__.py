"""A small typed client for RunPod's REST API v2 (pods, pod logs, GPU catalog).

Not the `runpod` SDK: its pod functions send GraphQL, which RunPod retires in early 2027 (see
docs/architecture.md). Facts the OpenAPI spec leaves out are in shared/runpod/NOTES.md of the project.

The names below are loaded on first use (PEP 562): the pod's own helpers in this package (run_state, health,
agent: docker/entrypoint.sh runs them on every pod start) need neither the client nor its models.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ow_prefect._lazy import lazy_names

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


__getattr__, __dir__ = lazy_names(
    __name__, ["ow_prefect.runpod.errors", "ow_prefect.runpod.models", "ow_prefect.runpod.client"]
)
