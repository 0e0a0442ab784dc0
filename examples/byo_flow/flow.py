"""Bring your own flow: any Prefect flow can run on ow_prefect's `runpod` pool and use its storage and events.

This one counts the words of a stored file and stores the counts. `deploy.py` puts it on a pool.
"""

import json
import os
from collections import Counter

from prefect import flow
from prefect.events import emit_event

from ow_prefect import OpenWeights


@flow(name="word-count", log_prints=True)
def word_count(input_file: str, top: int = 3) -> dict:
    """Count the words of `input_file` (a file id in ow_prefect's storage); store the counts as a result file."""
    # Inside a pod the worker passes OW_STORAGE_BLOCK: this is the storage the client uploaded to.
    ow = OpenWeights()
    words = Counter(ow.files.content(input_file).decode().split())
    print(f"{sum(words.values())} words on pod {os.environ.get('RUNPOD_POD_ID', '(not on RunPod)')}")
    result = ow.files.create(json.dumps(dict(words.most_common())).encode(), purpose="result")
    # Prefect relates events emitted in a flow run to that run: they show on its page and in the event feed,
    # and automations can react to them.
    emit_event(
        event="word-count.counted",
        resource={"prefect.resource.id": f"word-count.{input_file}"},
        payload={"result_file": result.id, "top": words.most_common(top)},
    )
    return {"result_file": result.id}
