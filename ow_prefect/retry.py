"""The one retry policy of ow_prefect, on tenacity: exponential back-off with full jitter, a server's own delay
(`Retry-After`) honoured but capped, and a give-up after a number of attempts.

Each call site declares its `RetryRules` where the call is, beside a comment that says whether the call is
idempotent: which errors may succeed when asked again (`retry_on`), where a server's delay is read
(`retry_after`, or None when the server sends none), how many attempts, how fast the back-off grows. A call
that is not idempotent (creating a pod) is never retried blindly: its site checks whether the first try took
effect before asking again.

    RULES = RetryRules(retry_on=lambda e: isinstance(e, Busy), attempts=5, initial_s=0.5, max_s=30)

    answer = await RULES.acall(client.get, "/things")

S3 is the exception: botocore retries its own calls (see `ow_prefect.storage`), and we configure that instead of
wrapping it in a second loop.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:  # tenacity is imported when a call is made, keeping `import ow_prefect` light
    import tenacity

T = TypeVar("T")

RETRY_AFTER_CAP_S = 120.0  # a server asking for longer is not waited for blindly (openai-python caps it the same)


def retry_after_seconds(value: str | None) -> float | None:
    """A `Retry-After` header given in seconds (the form our servers send), or None when absent or unreadable."""
    try:
        return max(0.0, float(value)) if value is not None else None
    except ValueError:
        return None


@dataclass(frozen=True)
class RetryRules:
    """When and how one kind of call is tried again.

    - `retry_on(error)`: True when the same call may succeed later (no connection, 5xx, 429...). Anything else
      is raised at once, unchanged.
    - `retry_after(error)`: the delay the server asked for, in seconds, or None; honoured up to two minutes
      instead of the back-off.
    - `attempts`: give up after this many attempts (the first included); the last error is raised unchanged.
    - back-off: a random delay between 0 and ``min(max_s, initial_s * 2**(attempt - 1))`` (full jitter, so
      that many clients failing together do not come back together).
    """

    retry_on: Callable[[BaseException], bool]
    attempts: int = 5
    initial_s: float = 1.0
    max_s: float = 30.0
    retry_after: Callable[[BaseException], float | None] | None = None

    def wait_s(self, retry_state: tenacity.RetryCallState) -> float:
        """How long to wait before the next attempt."""
        import tenacity

        error = retry_state.outcome.exception() if retry_state.outcome else None
        asked = self.retry_after(error) if self.retry_after is not None and error is not None else None
        if asked is not None:
            return min(asked, RETRY_AFTER_CAP_S)
        return tenacity.wait_random_exponential(multiplier=self.initial_s, max=self.max_s)(retry_state)

    def _arguments(self) -> dict[str, Any]:
        import tenacity

        return {
            "retry": tenacity.retry_if_exception(self.retry_on),
            "stop": tenacity.stop_after_attempt(self.attempts),
            "wait": self.wait_s,
            "reraise": True,
        }

    async def acall(self, fn: Callable[..., Awaitable[T]], *args: Any, **kwargs: Any) -> T:
        """``await fn(*args, **kwargs)``, tried again (waits with asyncio.sleep) by these rules."""
        import tenacity

        return await tenacity.AsyncRetrying(**self._arguments())(fn, *args, **kwargs)
