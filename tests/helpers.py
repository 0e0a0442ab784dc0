"""Small helpers shared by the test modules."""

import time

# How long to wait for an event to be readable. A client's events go over a websocket; when the server dropped it (a
# missed ping on a loaded machine), they wait for Prefect's events client to notice at its next checkpoint (every 30
# s) and send them again, and then for the server's event persister (every 5 s). A full run here once missed a pod's
# health event after 30 s.
EVENT_SECONDS = 75


def eventually(check, timeout: float = 30, interval: float = 0.5):
    """Poll `check` until it is truthy (logs and events reach the server in batches, a moment late)."""
    deadline = time.monotonic() + timeout
    while not (result := check()) and time.monotonic() < deadline:
        time.sleep(interval)
    return result


def job_finished(ow, job_id: str, timeout: float = 120) -> bool:
    """Wait for a job that may not exist yet (a run started outside the SDK is tagged when it starts)."""
    from ow_prefect import NotFoundError

    def finished():
        try:
            return ow.jobs.retrieve(job_id).done
        except NotFoundError:
            return False

    return eventually(finished, timeout=timeout)
