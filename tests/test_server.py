"""End to end on a real Prefect server with a real `process` worker: SDK -> deployment run -> worker ->
`custom/run` -> storage -> outputs -> download. Dedupe, retry, cancel and concurrency are checked against
the server's own records."""

import asyncio
import os
from concurrent.futures import ThreadPoolExecutor

import pytest

from ow_prefect import AsyncOpenWeights, ConfigurationError, OpenWeights, PrefectUnavailableError
from ow_prefect.jobs.submit import job_tag
from tests.helpers import eventually, job_finished

pytestmark = pytest.mark.usefixtures("worker", "use_server")

SCRIPT = """
import json, os
print("running on the worker", os.environ["OW_JOB_ID"])
open("uploads/report.txt", "w").write("done")
json.dump({"accuracy": 0.75}, open(os.environ["OW_OUTPUTS"], "w"))
"""

FLAKY = """
import os, pathlib, sys
marker = pathlib.Path(os.environ["OW_HOME"], "flaky-" + sys.argv[1])
if not marker.exists():
    marker.write_text("failed once")
    sys.exit("first attempt fails on purpose")
print("second attempt works")
"""


def count_runs(job_id: str) -> int:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterTags

    with get_client(sync_client=True) as client:
        return len(client.read_flow_runs(flow_run_filter=FlowRunFilter(tags=FlowRunFilterTags(all_=[job_tag(job_id)]))))


def test_submit_run_download_and_resubmit(script_file, tmp_path):
    ow = OpenWeights()
    assert not ow.embedded
    file_id = script_file(SCRIPT)
    job = ow.custom.create(entrypoint="python job.py", mounts={"job.py": file_id})
    assert job.status in ("pending", "in_progress") and job.flow_run_id
    job = job.wait(timeout=120, poll_interval=0.5)
    assert job.outputs["accuracy"] == 0.75 and set(job.outputs["files"]) == {"report.txt"}
    assert (job.download(tmp_path / "out") / "report.txt").read_text() == "done"
    assert eventually(lambda: f"running on the worker {job.id}" in job.logs())
    assert eventually(lambda: any(e["event"] == "prefect.flow-run.Completed" for e in job.events()))

    again = ow.custom.create(mounts={"job.py": file_id}, entrypoint="python job.py")
    assert (again.id, again.flow_run_id, again.status) == (job.id, job.flow_run_id, "completed")
    assert count_runs(job.id) == 1


def test_resubmitting_a_failed_job_reruns_the_same_flow_run(script_file):
    ow = OpenWeights()
    params = {"entrypoint": f"python flaky.py {os.getpid()}", "mounts": {"flaky.py": script_file(FLAKY)}}
    failed = ow.custom.create(**params).wait(timeout=120, poll_interval=0.5, raise_on_failure=False)
    assert failed.status == "failed" and "first attempt fails on purpose" in failed.error

    rerun = ow.custom.create(**params)
    assert rerun.flow_run_id == failed.flow_run_id and rerun.status == "pending"
    rerun = rerun.wait(timeout=120, poll_interval=0.5)
    assert rerun.run_count == 2 and rerun.flow_run_id == failed.flow_run_id
    assert count_runs(rerun.id) == 1


def test_restart_reruns_a_completed_job(script_file):
    ow = OpenWeights()
    job = ow.custom.create(entrypoint="echo restart-me").wait(timeout=120, poll_interval=0.5)
    restarted = ow.jobs.restart(job.id)
    assert restarted.flow_run_id == job.flow_run_id
    assert restarted.wait(timeout=120, poll_interval=0.5).run_count == 2


async def test_fifty_concurrent_identical_submissions_make_one_flow_run():
    ow = AsyncOpenWeights()
    jobs = await asyncio.gather(*[ow.custom.create(entrypoint="echo once; sleep 1") for _ in range(50)])
    assert len({j.id for j in jobs}) == 1 and len({j.flow_run_id for j in jobs}) == 1
    assert count_runs(jobs[0].id) == 1
    done = await jobs[0].wait(timeout=120, poll_interval=0.5)
    assert done.status == "completed" and done is jobs[0]
    await ow.aclose()


