"""Small flows that the RunPod worker tests deploy on a `runpod` pool (they run inside fake pods)."""

import time

from prefect import flow


@flow(name="pod-sleeper", log_prints=True)
def sleeper(seconds: float = 1.0, fail: bool = False, payload: str | None = None) -> str:
    """Sleep; then store `payload` (when given) in ow_prefect's storage, as a job stores its outputs."""
    print(f"sleeping {seconds} s")
    time.sleep(seconds)
    if fail:
        raise RuntimeError("asked to fail")
    if payload is None:
        return "done"
    from ow_prefect.storage import Storage

    stored = Storage.from_settings().put_bytes(payload.encode(), "result", filename="payload.txt")
    print(f"stored {stored.id}")
    return stored.id
