"""Small helpers shared by the test modules."""

import time


def eventually(check, timeout: float = 30, interval: float = 0.5):
    """Poll `check` until it is truthy (logs and events reach the server in batches, a moment late)."""
    deadline = time.monotonic() + timeout
    while not (result := check()) and time.monotonic() < deadline:
        time.sleep(interval)
    return result
