"""What a warm pod may be handed (ow_prefect/workers/handoff.py `fit_key`) and what its agent accepts as an
assignment (ow_prefect/runpod/agent.py), without servers. The hand-off itself, on the fake RunPod and a real
worker, is tests/test_worker_handoff.py."""

import uuid

import httpx
import pytest
from pydantic import SecretStr

from ow_prefect.runpod.agent import assignment_variable, read_assignment
from ow_prefect.runpod.credentials import RunPodCredentials
from ow_prefect.workers.handoff import fit_key
from ow_prefect.workers.runpod import RunPodJobConfiguration

CREDENTIALS = RunPodCredentials(api_key=SecretStr("rp-key-1"), api_url="https://rest.runpod.io/v1")


def configuration(**values):
    base = {"image": "ow-train:1", "command": "prefect flow-run execute", "env": {"A": "1"}, "keep_warm_seconds": 60}
    return RunPodJobConfiguration.model_validate({**base, **values})


def key(credentials=CREDENTIALS, run_env=None, **values):
    config = configuration(**values)
    config.env = {**config.env, **(run_env or {})}
    return fit_key(config, credentials)


def test_what_a_run_may_differ_in_and_still_share_a_pod():
    same = key()
    # its own markers, its memory need (checked against the pod's memory), its caps and timeouts, its keep-warm time
    assert key(run_env={"PREFECT__FLOW_RUN_ID": str(uuid.uuid4())}) == same
    assert key(min_vram_gb=40, vram_margin=0.2, max_runtime=60, max_cost=3.0, startup_timeout=30) == same
    assert key(keep_warm_seconds=0, capacity_wait=100, max_pod_attempts=1) == same


@pytest.mark.parametrize(
    "different",
    [
        {"image": "ow-serve:1"},
        {"command": "python other.py"},
        {"env": {"A": "2"}},
        {"gpu_count": 2},
        {"gpu_types": ["NVIDIA H100 80GB HBM3"]},
        {"cloud": "ANY"},
        {"data_center_ids": ["US-TX-3"]},
        {"max_price_per_hour": 1.0},
        {"min_cuda_version": "13.0"},
        {"container_disk_gb": 100},
        {"volume_gb": 20},
        {"network_volume_id": "vol-1"},
        {"ports": ["8000/http"]},
        {"registry_auth_id": "reg-1"},
    ],
)
def test_anything_else_that_differs_gets_its_own_pod(different):
    assert key(**different) != key()


def test_another_runpod_account_gets_its_own_pod():
    other = RunPodCredentials(api_key=SecretStr("rp-key-2"), api_url="https://rest.runpod.io/v1")
    assert key(credentials=other) != key()
    assert "rp-key-1" not in key()  # the key is hashed, never kept in the clear


def assignments(value, status=200):
    def handler(request: httpx.Request) -> httpx.Response:
        assert request.url.path == f"/api/variables/name/{assignment_variable('PodABC')}"
        return httpx.Response(status, json={"value": value})

    return httpx.Client(base_url="http://prefect/api", transport=httpx.MockTransport(handler))


def test_the_agent_reads_only_a_well_formed_assignment_of_its_pool(monkeypatch):
    monkeypatch.setenv("OW_WORK_POOL_ID", "pool-1")
    run = str(uuid.uuid4())
    assert assignment_variable("PodABC") == "ow-pod-podabc"
    found = read_assignment(assignments({"flow_run_id": run, "work_pool_id": "pool-1"}), "PodABC")
    assert found is not None and found["flow_run_id"] == run
    assert read_assignment(assignments({"flow_run_id": run, "work_pool_id": "pool-2"}), "PodABC") is None
    assert read_assignment(assignments({"flow_run_id": "not-a-run; rm -rf /"}), "PodABC") is None
    assert read_assignment(assignments("a string"), "PodABC") is None
    assert read_assignment(assignments(None, status=404), "PodABC") is None
