"""Opt-in: one real RunPod pod, created, read and deleted (`pytest -m live_runpod`, needs RUNPOD_API_KEY).

Costs a few cents: the cheapest GPU pod in stock, deleted within about a minute. It checks the facts the fake
is built on (shared/runpod/NOTES.md): RUNNING right after create, our env returned by GET, the pod found by name,
DELETE ends it.
"""

import contextlib
import os
import secrets

import pytest

pytestmark = [
    pytest.mark.live_runpod,
    pytest.mark.skipif(not os.environ.get("RUNPOD_API_KEY"), reason="needs RUNPOD_API_KEY and internet"),
]


async def test_create_read_and_delete_one_real_pod():
    from ow_prefect.runpod import AsyncRunPodClient, RunPodNotFound
    from ow_prefect.runpod.offers import create_on_first, find_candidates

    name = f"ow-live-test-{secrets.token_hex(4)}"
    async with AsyncRunPodClient(os.environ["RUNPOD_API_KEY"]) as runpod:
        candidates = await find_candidates(runpod, min_vram_gb=8, clouds=("SECURE", "COMMUNITY"))
        assert candidates, "RunPod lists no GPU in stock right now"
        request = {"name": name, "image": "busybox:1.36", "args": "sleep 600", "env": {"OW_MARKER": "live"}, "disk": 5}
        pod, candidate = await create_on_first(runpod, request, candidates[:5])
        try:
            print(f"created {pod.id} on {candidate}: status {pod.status}, runtime {pod.runtime}")
            read = await runpod.get_pod(pod.id)
            assert read.name == name and read.env.get("OW_MARKER") == "live"
            assert [p.id for p in await runpod.find_pods(name)] == [pod.id]
        finally:
            assert await runpod.delete_pod(pod.id) is True
        with contextlib.suppress(RunPodNotFound):  # gone, or listed as TERMINATED for a while
            assert (await runpod.get_pod(pod.id)).status == "TERMINATED"
