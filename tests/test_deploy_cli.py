"""prefect.yaml is valid for the Prefect CLI: `prefect --no-prompt deploy --all` registers every deployment."""

import os
import subprocess
import sys

from deployments.register import register
from ow_prefect.workers.runpod import RunPodWorker
from tests.conftest import POOL, ROOT


def test_prefect_deploy_all(prefect_api, deployed):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings(updates={PREFECT_API_URL: prefect_api}), get_client(sync_client=True) as client:
        pools = [p.name for p in client.read_work_pools()]
        if "local" not in pools:
            client.create_work_pool(WorkPoolCreate(name="local", type="process"))
        if "gpu" not in pools:
            template = RunPodWorker.get_default_base_job_template()
            client.create_work_pool(WorkPoolCreate(name="gpu", type="runpod", base_job_template=template))
        env = {**os.environ, "PREFECT_API_URL": prefect_api, "PWD": str(ROOT)}
        result = subprocess.run(
            [sys.executable, "-m", "prefect", "--no-prompt", "deploy", "--all"],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert result.returncode == 0, result.stdout + result.stderr
        on_runpod = client.read_deployment_by_name("custom/run")
        assert on_runpod.work_pool_name == "gpu" and on_runpod.entrypoint == "flows/custom.py:custom_run"
        assert on_runpod.pull_steps == [{"ow_prefect.workers.pull.code_directory": {}}]  # image or OW_POD_CODE_DIR
        assert on_runpod.job_variables == {
            "image": "ow-prefect-train:0.1",
            "min_vram_gb": 16,
            "min_cuda_version": "13.0",
            "data_center_min_cuda_version": "12.2",
        }
        assert client.read_deployment_by_name("vllm-api/serve").job_variables["ports"] == ["8000/http"]
        local = client.read_deployment_by_name("custom/run-local")
        assert local.work_pool_name == "local" and workdir(local) == str(ROOT)
        assert client.read_deployment_by_name("eval/mmlu-pro").entrypoint == "flows/evals/mmlu_pro.py:mmlu_pro"
        assert len(client.read_deployments()) >= 20
        check_scheduled_evals(client)
        register(pool=POOL)  # give the end-to-end tests their pool back
        check_scheduled_evals(client)  # registering again from Python updates the schedules, adds no copies
        assert workdir(client.read_deployment_by_name("custom/run")) == str(ROOT)  # a process pool: this checkout
        assert client.read_deployment_by_name("custom/run").job_variables == {}  # RunPod's variables left out


def workdir(deployment):
    return deployment.pull_steps[0]["prefect.deployments.steps.set_working_directory"]["directory"]


def check_scheduled_evals(client):
    nightly = client.read_deployment_by_name("eval/mmlu-pro-nightly")
    assert nightly.parameters["model"] == "ftjob:latest" and nightly.parameters["artifact_key"] == "nightly-mmlu-pro"
    (schedule,) = nightly.schedules
    assert schedule.schedule.cron == "0 3 * * *" and schedule.schedule.timezone == "UTC"
    assert schedule.active is False  # inactive until someone turns it on
    weekly = client.read_deployment_by_name("eval/inspect-ai-weekly")
    assert [s.active for s in weekly.schedules] == [False]
    assert weekly.parameters["eval_name"] == "inspect_evals/gpqa_diamond"
