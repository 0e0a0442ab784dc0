"""RunPod's HTTP errors as typed exceptions: the one place that reads status codes and problem details."""

from __future__ import annotations

from typing import Any

from ow_prefect.errors import OWError
from ow_prefect.retry import retry_after_seconds

CAPACITY_PHRASES = ("no longer any instances available", "no instances available", "not enough free gpus")


class RunPodError(OWError):
    """An error answer from RunPod. `retryable` says whether the same request may succeed later."""

    retryable = False

    def __init__(
        self,
        message: str,
        *,
        status: int | None = None,
        detail: str | None = None,
        method: str | None = None,
        path: str | None = None,
    ):
        super().__init__(message)
        self.status = status
        self.detail = detail
        self.method = method
        self.path = path


class RunPodAuthError(RunPodError):
    """401/403: the API key is missing, wrong or lacks the permission. Never retried."""


class RunPodPaymentRequired(RunPodError):
    """402: the account's balance is too low. Stop trying until it is topped up."""


class RunPodNoCapacity(RunPodError):
    """400 with RunPod's capacity message: nothing free for this GPU type, cloud and data centers now.

    Not retried by the client: the caller moves on to its next candidate (GPU type, cloud, data center).
    `tried` lists the candidates a caller walked before giving up (empty for a single answer).
    """

    def __init__(self, message: str, *, tried: list[str] | None = None, **kwargs: Any):
        super().__init__(message, **kwargs)
        self.tried = tried or []


class RunPodInvalidSpec(RunPodError):
    """400/422: the request itself is wrong (unknown field, bad value). Never retried."""


class RunPodNotFound(RunPodError):
    """404: no such pod (for a delete: it is already gone)."""


class RunPodConflict(RunPodError):
    """409: the action is not allowed in the pod's current status."""


class RunPodRateLimited(RunPodError):
    """429: too many requests; `retry_after` seconds (from the header) before the next one."""

    retryable = True

    def __init__(self, message: str, *, retry_after: float | None = None, **kwargs: Any):
        super().__init__(message, **kwargs)
        self.retry_after = retry_after


class RunPodServerError(RunPodError):
    """5xx: RunPod's side failed; retried with back-off."""

    retryable = True


class RunPodUnreachable(RunPodError):
    """No answer at all (connection refused, reset, timed out) after the retries."""

    retryable = True


def problem_detail(body: Any) -> str:
    if isinstance(body, dict):
        return str(body.get("detail") or body.get("title") or body.get("error") or body)
    return str(body)[:500]


def translate(status: int, body: Any, *, method: str, path: str, retry_after: str | None = None) -> RunPodError:
    """The typed exception for an error answer, with a message that says what to do."""
    detail = problem_detail(body)
    where = {"status": status, "detail": detail, "method": method, "path": path}
    if status in (401, 403):
        return RunPodAuthError(
            f"RunPod refused the API key ({status}: {detail}); check the RunPod credentials block or RUNPOD_API_KEY",
            **where,
        )
    if status == 402:
        return RunPodPaymentRequired(f"RunPod account balance too low ({detail}); top it up, then retry", **where)
    if status == 404:
        return RunPodNotFound(f"{method} {path}: not found ({detail})", **where)
    if status == 409:
        return RunPodConflict(f"{method} {path}: not allowed now ({detail})", **where)
    if status == 429:
        return RunPodRateLimited(f"RunPod rate limit ({detail})", retry_after=retry_after_seconds(retry_after), **where)
    if status >= 500:
        return RunPodServerError(f"RunPod server error {status} on {method} {path}: {detail}", **where)
    if status == 400 and any(phrase in detail.lower() for phrase in CAPACITY_PHRASES):
        return RunPodNoCapacity(f"no capacity: {detail}", **where)
    return RunPodInvalidSpec(f"RunPod rejected {method} {path} ({status}): {detail}", **where)
