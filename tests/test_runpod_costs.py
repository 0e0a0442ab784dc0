"""Costs on the `runpod` worker, against a real Prefect server and FakeRunPod: the estimate before launch (an artifact
of the run, and `ow.<job>.estimate` / `ow exec --dry-run` before any run), `max_cost` refusing a run before any pod
and stopping a running one (a fine-tune asked for a checkpoint first), a pool's daily budget, and the model cache on
network volumes with the data centers that hold them preferred.

The session's worker (a process, tests/runpod_support.py) serves runs started the way the Prefect UI starts them
(no SDK): the worker enforces the caps whatever started the run. The daily budget and the reconciler's cost verdict
run an in-process worker on a pool of their own. Pods are light (tests/reliability/light_pod.py)."""

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import anyio
import pytest

from ow_prefect.runpod.client import AsyncRunPodClient
from ow_prefect.storage import Storage
from ow_prefect.testing.servers import seed_database
from ow_prefect.testing.tiny_model import sample_conversations
from tests.helpers import eventually
from tests.runpod_support import (
    LIGHT_POD_COMMAND,
    all_deleted,
    assert_clean,
    deploy,
    finished,
    make_pool,
    pods_of,
    wait_for,
)

pytestmark = pytest.mark.slow

SUFFIX = "-costs"
A6000_PRICE = 0.49  # the pool's runs (min_vram_gb 20) get the fake's cheapest SECURE fit: an RTX A6000


def artifact(client, key: str):
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    found = client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[key])))
    return found[0] if found else None


@pytest.fixture(scope="module")
def finetune_deployment(prefect_client, runpod_pool):
    """The finetune flow on the session's runpod pool, as `finetune/sft-costs`."""
    return deploy(prefect_client, runpod_pool, f"sft{SUFFIX}", entrypoint="flows/finetune/flow.py:finetune")


@pytest.fixture(scope="module")
def training_file(tiny_model):
    rows = sample_conversations(400)
    return Storage.from_settings().put_bytes("\n".join(json.dumps(r) for r in rows).encode(), "conversations").id


def test_a_run_over_its_max_cost_is_refused_before_any_pod(
    prefect_client, fake, runpod_worker, runpod_worker_log, finetune_deployment, tiny_model, training_file
):
    """Started as the UI starts it (parameters only, no SDK envelope): the worker identifies the job, estimates it
    and refuses it, naming the estimate and the cap; nothing was rented."""
    fake.reset()
    flow_run = prefect_client.create_flow_run_from_deployment(
        finetune_deployment,
        parameters={"model": str(tiny_model), "training_file": training_file},
        job_variables={"max_cost": 0.002},  # the boot alone (~100 s on an A6000) costs ~$0.014
    )
    done = wait_for(prefect_client, flow_run.id, finished, timeout=120)
    assert done.state.is_failed() and done.state.name == "CostCapped", runpod_worker_log.read_text()[-4000:]
    message = done.state.message
    assert "Estimated cost ~$0.0" in message and "above max_cost $0.002" in message, message
    assert "NVIDIA RTX A6000" in message and "no pod was created" in message
    assert not pods_of(fake, flow_run.id)
    estimate = artifact(prefect_client, f"runpod-estimate-{flow_run.id}")
    assert estimate and "training tokens" in estimate.data and "refused" in estimate.data


def test_a_pod_that_reaches_max_cost_is_stopped(prefect_client, fake, start_run):
    flow_run = start_run(seconds=300, max_cost=0.001)  # $0.001 at $0.49/h: ~7 s
    done = wait_for(prefect_client, flow_run.id, finished, timeout=120)
    assert done.state.is_failed() and done.state.name == "CostCapped", done.state
    assert "reached max_cost ($0.001)" in done.state.message
    assert all_deleted(fake, flow_run.id)
    cost = eventually(lambda: artifact(prefect_client, f"runpod-cost-{flow_run.id}"))
    (row,) = json.loads(cost.data)
    assert 0.001 <= row["cost_usd"] < 0.003, row  # stopped within a few polls of the cap
    # the estimate of a flow that is no ow_prefect job: the price per hour, bounded by max_runtime
    estimate = artifact(prefect_client, f"runpod-estimate-{flow_run.id}")
    assert estimate and f"${A6000_PRICE:.2f}/h" in estimate.data and "work is unknown" in estimate.data
    assert_clean(fake)


