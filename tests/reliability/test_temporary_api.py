"""The client process that holds a TemporaryApi is killed (SIGKILL: no down(), no goodbye): the API on its RunPod
(fake) pod stops once its keep-alive deadline passes, the run ends Cancelled, and the pod is deleted."""

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from ow_prefect import OpenWeights
from tests.helpers import eventually
from tests.runpod_support import POD_COMMAND, assert_clean, deploy, pods_of
from tests.test_api import port_closed

pytestmark = pytest.mark.slow

SUFFIX = "-reliability"


def test_an_api_on_a_pod_stops_after_its_client_is_killed(
    fake, prefect_client, runpod_pool, runpod_worker, runpod_worker_log, use_server, tiny_model, tmp_path
):
    # the session's runpod worker and pool (tests/runpod_support.py); a real flow run in the pod
    entrypoint = "flows/vllm_api/flow.py:vllm_api"
    deploy(prefect_client, runpod_pool, f"serve{SUFFIX}", entrypoint=entrypoint, command=POD_COMMAND)
    script = tmp_path / "client.py"
    script.write_text(
        textwrap.dedent(
            f"""
            import asyncio
            from ow_prefect import AsyncOpenWeights

            async def main():
                ow = AsyncOpenWeights()
                api = ow.api.deploy({str(tiny_model)!r}, max_model_len=256, max_num_seqs=2, keep_alive=8)
                async with api as client:  # an AsyncOpenAI
                    reply = await client.chat.completions.create(
                        model={str(tiny_model)!r}, messages=[{{"role": "user", "content": "hi"}}], max_tokens=3
                    )
                    print("UP", api.job_id, api.base_url, reply.usage.completion_tokens, flush=True)
                    await asyncio.sleep(3600)

            asyncio.run(main())
            """
        )
    )
    env = {**os.environ, "PREFECT_API_URL": use_server, "OW_DEPLOYMENT_SUFFIX": SUFFIX}
    client = subprocess.Popen([sys.executable, str(script)], env=env, stdout=subprocess.PIPE, text=True)
    try:
        line = client.stdout.readline()
        assert line.startswith("UP"), f"{line}\n{runpod_worker_log.read_text()[-3000:]}"
        _, job_id, base_url, tokens = line.split()
        assert int(tokens) >= 1
        client.send_signal(signal.SIGKILL)
        killed_at = time.monotonic()
    finally:
        client.kill()
        client.wait()
    ow = OpenWeights()
    job = ow.jobs.retrieve(job_id)
    (pod,) = pods_of(fake, job.flow_run_id)
    assert f":{pod.port_map['8000/http']}/" in base_url, "the client reached the API through the pod's port"
    assert eventually(lambda: ow.jobs.retrieve(job_id).done, timeout=120)
    job = ow.jobs.retrieve(job_id)
    assert job.status == "canceled" and "keep-alive deadline passed" in job.error
    assert time.monotonic() - killed_at >= 5  # not before its deadline
    assert port_closed(base_url)
    assert_clean(fake)