def test_a_busy_server_answering_503_after_the_create_took_effect_gives_one_run(monkeypatch):
    """A SQLite Prefect server answers 503 ("database is locked") to concurrent writes on a loaded machine, after
    Prefect's own retries; the submit is asked again, finds the run its create made and makes no second one.
    The 503 is injected at the client's create (mocked: a real server cannot be made to lock on demand); the run
    behind it is real."""
    import httpx
    from prefect.client.orchestration import PrefectClient

    real_create = PrefectClient.create_flow_run_from_deployment
    answered = []

    async def create_then_503(self, *args, **kwargs):
        run = await real_create(self, *args, **kwargs)
        answered.append(run.id)
        if len(answered) == 1:
            request = httpx.Request("POST", "http://prefect.test/api/deployments/x/create_flow_run")
            response = httpx.Response(503, request=request)
            raise httpx.HTTPStatusError("Service Unavailable", request=request, response=response)
        return run

    monkeypatch.setattr(PrefectClient, "create_flow_run_from_deployment", create_then_503)
    job = OpenWeights().custom.create(entrypoint=f"echo busy server {os.getpid()}")
    assert [str(run_id) for run_id in answered] == [
        str(job.flow_run_id)
    ]  # asked again: the job id was found, nothing created twice
    assert count_runs(job.id) == 1


def test_concurrent_submissions_from_threads():
    ow = OpenWeights()
    with ThreadPoolExecutor(16) as pool:
        jobs = list(pool.map(lambda _: ow.custom.create(entrypoint="echo threads"), range(32)))
    assert len({j.flow_run_id for j in jobs}) == 1
    assert count_runs(jobs[0].id) == 1


def test_cancel_a_running_job():
    ow = OpenWeights()
    job = ow.custom.create(entrypoint=f"echo started; sleep 300 # {os.getpid()}")
    assert eventually(lambda: job.refresh().status == "in_progress" and "started" in job.logs(), timeout=120)
    ow.jobs.cancel(job.id)
    job = job.wait(timeout=120, poll_interval=0.5, raise_on_failure=False)
    assert job.status == "canceled"
    assert job in ow.jobs.list(status="canceled")


def test_a_flow_whose_code_differs_from_the_clients_fails_fast():
    """Simulates an out-of-date image: the envelope carries a code hash this flow does not have."""
    from prefect.client.orchestration import get_client

    ow = OpenWeights()
    parameters = ow.jobs._prepare(ow.custom.job_cls, {"entrypoint": "echo never runs"}).parameters
    parameters["ow_job"]["code_hash"] = "0" * 64
    parameters["ow_job"]["id"] = "customjob-000000000000"
    with get_client(sync_client=True) as client:
        deployment = client.read_deployment_by_name("custom/run")
        client.create_flow_run_from_deployment(
            deployment.id, parameters=parameters, tags=["ow-job", job_tag("customjob-000000000000"), "ow-type:custom"]
        )
    job = ow.jobs.wait("customjob-000000000000", timeout=120, poll_interval=0.5, raise_on_failure=False)
    assert job.status == "failed"
    assert "0" * 64 in job.error and ow.custom.job_cls.code_hash() in job.error


def test_missing_deployment_is_a_clear_error(monkeypatch):
    ow = OpenWeights()
    monkeypatch.setattr(ow.custom.job_cls, "deployment", "custom/does-not-exist")
    with pytest.raises(ConfigurationError, match="prefect --no-prompt deploy --all"):
        ow.custom.create(entrypoint="echo no deployment")


def failing_front(upstream: str, failing_path: str):
    """An ASGI proxy in front of the real Prefect server that answers 500 to one path: a stand-in for a server
    that breaks on one request (a real one does not fail on cue)."""
    import httpx

    client = httpx.AsyncClient(base_url=upstream.removesuffix("/api"))

    async def app(scope, receive, send):
        body, more = b"", True
        while more:
            message = await receive()
            body, more = body + message.get("body", b""), message.get("more_body", False)
        if failing_path in scope["path"]:
            status, headers, content = 500, [(b"content-type", b"application/json")], b'{"detail": "it broke"}'
        else:
            query = scope["query_string"].decode()
            response = await client.request(
                scope["method"],
                scope["path"] + (f"?{query}" if query else ""),
                content=body,
                headers=[(k.decode(), v.decode()) for k, v in scope["headers"] if k != b"host"],
            )
            status, content = response.status_code, response.content
            dropped = ("content-length", "content-encoding", "transfer-encoding")
            headers = [(k.encode(), v.encode()) for k, v in response.headers.items() if k.lower() not in dropped]
        headers.append((b"content-length", str(len(content)).encode()))
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": content})

    return app


