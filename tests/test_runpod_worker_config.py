"""The RunPod worker's job configuration (without a server, but for one block reference): the pod's env, the create
body, validation."""

import asyncio
import json
import logging
from contextlib import contextmanager
from uuid import uuid4

import pytest
from pydantic import ValidationError

from ow_prefect.runpod.models import Pod
from ow_prefect.runpod.offers import Candidate, Ranking
from ow_prefect.testing.fake_runpod import spec_schemas
from ow_prefect.workers.attempts import ContainerTracker
from ow_prefect.workers.capacity import _no_capacity_message
from ow_prefect.workers.preflight import _is_loopback
from ow_prefect.workers.runpod import RunPodJobConfiguration, RunPodWorker


def flow_run():
    from prefect.client.schemas.objects import FlowRun

    return FlowRun(id=uuid4(), flow_id=uuid4(), name="quiet-otter")


def test_the_pod_env_holds_only_what_the_run_needs(monkeypatch):
    from prefect.client.schemas.objects import WorkPool
    from prefect.settings import (
        PREFECT_API_KEY,
        PREFECT_API_URL,
        PREFECT_LOGGING_LEVEL,
        PREFECT_SERVER_DATABASE_CONNECTION_URL,
        temporary_settings,
    )

    monkeypatch.setenv("OW_STORAGE_BLOCK", "s3-bucket/ow-storage")
    pool = WorkPool(id=uuid4(), name="gpu", type="runpod")
    run = flow_run()
    config = RunPodJobConfiguration(env={"MY_FLAG": "1", "PREFECT_LOGGING_LEVEL": "INFO"})
    updates = {
        PREFECT_API_URL: "https://prefect.example.org/api",
        PREFECT_API_KEY: "pnu_secret_key",
        PREFECT_LOGGING_LEVEL: "DEBUG",
        PREFECT_SERVER_DATABASE_CONNECTION_URL: "postgresql+asyncpg://u:dbpass@db/prefect",
    }
    with temporary_settings(updates=updates):
        config.prepare_for_flow_run(run, work_pool=pool)
    assert config.env == {
        "PREFECT_API_URL": "https://prefect.example.org/api",
        "PREFECT_API_KEY": "pnu_secret_key",
        "PREFECT__FLOW_RUN_ID": str(run.id),
        "PREFECT_FLOW_RUN_EXECUTE_SIGTERM_BEHAVIOR": "reschedule",
        "OW_STORAGE_BLOCK": "s3-bucket/ow-storage",
        "OW_WORK_POOL_ID": str(pool.id),
        "MY_FLAG": "1",
        "PREFECT_LOGGING_LEVEL": "INFO",  # the job's own env, and nothing else of the worker's settings
    }
    assert config.command == "prefect flow-run execute"