def test_a_fine_tune_is_asked_for_a_checkpoint_before_it_is_stopped(prefect_client, fake, start_run, runpod_pool):
    """A run tagged as a fine-tune gets the stop request (a Prefect Variable) first; its pod — light, doing what the
    trainer does when asked (tests/reliability/light_pod.py) — ends the run saying it stored a checkpoint; only then
    is the pod deleted. The request is removed afterwards."""
    from prefect.variables import Variable

    # $0.003 at the cheapest GPU's $0.49/h is 22 s from the pod's create: the light pod's flow runs by then even on
    # a loaded machine (a run capped before its flow starts is stopped without a checkpoint request, rightly)
    deployment = deploy(prefect_client, runpod_pool, "costs-checkpoint", max_cost=0.003)
    flow_run = prefect_client.create_flow_run_from_deployment(
        deployment, parameters={"seconds": 300}, tags=["ow-type:fine_tuning"]
    )
    # the pod fails its run first; the worker then marks it CostCapped, keeping what the pod said
    done = wait_for(prefect_client, flow_run.id, lambda run: run.state.name == "CostCapped", timeout=120)
    assert "reached max_cost ($0.003)" in done.state.message
    assert "Stopped at a checkpoint: The run reached max_cost" in done.state.message
    assert all_deleted(fake, flow_run.id)
    assert eventually(lambda: Variable.get(f"ow-stop-{flow_run.id}", default=None, _sync=True) is None)


def test_sdk_estimate_names_the_gpu_price_runtime_and_cost(
    use_server, prefect_client, finetune_deployment, tiny_model, training_file, monkeypatch
):
    from ow_prefect import AsyncOpenWeights, OpenWeights

    monkeypatch.setenv("OW_DEPLOYMENT_SUFFIX", SUFFIX)
    runs_before = len(prefect_client.read_flow_runs())
    params = {"model": str(tiny_model), "training_file": training_file, "epochs": 2, "max_cost": 5}
    estimate = OpenWeights().fine_tuning.estimate(**params)
    assert estimate.pool == "ow-test-runpod" and estimate.gpu_id == "NVIDIA RTX A6000"
    assert estimate.price_per_hour == A6000_PRICE and estimate.job_id.startswith("ftjob-")
    low, expected, high = estimate.cost_usd
    assert 0 < low < expected < high and not estimate.over_cap
    text = str(estimate)
    assert "1x NVIDIA RTX A6000" in text and "training tokens" in text and "max_cost  $5 (within)" in text

    async def estimate_async():
        async with AsyncOpenWeights() as ow:
            return await ow.fine_tuning.estimate(**params)

    assert anyio.run(estimate_async).cost_usd == pytest.approx(estimate.cost_usd)
    assert len(prefect_client.read_flow_runs()) == runs_before  # nothing was submitted


