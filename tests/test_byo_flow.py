"""Bring your own flow (examples/byo_flow): a user flow deployed with Prefect's own `from_source(...).deploy(...)`
on a `runpod` pool with GPU job variables; the `runpod` worker runs it in a FakeRunPod pod, where it reads and
writes ow_prefect's storage and emits events."""

import importlib.util
import json
import sys

import pytest

from ow_prefect import OpenWeights, ParameterError
from ow_prefect.testing.fake_runpod import GPU_TYPES, FakeRunPod
from ow_prefect.testing.servers import prefect_worker
from ow_prefect.workers.runpod import runpod_job_variables
from tests.conftest import ROOT
from tests.helpers import EVENT_SECONDS, eventually
from tests.runpod_support import WORKER_ENV, make_pool

EXAMPLE = ROOT / "examples" / "byo_flow"
POOL = "ow-test-byo"


def test_runpod_job_variables_are_checked_before_deploying():
    assert runpod_job_variables(min_vram_gb=40, gpu_types=["NVIDIA A40"], ports=["8000/http"]) == {
        "min_vram_gb": 40.0,
        "gpu_types": ["NVIDIA A40"],
        "ports": ["8000/http"],
    }
    with pytest.raises(ParameterError, match=r"min_vram: not a runpod job variable\nknown variables: .*min_vram_gb"):
        runpod_job_variables(min_vram=40)
    with pytest.raises(ParameterError, match=r"min_vram_gb: Input should be a valid number.*\n  - ports: .*8000"):
        runpod_job_variables(min_vram_gb="lots", ports=["8000"])
    with pytest.raises(ParameterError, match="credentials: not a runpod job variable"):
        runpod_job_variables(credentials=None)
    with pytest.raises(ParameterError, match="daily_budget: the pool's budget: set it on the pool"):
        runpod_job_variables(daily_budget=10)
    capped = runpod_job_variables(max_cost=5, cache_volume_ids=["vol-a"])
    assert capped == {"max_cost": 5.0, "cache_volume_ids": ["vol-a"]}


def _load(path, name):
    spec = importlib.util.spec_from_file_location(name, path)
    module = sys.modules[name] = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_a_user_flow_runs_on_the_runpod_pool_with_storage_and_events(prefect_api, tmp_path):
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from ow_prefect.client._logs import event_filter

    deploy = _load(EXAMPLE / "deploy.py", "byo_deploy_example").deploy
    text = OpenWeights().files.create(b"a b a c a b", purpose="custom")
    with (
        FakeRunPod(api_key="byo-key", boot_seconds=0.3, log_follow_seconds=0.3) as fake,
        temporary_settings(updates={PREFECT_API_URL: prefect_api}),
        get_client(sync_client=True) as client,
    ):
        make_pool(client, fake, POOL)  # its default min_vram_gb (20) would rent an RTX A6000 (48 GB)
        deployment_id = deploy(POOL, str(EXAMPLE), "flow.py:word_count", name="byo", min_vram_gb=60)
        assert client.read_deployment(deployment_id).job_variables == {"min_vram_gb": 60.0}
        with prefect_worker(prefect_api, POOL, "runpod", WORKER_ENV, tmp_path / "worker.log"):
            run = client.create_flow_run_from_deployment(deployment_id, parameters={"input_file": text.id})
            assert eventually(lambda: client.read_flow_run(run.id).state.is_final(), timeout=120, interval=0.5)
            # the worker deletes the pod once it sees the final state (a poll later): keep it running until then
            assert eventually(
                lambda: [p for p in fake.pods.values() if p.name == f"ow-{run.id}" and p.deleted_at is not None],
                timeout=60,
            )
        state = client.read_flow_run(run.id).state
        assert state.is_completed(), f"{state}\n{(tmp_path / 'worker.log').read_text()[-3000:]}"
        (pod,) = [pod for pod in fake.pods.values() if pod.name == f"ow-{run.id}"]
        assert GPU_TYPES[pod.gpu["id"]][1] >= 60 * 1.15 and pod.deleted_at is not None

        def counted():
            events = client.read_events(filter=event_filter(str(run.id)), limit=50).events
            return next((e for e in events if e.event == "word-count.counted"), None)

        event = eventually(counted, timeout=EVENT_SECONDS)
    assert event is not None, "the flow's event is related to its run"
    assert event.payload["top"] == [["a", 3], ["b", 2], ["c", 1]]
    assert json.loads(OpenWeights().files.content(event.payload["result_file"])) == {"a": 3, "b": 2, "c": 1}