def test_the_worker_passes_on_the_ow_settings_of_its_dotenv(monkeypatch, tmp_path):
    """OW_HF_ORG / OW_HF_TOKEN_SECRET / OW_STORAGE_RETRY_SECONDS from the worker's `.env` reach the pod, as from its
    environment; settings it does not set are not passed (the pod keeps its own defaults)."""
    from prefect.client.schemas.objects import WorkPool

    for name in ("OW_STORAGE_BLOCK", "OW_HF_ORG", "OW_HF_TOKEN_SECRET", "OW_STORAGE_RETRY_SECONDS"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.chdir(tmp_path)
    (tmp_path / ".env").write_text("OW_HF_ORG=my-lab\nOW_STORAGE_RETRY_SECONDS=600\n")
    config = RunPodJobConfiguration()
    config.prepare_for_flow_run(flow_run(), work_pool=WorkPool(id=uuid4(), name="gpu", type="runpod"))
    passed = {name: value for name, value in config.env.items() if name.startswith("OW_") and name != "OW_WORK_POOL_ID"}
    assert passed == {"OW_HF_ORG": "my-lab", "OW_STORAGE_RETRY_SECONDS": "600.0"}


def test_the_create_body_is_what_runpods_spec_accepts():
    config = RunPodJobConfiguration(
        image="ghcr.io/me/train:1",
        env={"A": "b"},
        ports=["8000/http", "22/tcp"],
        volume_gb=40,
        data_center_ids=["US-TX-3"],
        registry_auth_id="reg-1",
        min_cuda_version="12.8",
        gpu_count=2,
        command="prefect flow-run execute",
    )
    gpu = {"id": "NVIDIA RTX A6000", "count": 2, "minCudaVersion": "12.8"}
    body = {**config.pod_request("ow-123", deadline=1.5e9), "gpu": gpu, "cloud": "COMMUNITY"}
    assert spec_schemas().errors("CreatePodRequest", body) == []
    assert body["mounts"] == {"persistent": {"size": 40, "path": "/workspace"}}
    assert body["env"] == {"A": "b", "OW_POD_DEADLINE": "1500000000"}
    network = RunPodJobConfiguration(network_volume_id="vol-9", env={"HF_HOME": "/mine"}).pod_request("ow-1", 0)
    assert network["mounts"] == {"network": [{"volumeId": "vol-9", "path": "/workspace"}]}
    # the caches on the volume, a job's own HF_HOME kept
    assert network["env"]["HF_HOME"] == "/mine" and network["env"]["VLLM_CACHE_ROOT"] == "/workspace/.cache/vllm"
    assert spec_schemas().errors("CreatePodRequest", {**network, "gpu": {"id": "x"}}) == []


@pytest.mark.parametrize(
    "values, message",
    [
        ({"ports": ["8000"]}, "'<port>/http' or '<port>/tcp'"),
        ({"volume_gb": 20, "network_volume_id": "v"}, "not both"),
        ({"volume_gb": 5}, "greater than or equal to 10"),
        ({"cloud": "CHEAP"}, "'SECURE', 'COMMUNITY' or 'ANY'"),
        ({"min_cuda_version": "12"}, "should match pattern"),
    ],
)
def test_bad_job_variables_are_refused_before_anything_is_rented(values, message):
    with pytest.raises(ValidationError, match=message):
        RunPodJobConfiguration(**values)


def test_the_pool_template_takes_other_defaults():
    block_id = uuid4()
    template = RunPodWorker.base_job_template(block_id, cloud="ANY", min_vram_gb=40)
    properties = template["variables"]["properties"]
    assert properties["cloud"]["default"] == "ANY" and properties["min_vram_gb"]["default"] == 40
    assert properties["credentials"]["default"] == {"$ref": {"block_document_id": str(block_id)}}
    assert all(properties[name].get("description") for name in ("gpu_types", "max_runtime", "startup_timeout"))
    with pytest.raises(ValueError, match="unknown RunPod job variables \\['gpus'\\]"):
        RunPodWorker.base_job_template(gpus=["x"])


async def test_the_pool_template_is_what_it_was_before_variables_and_configuration_shared_their_fields():
    """`prefect work-pool create --type runpod` and `ow setup` build the pool from this template: since the
    variables and the configuration share one definition of each field (RunPodFields), it must be what it was
    (tests/data/runpod_base_job_template.json, saved from the two hand-kept copies), in the same order, but
    for titles and descriptions, which every field now has. A new job variable adds itself to that file (it is
    the pool's contract: read its diff)."""
    from pathlib import Path

    from prefect.workers.utilities import get_default_base_job_template_for_infrastructure_type

    before = json.loads((Path(__file__).parent / "data" / "runpod_base_job_template.json").read_text())
    for template in (
        await get_default_base_job_template_for_infrastructure_type("runpod"),  # what the Prefect CLI uses
        RunPodWorker.base_job_template(),  # what `ow setup` uses
    ):
        properties = template["variables"]["properties"]
        assert all(field.get("title") and field.get("description") for field in properties.values()), [
            name for name, field in properties.items() if not field.get("description")
        ]
        assert list(template["job_configuration"]) == [
            "command", "env", "labels", "name", *list(properties)[4:]
        ]  # fmt: skip
        assert template["job_configuration"] == {name: "{{ " + name + " }}" for name in properties}
        for field in properties.values():
            del field["title"], field["description"]
        assert json.dumps(template) == json.dumps(before)  # keys in the same order: the UI's form keeps it


def test_loopback_urls():
    assert _is_loopback("http://127.0.0.1:4200/api") and _is_loopback("http://localhost/api")
    assert not _is_loopback("https://api.prefect.cloud/api/accounts/x") and not _is_loopback("https://api.runpod.io/v2")


def pod(runtime=None, started_at=None, status="RUNNING"):
    return Pod.model_validate(
        {"id": "p", "name": "ow-x", "status": status, "runtime": runtime, "startedAt": started_at}
    )


def test_container_tracker_sees_starts_and_exits():
    tracker = ContainerTracker()
    assert tracker.observe(pod()) is None  # RUNNING with runtime null right after create: not started yet
    assert tracker.observe(pod({"uptime": 3}, "t1")) == "up"
    assert tracker.observe(pod({"uptime": 9}, "t1")) is None
    assert tracker.observe(pod({"uptime": 2}, "t1")) == "exited"  # uptime went back: restarted
    assert tracker.observe(pod(None, "t1")) == "exited"  # down between restarts
    assert tracker.exits == 2
    quick = ContainerTracker()  # a container that lives less than one poll shows only a new startedAt
    assert quick.observe(pod(None, "t1")) == "up"
    assert quick.observe(pod(None, "t2")) == "exited"


def test_a_watch_sees_its_run_move_on_to_the_next_pod():
    """A preempted run reschedules itself and may be on its next pod before its old pod's watch sees it Scheduled
    (a poll of the watch against the worker's own claim of the rescheduled run): the run's infrastructure id, once
    it named this pod, naming another is the sign (workers/watch.py `_MovedOn`)."""
    from types import SimpleNamespace

    from ow_prefect.workers.watch import _MovedOn

    def run(pid):
        return SimpleNamespace(infrastructure_pid=pid)

    second = _MovedOn("pod2")
    assert second.to(run("runpod::pod1")) is None  # its create is not recorded yet: the id still names the last pod
    assert second.to(run("runpod::pod2")) is None
    first = _MovedOn("pod1")
    assert first.to(None) is None and first.to(run(None)) is None  # the API did not answer; no id yet
    assert first.to(run("runpod::pod1")) is None
    assert first.to(run("runpod::pod2")) == "pod2"


async def test_two_pods_of_one_run_ending_at_once_both_get_their_cost_row(use_server):
    """Each row is added to the table the run's artifact holds: two pods of a run accounted at the same moment (the
    preempted one and its successor) must not each write a table without the other."""
    from prefect import flow
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    from ow_prefect.runpod.offers import Candidate
    from ow_prefect.workers.costs import PodRecord

    @flow(name="cost-rows")
    def nothing():
        pass

    candidate = Candidate("NVIDIA RTX A6000", "SECURE", 0.49, 48, 1, "High")
    async with get_client() as client:
        run = await client.create_flow_run(nothing)
        worker = RunPodWorker(work_pool_name="unused")
        worker._client = client
        worker._emit = lambda *args, **kwargs: None  # the rows only (events have their own tests)
        records = [PodRecord.of(pod(status="EXITED").model_copy(update={"id": i}), run, candidate) for i in "ab"]
        await asyncio.gather(*(worker._account(r, "done", logging.getLogger("test")) for r in records))
        key = ArtifactFilter(key=ArtifactFilterKey(any_=[f"runpod-cost-{run.id}"]))
        latest = max(await client.read_artifacts(artifact_filter=key), key=lambda a: a.created)
    assert sorted(row["pod"] for row in json.loads(latest.data)) == ["a", "b"]
    assert not worker._cost_row_locks  # the run's lock is gone with its last user


def test_the_no_capacity_message_names_what_was_asked_and_tried():
    config = RunPodJobConfiguration(min_vram_gb=80, gpu_types=["NVIDIA H100 80GB HBM3"], max_price_per_hour=3)
    candidate = Candidate("NVIDIA H100 80GB HBM3", "SECURE", 2.69, 80, 1, "LOW")
    ranking = Ranking([candidate], considered=3, removed={"gpu_types": 2})
    message = _no_capacity_message(config, ranking, [f"{candidate}: no capacity"])
    assert "1 GPU(s) with 80 GB" in message and "at most $3/h" in message
    assert "(+15% margin: 92 GB)" in message  # what the worker asked the catalog for
    assert "1x NVIDIA H100 80GB HBM3 (80 GB) in SECURE at $2.69/h: no capacity" in message
    assert "Of 3 offers (GPU type × cloud) in RunPod's catalog: 2 not in gpu_types." in message
    assert "No RunPod GPU fits" in _no_capacity_message(config, Ranking([]), [])


def test_the_no_capacity_message_says_what_each_filter_removed_and_what_to_change():
    config = RunPodJobConfiguration(
        min_vram_gb=24, min_cuda_version="13.0", data_center_min_cuda_version="12.2", max_price_per_hour=1
    )
    ranking = Ranking([], considered=40, removed={"cloud": 20, "vram": 8, "stock": 5, "cuda": 4, "price": 3})
    message = _no_capacity_message(config, ranking)
    assert message.startswith(
        "No RunPod GPU fits 1 GPU(s) with 24 GB in total (+15% margin: 27.6 GB), cloud SECURE, at most $1/h"
    )
    assert (
        "Of 40 offers (GPU type × cloud) in RunPod's catalog: 20 not offered in cloud SECURE; 8 with less than 27.6 GB "
        "over 1 GPU(s); 5 sold out; 4 without a free host at the CUDA floor (host CUDA >= 13.0, >= 12.2 on "
        "data-center GPUs); 3 above $1/h." in message
    ), message
    for fix in ("cloud: ANY", "lower min_vram_gb", "capacity_wait", "min_cuda_version", "raise max_price_per_hour"):
        assert fix in message, fix


async def test_kill_infrastructure_deletes_the_pod_and_a_gone_pod_counts_as_done():
    from ow_prefect.runpod import AsyncRunPodClient
    from ow_prefect.runpod.credentials import RunPodCredentials
    from ow_prefect.testing.fake_runpod import FakeRunPod

    with FakeRunPod(api_key="k") as fake:
        async with AsyncRunPodClient("k", base_url=fake.url) as runpod:
            pod = await runpod.create_pod({"name": "ow-x", "image": "i", "gpu": {"id": "NVIDIA RTX A6000"}})
        config = RunPodJobConfiguration(credentials=RunPodCredentials(api_key="k", api_url=fake.url))
        worker = RunPodWorker(work_pool_name="unused")
        await worker.kill_infrastructure(f"runpod::{pod.id}", config)
        assert fake.pods[pod.id].deleted_at is not None
        await worker.kill_infrastructure(f"runpod::{pod.id}", config)  # 404: already gone, no error


async def test_cancelling_an_earlier_run_of_a_handed_on_pod_leaves_it_to_its_current_run(use_server):
    """A warm pod's assignment (workers/handoff.py) names the run it serves now; a cancel of the run it served
    before must not delete it (Prefect then marks that run Cancelled, infrastructure not found)."""
    from prefect.exceptions import InfrastructureNotFound
    from prefect.variables import Variable

    from ow_prefect.runpod import AsyncRunPodClient
    from ow_prefect.runpod.agent import assignment_variable
    from ow_prefect.runpod.credentials import RunPodCredentials
    from ow_prefect.testing.fake_runpod import FakeRunPod

    earlier, current = str(uuid4()), str(uuid4())
    with FakeRunPod(api_key="k") as fake:
        async with AsyncRunPodClient("k", base_url=fake.url) as runpod:
            pod = await runpod.create_pod({"name": "ow-x", "image": "i", "gpu": {"id": "NVIDIA RTX A6000"}})
        await Variable.aset(assignment_variable(pod.id), {"flow_run_id": current}, overwrite=True)
        try:
            credentials = RunPodCredentials(api_key="k", api_url=fake.url)
            worker = RunPodWorker(work_pool_name="unused")
            for_run = {
                run: RunPodJobConfiguration(credentials=credentials, env={"PREFECT__FLOW_RUN_ID": run})
                for run in (earlier, current)
            }
            with pytest.raises(InfrastructureNotFound, match=f"handed on to flow run {current}"):
                await worker.kill_infrastructure(f"runpod::{pod.id}", for_run[earlier])
            assert fake.pods[pod.id].deleted_at is None
            await worker.kill_infrastructure(f"runpod::{pod.id}", for_run[current])
            assert fake.pods[pod.id].deleted_at is not None
        finally:
            await Variable.aunset(assignment_variable(pod.id))


def test_a_pod_that_could_not_reach_the_prefect_api_is_never_created():
    from ow_prefect.runpod.credentials import RunPodCredentials

    worker = RunPodWorker(work_pool_name="unused")
    real = RunPodCredentials(api_key="k")  # api.runpod.io
    local = RunPodJobConfiguration(env={"PREFECT_API_URL": "http://127.0.0.1:4200/api"})
    with pytest.raises(ValueError, match="loopback address it cannot reach"):
        worker._check_reachable(local, real, logger=None)
    with pytest.raises(ValueError, match="PREFECT_API_URL is not set"):
        worker._check_reachable(RunPodJobConfiguration(), real, logger=None)
    fake = RunPodCredentials(api_key="k", api_url="http://127.0.0.1:9/v2")  # a local fake's pods reach loopback
    worker._check_reachable(local, fake, logger=None)


async def test_pods_can_get_a_scoped_prefect_key_from_a_secret_block(use_server, monkeypatch):
    """docs/security.md: the pool's `env` names a Secret block holding a narrower Prefect key than the worker's;
    Prefect resolves the placeholder when it builds the run's configuration, and the job's env wins."""
    from prefect.blocks.system import Secret
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.objects import WorkPool
    from prefect.settings import PREFECT_API_KEY, temporary_settings

    await Secret(value="pnu_scoped_pod_key").save("ow-test-pod-prefect-key", overwrite=True)
    pool_env = {"PREFECT_API_KEY": "{{ prefect.blocks.secret.ow-test-pod-prefect-key }}"}  # as docs/security.md says
    async with get_client() as client:
        config = await RunPodJobConfiguration.from_template_and_values(
            RunPodWorker.base_job_template(env=pool_env), {}, client=client
        )
    with temporary_settings(updates={PREFECT_API_KEY: "pnu_the_workers_own_key"}):
        config.prepare_for_flow_run(flow_run(), work_pool=WorkPool(id=uuid4(), name="gpu", type="runpod"))
    assert config.env["PREFECT_API_KEY"] == "pnu_scoped_pod_key"
    assert "pnu_the_workers_own_key" not in config.env.values()


@contextmanager
def worker_warnings():
    """The warnings the RunPod worker logs meanwhile (its logger is `prefect.workers.runpod.<name>`)."""
    warnings: list[str] = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = lambda record: warnings.append(record.getMessage())
    logging.getLogger("prefect.workers").addHandler(handler)
    try:
        yield warnings
    finally:
        logging.getLogger("prefect.workers").removeHandler(handler)


async def test_a_reconciler_without_credentials_says_so_once_at_start(use_server, monkeypatch):
    """A pool with no credentials block and a worker without RUNPOD_API_KEY: the reconciler cannot list pods, so
    orphans would bill unseen. The worker's log says so at start (its first pass), once, and that it is the
    reconciler (orphan pods) that is affected, naming the fix."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate

    monkeypatch.delenv("RUNPOD_API_KEY", raising=False)
    monkeypatch.setenv("OW_RUNPOD_RECONCILE_SECONDS", "600")
    pool = f"ow-test-no-credentials-{uuid4().hex[:8]}"
    async with get_client() as client:
        await client.create_work_pool(
            WorkPoolCreate(name=pool, type="runpod", base_job_template=RunPodWorker.base_job_template())
        )
    with worker_warnings() as warnings:
        async with RunPodWorker(work_pool_name=pool) as worker:
            for _ in range(100):
                if warnings:
                    break
                await asyncio.sleep(0.1)
            at_start = list(warnings)  # from the reconciler's own first pass
            await worker.reconcile()
            await worker.reconcile()
    assert at_start, "nothing said at start"
    said = [message for message in warnings if "reconciler" in message]
    assert len(said) == 1, warnings
    assert pool in said[0] and "RunPod Credentials block" in said[0] and "RUNPOD_API_KEY" in said[0], said[0]
    assert "orphan pods" in said[0], said[0]


async def test_a_reconciler_whose_credentials_block_is_gone_says_so_once(use_server, monkeypatch):
    """The pool names a RunPod Credentials block that was deleted since: the reconciler used to swallow the error
    and do nothing, pass after pass; now the worker's log says once what to fix."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate

    from ow_prefect.runpod.credentials import RunPodCredentials

    monkeypatch.delenv("RUNPOD_API_KEY", raising=False)
    name = f"ow-test-gone-{uuid4().hex[:8]}"
    block_id = await RunPodCredentials(api_key="k", api_url="http://127.0.0.1:9/v2").save(name)
    async with get_client() as client:
        await client.create_work_pool(
            WorkPoolCreate(name=name, type="runpod", base_job_template=RunPodWorker.base_job_template(block_id))
        )
        await client.delete_block_document(block_id)
    with worker_warnings() as warnings:
        async with RunPodWorker(work_pool_name=name) as worker:
            for _ in range(3):
                assert await worker.reconcile() == []
    said = [message for message in warnings if "reconciler" in message]
    assert len(said) == 1, warnings
    assert name in said[0] and "RunPod Credentials block" in said[0] and "RUNPOD_API_KEY" in said[0], said[0]


def test_gpu_types_verified_and_max_pod_attempts_are_job_variables():
    from ow_prefect.errors import ParameterError
    from ow_prefect.workers.runpod import runpod_job_variables

    assert runpod_job_variables(gpu_types="verified", max_pod_attempts=1) == {
        "gpu_types": "verified",
        "max_pod_attempts": 1,
    }
    assert RunPodJobConfiguration(gpu_types="verified").preferred_gpu_types == []
    assert RunPodJobConfiguration(gpu_types=["NVIDIA A40"]).preferred_gpu_types == ["NVIDIA A40"]
    with pytest.raises(ParameterError, match="gpu_types"):
        runpod_job_variables(gpu_types="cheapest")
    with pytest.raises(ParameterError, match="max_pod_attempts"):
        runpod_job_variables(max_pod_attempts=0)
    template = RunPodWorker.base_job_template(gpu_types="verified")
    assert template["variables"]["properties"]["gpu_types"]["default"] == "verified"
    assert template["job_configuration"]["max_pod_attempts"] == "{{ max_pod_attempts }}"