def test_ow_exec_dry_run_prints_the_estimate_and_submits_nothing(
    prefect_api, prefect_client, runpod_pool, tmp_path, prefect_database
):
    deploy(prefect_client, runpod_pool, f"run{SUFFIX}", entrypoint="flows/custom.py:custom_run")
    runs_before = len(prefect_client.read_flow_runs())
    env = {**os.environ, "PREFECT_API_URL": prefect_api, "OW_DEPLOYMENT_SUFFIX": SUFFIX}
    ow = str(Path(sys.executable).parent / "ow")
    command = [ow, "exec", "python train.py", "--vram", "40", "--dry-run", "--max-cost", "2"]
    result = subprocess.run(command, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    lines = dict(line.split(None, 1) for line in result.stdout.splitlines() if line.strip())
    assert lines["job"].startswith("custom customjob-") and f"custom/run{SUFFIX}" in lines["runs"]
    assert lines["gpu"].startswith("1x NVIDIA RTX A6000 (48 GB) in SECURE at $0.49/h")
    assert "$0.49/h" in lines["cost"] and "max_runtime" in lines["cost"]
    assert lines["max_cost"].startswith("$2")
    as_json = subprocess.run([*command, "--json"], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert json.loads(as_json.stdout)["gpu_id"] == "NVIDIA RTX A6000"
    assert len(prefect_client.read_flow_runs()) == runs_before

    seed_database(tmp_path / "home", prefect_database)
    embedded = {k: v for k, v in env.items() if k != "PREFECT_API_URL"} | {"PREFECT_HOME": str(tmp_path / "home")}
    result = subprocess.run(command, env=embedded, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and "nothing is rented" in result.stdout and "embedded mode" in result.stdout


def test_hf_home_lives_on_a_cache_volume_in_a_preferred_data_center(prefect_client, fake, start_run):
    """Two runs with a model cache volume in EU-RO-1: both pods go there (although US-TX-3 has the same GPU at the
    same price) and share its HF_HOME; with no capacity in EU-RO-1 the next pod runs in US-TX-3 without a cache."""
    folder = fake.add_network_volume("vol-hf-cache", data_center="EU-RO-1")
    fake.set_stock("NVIDIA RTX A6000", 2, "SECURE", "EU-RO-1", price_per_hour=A6000_PRICE)
    # the image's entrypoint (docker/entrypoint.sh) runs the pod's args as one command: a shell line goes in bash -c
    record = 'mkdir -p "$HF_HOME" && echo "$RUNPOD_POD_ID $RUNPOD_DC_ID" >> "$HF_HOME/pods" && exec '
    command = "bash -c " + shlex.quote(record + LIGHT_POD_COMMAND)
    seen = set()
    try:
        for _ in range(2):
            flow_run = start_run(seconds=0.5, cache_volume_ids=["vol-hf-cache"], command=command)
            assert wait_for(prefect_client, flow_run.id, finished).state.is_completed()
            (pod,) = pods_of(fake, flow_run.id)
            assert pod.data_center_id == "EU-RO-1"
            assert pod.mounts == {"network": [{"volumeId": "vol-hf-cache", "path": "/workspace"}]}
            assert pod.env["HF_HOME"] == "/workspace/.cache/huggingface"
            assert pod.env["VLLM_CACHE_ROOT"] == "/workspace/.cache/vllm"  # vLLM's compile cache too
            assert all_deleted(fake, flow_run.id)  # its GPU is back in stock
            seen.add(f"{pod.id} EU-RO-1")
        # both pods wrote into one folder: the volume's (a container restarted before its delete writes twice)
        assert set((folder / ".cache" / "huggingface" / "pods").read_text().splitlines()) == seen

        fake.set_stock("NVIDIA RTX A6000", 0, "SECURE", "EU-RO-1")
        flow_run = start_run(seconds=0.5, cache_volume_ids=["vol-hf-cache"])
        assert wait_for(prefect_client, flow_run.id, finished).state.is_completed()
        (pod,) = pods_of(fake, flow_run.id)
        assert pod.data_center_id == "US-TX-3" and not pod.mounts and "HF_HOME" not in pod.env
    finally:
        del fake.stock[("NVIDIA RTX A6000", "SECURE", "EU-RO-1")]
    assert_clean(fake)


def test_a_network_volume_pins_its_data_center_and_holds_hf_home(prefect_client, fake, start_run):
    fake.add_network_volume("vol-data", data_center="EU-RO-1")
    fake.set_stock("NVIDIA RTX A6000", 1, "SECURE", "EU-RO-1", price_per_hour=A6000_PRICE)
    try:
        flow_run = start_run(seconds=0.5, network_volume_id="vol-data")
        assert wait_for(prefect_client, flow_run.id, finished).state.is_completed()
        (pod,) = pods_of(fake, flow_run.id)
        assert pod.data_center_id == "EU-RO-1" and pod.env["HF_HOME"] == "/workspace/.cache/huggingface"
        assert pod.env["VLLM_CACHE_ROOT"] == "/workspace/.cache/vllm"
        assert all_deleted(fake, flow_run.id)  # its GPU back in stock before the entry goes
    finally:
        del fake.stock[("NVIDIA RTX A6000", "SECURE", "EU-RO-1")]

    missing = start_run(seconds=0.5, cache_volume_ids=["vol-nowhere"])
    done = wait_for(prefect_client, missing.id, finished)
    assert done.state.is_crashed() and "network volume 'vol-nowhere' does not exist" in done.state.message
    assert not pods_of(fake, missing.id)


# ---- an in-process worker on a pool of its own ----------------------------------------------------------------

BUDGET_POOL = "ow-test-budget"


async def _submit_and_wait(worker, client, flow_run_id, timeout=90):
    await worker.get_and_submit_flow_runs()
    with anyio.fail_after(timeout):
        while not (run := await client.read_flow_run(flow_run_id)).state.is_final():
            await anyio.sleep(0.3)
    return run


def test_a_pool_over_its_daily_budget_refuses_new_pods(use_server, prefect_client, fake):
    """$0.001 a day on H100s ($2.69/h: 1.3 s): the first run completes and its pod's cost is recorded (its
    `ow.pod.terminated` event); the next run of the pool gets no pod."""
    from prefect.client.orchestration import get_client

    from ow_prefect.workers.runpod import RunPodWorker

    make_pool(prefect_client, fake, BUDGET_POOL, command=LIGHT_POD_COMMAND, min_vram_gb=60, daily_budget=0.001)
    deployment = deploy(prefect_client, BUDGET_POOL, "costs-budget")
    first = prefect_client.create_flow_run_from_deployment(deployment, parameters={"seconds": 3})

    async def scenario():
        async with RunPodWorker(work_pool_name=BUDGET_POOL) as worker, get_client() as client:
            done = await _submit_and_wait(worker, client, first.id)
            assert done.state.is_completed(), done.state
            await _recorded(client, worker.work_pool.id)
            second = prefect_client.create_flow_run_from_deployment(deployment, parameters={"seconds": 3})
            return second.id, await _submit_and_wait(worker, client, second.id)

    second_id, second = anyio.run(scenario)
    assert second.state.is_failed() and second.state.name == "BudgetReached", second.state
    assert f"'{BUDGET_POOL}' reached its daily budget" in second.state.message
    assert "00:00 UTC" in second.state.message
    assert not pods_of(fake, second_id)


async def _recorded(client, work_pool_id) -> None:
    from ow_prefect.costs.budget import spent_today

    with anyio.fail_after(30):
        while (await spent_today(client, work_pool_id, [])).ended <= 0:
            await anyio.sleep(0.5)


def test_the_reconciler_stops_a_pod_past_its_max_cost(use_server, prefect_client, fake):
    """A worker died while a run's pod ran on: the next worker's reconciler finds the pod past the max_cost in its
    env marker (price × age) and stops it, marking the run CostCapped."""
    from prefect.client.orchestration import get_client
    from prefect.states import Running

    from ow_prefect.workers.runpod import MAX_COST_MARKER, POOL_MARKER, RunPodWorker

    make_pool(prefect_client, fake, BUDGET_POOL, command=LIGHT_POD_COMMAND, min_vram_gb=60)
    deployment = deploy(prefect_client, BUDGET_POOL, "costs-orphan")
    flow_run = prefect_client.create_flow_run_from_deployment(deployment, parameters={"seconds": 300})
    prefect_client.set_flow_run_state(flow_run.id, Running(), force=True)
    pool_id = prefect_client.read_work_pool(BUDGET_POOL).id

    async def scenario():
        async with AsyncRunPodClient(fake.api_key, base_url=fake.url) as runpod:
            env = {"PREFECT__FLOW_RUN_ID": str(flow_run.id), POOL_MARKER: str(pool_id), MAX_COST_MARKER: "0.0005"}
            body = {"name": f"ow-{flow_run.id}", "image": "any", "gpu": {"id": "NVIDIA H100 80GB HBM3"}, "env": env}
            pod = await runpod.create_pod({**body, "args": "exec sleep 300"})
        await anyio.sleep(1.5)  # $0.0005 at $2.69/h: 0.7 s
        async with RunPodWorker(work_pool_name=BUDGET_POOL) as worker, get_client():
            await worker.reconcile()  # the reconciler's own first pass, started with the worker, may come first
        return pod.id

    pod_id = anyio.run(scenario)
    assert fake.pods[pod_id].deleted_at
    done = prefect_client.read_flow_run(flow_run.id)
    assert done.state.name == "CostCapped" and "max_cost ($0.0005)" in done.state.message