def test_a_server_error_on_the_deployment_lookup_is_not_reported_as_a_missing_deployment(prefect_api):
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from ow_prefect.testing.servers import AppServer

    with AppServer(failing_front(prefect_api, "/api/deployments/name/")) as front:
        url = f"http://127.0.0.1:{front.port}/api"
        with temporary_settings(updates={PREFECT_API_URL: url}):
            ow = OpenWeights()
            with pytest.raises(PrefectUnavailableError) as failed:
                ow.custom.create(entrypoint=f"echo the deployment lookup fails {os.getpid()}")
    assert str(failed.value).startswith(
        f"the Prefect API at {url} failed: 500 Internal Server Error on GET /api/deployments/name/custom/run"
    )
    assert "does not exist" not in str(failed.value)


def test_runs_started_outside_the_sdk_are_tagged_as_jobs():
    """`prefect deployment run custom/run` (no ow_job envelope) still shows up in ow.jobs."""
    from prefect.client.orchestration import get_client

    ow = OpenWeights()
    with get_client(sync_client=True) as client:
        deployment = client.read_deployment_by_name("custom/run")
        client.create_flow_run_from_deployment(deployment.id, parameters={"entrypoint": "echo from the ui"})
    expected = ow.custom.validate(entrypoint="echo from the ui")
    assert job_finished(ow, expected, timeout=120)
    assert ow.jobs.retrieve(expected).status == "completed"


def test_prefect_deployment_run_finetune_dpo(tiny_model, datasets_dir, prefect_api):
    """The CLI path researchers use: `prefect deployment run finetune/dpo --param ...` on a process pool."""
    import subprocess
    import sys

    ow = OpenWeights()
    training_file = ow.files.upload(datasets_dir / "preference.jsonl", purpose="preference").id
    params = {
        "model": str(tiny_model),
        "training_file": training_file,
        "max_steps": 3,
        "r": 8,
        "per_device_train_batch_size": 4,
        "gradient_accumulation_steps": 1,
        "merge_before_push": False,
    }
    cli = [sys.executable, "-m", "prefect", "deployment", "run", "finetune/dpo"]
    for key, value in params.items():
        cli += ["--param", f"{key}={str(value).lower() if isinstance(value, bool) else value}"]
    result = subprocess.run(
        cli, env={**os.environ, "PREFECT_API_URL": prefect_api}, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stdout + result.stderr
    expected = ow.fine_tuning.validate(loss="dpo", **params)
    assert job_finished(ow, expected, timeout=300)
    job = ow.jobs.retrieve(expected)
    assert job.status == "completed", job.error
    assert job.params["loss"] == "dpo" and job.outputs["adapter"].startswith("adapter:dir-")
    assert job.outputs["backend"] in ("unsloth", "transformers")


def test_sdk_fine_tuning_job_on_the_worker_carries_its_vram_estimate(tiny_model, datasets_dir):
    from prefect.client.orchestration import get_client

    ow = OpenWeights()
    training_file = ow.files.upload(datasets_dir / "conversations.jsonl", purpose="conversations").id
    job = ow.fine_tuning.create(
        model=str(tiny_model),
        training_file=training_file,
        max_steps=2,
        r=8,
        per_device_train_batch_size=4,
        gradient_accumulation_steps=1,
        seed=99,
    )
    with get_client(sync_client=True) as client:
        run = client.read_flow_run(job.flow_run_id)
    # the worker gets the image the job id was computed with, and the VRAM estimate
    assert run.job_variables == {"image": type(job).image(), "min_vram_gb": 2}
    assert run.deployment_id == client_deployment_id("finetune/sft")
    job = job.wait(timeout=300, poll_interval=1)
    assert job.outputs["steps"] == 2 and job.outputs["merged"].startswith("model:dir-")


def client_deployment_id(name):
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        return client.read_deployment_by_name(name).id


def test_the_prefect_server_runs_on_uvloop_and_httptools(prefect_api):
    """`prefect server start` in this environment serves with uvicorn's fast loop and HTTP parser (dependencies of
    ow_prefect, picked by uvicorn itself): 15-25% less server CPU per read or state change than asyncio and h11."""
    import psutil

    port = int(prefect_api.rsplit(":", 1)[1].split("/")[0])
    (pid,) = {c.pid for c in psutil.net_connections("tcp") if c.status == psutil.CONN_LISTEN and c.laddr.port == port}
    libraries = [region.path for region in psutil.Process(pid).memory_maps() if region.path.endswith(".so")]
    assert any("/uvloop/" in path for path in libraries), libraries
    assert any("/httptools/" in path for path in libraries), libraries
