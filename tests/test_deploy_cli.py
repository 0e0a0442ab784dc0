"""prefect.yaml is valid for the Prefect CLI: `prefect --no-prompt deploy --all` registers every deployment."""

import os
import subprocess
import sys

from deployments.register import register
from tests.conftest import POOL, ROOT


def test_prefect_deploy_all(prefect_api, deployed):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings(updates={PREFECT_API_URL: prefect_api}), get_client(sync_client=True) as client:
        if "local" not in [p.name for p in client.read_work_pools()]:
            client.create_work_pool(WorkPoolCreate(name="local", type="process"))
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
        deployment = client.read_deployment_by_name("custom/run")
        assert deployment.work_pool_name == "local"
        assert deployment.entrypoint == "flows/custom.py:custom_run"
        assert deployment.pull_steps[0]["prefect.deployments.steps.set_working_directory"]["directory"] == str(ROOT)
        assert client.read_deployment_by_name("eval/mmlu-pro").entrypoint == "flows/evals/mmlu_pro.py:mmlu_pro"
        check_scheduled_evals(client)
        register(pool=POOL)  # give the end-to-end tests their pool back
        check_scheduled_evals(client)  # registering again from Python updates the schedules, adds no copies


def check_scheduled_evals(client):
    nightly = client.read_deployment_by_name("eval/mmlu-pro-nightly")
    assert nightly.parameters["model"] == "ftjob:latest" and nightly.parameters["artifact_key"] == "nightly-mmlu-pro"
    (schedule,) = nightly.schedules
    assert schedule.schedule.cron == "0 3 * * *" and schedule.schedule.timezone == "UTC"
    assert schedule.active is False  # inactive until someone turns it on
    weekly = client.read_deployment_by_name("eval/inspect-ai-weekly")
    assert [s.active for s in weekly.schedules] == [False]
    assert weekly.parameters["eval_name"] == "inspect_evals/gpqa_diamond"
