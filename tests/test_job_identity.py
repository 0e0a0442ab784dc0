"""One identity for every entry point, on the session's real Prefect server and `process` worker: a run that
`prefect deployment run` starts for a job the SDK completed runs nothing; `force_rerun` and `restart` run again
and keep every run's outputs; two identical runs started at once do the work once; a run that crashed before its
flow started is still a job `ow` finds. The `ow` and `prefect` commands run as the user runs them."""

import json
import os
import re
import subprocess
import sys
import uuid

import pytest

from ow_prefect import OpenWeights
from ow_prefect.jobs.submit import cached_tag, job_tag
from ow_prefect.storage import Storage
from tests.conftest import POOL, ROOT
from tests.helpers import EVENT_SECONDS, eventually
from tests.test_cli import ow

pytestmark = pytest.mark.usefixtures("worker", "use_server")

# Each run of this command stores a new token: the outputs of two runs always differ.
TOKEN = (
    "python -c \"import json, os, uuid; json.dump({'token': uuid.uuid4().hex}, open(os.environ['OW_OUTPUTS'], 'w'))\""  # noqa: E501
)


def deployment_run(api: str, deployment: str, params: dict) -> str:
    """`prefect deployment run DEPLOYMENT --param k=v ...`; returns the flow run id it printed. Prefect reads a
    value as JSON, and a text with a double quote must be written as JSON (a user quotes it the same way)."""
    cli = [sys.executable, "-m", "prefect", "deployment", "run", deployment]
    for key, value in params.items():
        text = value if isinstance(value, str) and '"' not in value else json.dumps(value)
        cli += ["--param", f"{key}={text}"]
    result = subprocess.run(cli, env=server_env(api), capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stdout + result.stderr
    return re.search(r"UUID: ([0-9a-f-]{36})", result.stdout)[1]


def final_run(flow_run_id: str, timeout: float = 300):
    from prefect.client.orchestration import get_client

    def read():
        with get_client(sync_client=True) as client:
            return client.read_flow_run(flow_run_id)

    assert eventually(lambda: read().state.is_final(), timeout=timeout, interval=1), read().state
    return read()


def task_runs_of(flow_run_id) -> list:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with get_client(sync_client=True) as client:
        return client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))


def events_of(flow_run_id, name: str) -> list:
    from prefect.client.orchestration import get_client
    from prefect.events.filters import EventAnyResourceFilter, EventFilter, EventNameFilter

    event_filter = EventFilter(
        event=EventNameFilter(name=[name]), any_resource=EventAnyResourceFilter(id=[f"prefect.flow-run.{flow_run_id}"])
    )
    with get_client(sync_client=True) as client:
        return client.read_events(filter=event_filter, limit=50).events


def server_env(api: str) -> dict[str, str]:
    return {**os.environ, "PREFECT_API_URL": api}


def test_a_cli_run_of_a_job_the_sdk_completed_trains_nothing(tiny_model, datasets_dir, prefect_api, tmp_path):
    """The acceptance of issue 17: SDK, then `prefect deployment run` with the same parameters."""
    sdk = OpenWeights()
    params = {
        "model": str(tiny_model),
        "training_file": sdk.files.upload(datasets_dir / "conversations.jsonl", purpose="conversations").id,
        "max_steps": 3,
        "r": 8,
        "per_device_train_batch_size": 4,
        "gradient_accumulation_steps": 1,
        "seed": 1717,
    }
    job = sdk.fine_tuning.create(**params).wait(timeout=600, poll_interval=1)
    adapter, merged = job.outputs["adapter"], job.outputs["merged"]
    assert eventually(lambda: events_of(job.flow_run_id, "ow.train.metrics"), timeout=EVENT_SECONDS), "it trained"
    # the trainer's progress is in the run's Prefect logs (the UI's Logs tab), not only on the worker's stdout
    assert eventually(lambda: re.search(r"step 3/3  loss [0-9.]+  lr [0-9.e+-]+", job.logs())), job.logs()[-2000:]

    cli_run = final_run(deployment_run(prefect_api, "finetune/sft", params))
    assert cli_run.state.is_completed(), cli_run.state
    assert job.flow_run_id in cli_run.state.message and "already completed" in cli_run.state.message
    assert task_runs_of(cli_run.id) == [], "no work task ran"
    assert cached_tag(job.id) in cli_run.tags and job_tag(job.id) not in cli_run.tags
    assert not events_of(cli_run.id, "ow.train.metrics")

    again = sdk.jobs.retrieve(job.id)
    assert (again.flow_run_id, again.outputs["adapter"], again.run_count) == (job.flow_run_id, adapter, 1)
    assert [record["adapter"] for record in sdk.jobs.history(job.id)] == [adapter], "nothing was written"
    listed = ow("ls", "--limit", "500", env=server_env(prefect_api)).stdout.split()
    assert listed.count(job.id) == 1

    shown = ow("show", job.id, env=server_env(prefect_api))
    assert shown.returncode == 0, shown.stderr
    assert f"{job.id}  fine_tuning  completed" in shown.stdout and f"adapter              {adapter}" in shown.stdout
    assert f"{prefect_api.removesuffix('/api')}/runs/flow-run/{job.flow_run_id}" in shown.stdout
    assert "train_loss" in shown.stdout and "loss_curve.svg" in shown.stdout
    as_json = json.loads(ow("show", job.id, "--json", env=server_env(prefect_api)).stdout)
    assert as_json["outputs"]["merged"] == merged and as_json["cost"] == [] and len(as_json["history"]) == 1

    fetched = ow("fetch", job.id, "-o", str(tmp_path / "made"), env=server_env(prefect_api))
    assert fetched.returncode == 0, fetched.stderr
    assert (tmp_path / "made" / "adapter" / "adapter_model.safetensors").exists()
    assert (tmp_path / "made" / "merged" / "config.json").exists()
    assert (tmp_path / "made" / "loss_curve.svg").read_text().startswith("<svg")
    ow("fetch", job.id, "--no-weights", "-o", str(tmp_path / "files"), env=server_env(prefect_api))
    assert sorted(p.name for p in (tmp_path / "files").iterdir()) == ["loss_curve.svg"]


def test_force_rerun_and_restart_run_again_and_keep_every_runs_outputs(prefect_api):
    sdk = OpenWeights()
    entrypoint = f"{TOKEN} # {uuid.uuid4().hex[:8]}"
    first = sdk.custom.create(entrypoint=entrypoint).wait(timeout=180, poll_interval=0.5)

    forced = final_run(deployment_run(prefect_api, "custom/run", {"entrypoint": entrypoint, "force_rerun": True}))
    assert forced.state.is_completed() and job_tag(first.id) in forced.tags
    job = sdk.jobs.retrieve(first.id)
    assert job.flow_run_id == str(forced.id) and job.run_count == 2
    assert job.outputs["token"] != first.outputs["token"]

    restarted = sdk.jobs.restart(first.id)
    assert restarted.flow_run_id == str(forced.id)
    restarted = restarted.wait(timeout=180, poll_interval=0.5)
    assert restarted.run_count == 3

    history = sdk.jobs.history(first.id)
    assert [record["token"] for record in history[:2]] == [first.outputs["token"], job.outputs["token"]]
    assert history[-1] == restarted.outputs and len({record["token"] for record in history}) == 3
    assert [record["run_count"] for record in history] == [1, 1, 2]
    # the first run's own record is still in storage as it was written
    key = f"outputs/{first.id}/runs/{first.flow_run_id}-1.json"
    assert Storage.from_settings().get_json(key) == first.outputs

    long = [line.split("\t") for line in ow("ls", "-l", env=server_env(prefect_api)).stdout.splitlines()]
    rows = [row for row in long if row[0] == first.id]
    assert len(rows) == 1 and rows[0][4:] == [str(forced.id), "3"], rows


def test_two_identical_runs_started_at_once_do_the_work_once(prefect_api, tmp_path):
    marker = tmp_path / "worked"
    entrypoint = f"echo working >> {marker}; sleep 20"
    starts = [
        subprocess.Popen(
            [sys.executable, "-m", "prefect", "deployment", "run", "custom/run", "--param", f"entrypoint={entrypoint}"],
            env=server_env(prefect_api),
            stdout=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    run_ids = [re.search(r"UUID: ([0-9a-f-]{36})", proc.communicate(timeout=180)[0])[1] for proc in starts]
    runs = [final_run(run_id, timeout=400) for run_id in run_ids]
    assert all(run.state.is_completed() for run in runs), [run.state for run in runs]
    assert marker.read_text() == "working\n", "the command ran once"

    job_id = OpenWeights().custom.validate(entrypoint=entrypoint)
    (worked,) = [run for run in runs if job_tag(job_id) in run.tags]
    (waited,) = [run for run in runs if cached_tag(job_id) in run.tags]
    assert str(worked.id) in waited.state.message and task_runs_of(waited.id) == []
    # it waited on the job's lock (the runs overlapped), and said for which run
    assert f"'{worked.name}' ({worked.id}) is running job {job_id}: waiting" in _run_logs(waited.id)
    assert OpenWeights().jobs.retrieve(job_id).flow_run_id == str(worked.id)
    assert ow("ls", "--limit", "500", env=server_env(prefect_api)).stdout.split().count(job_id) == 1


def _run_logs(flow_run_id) -> str:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

    with get_client(sync_client=True) as client:
        logs = client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])))
    return "\n".join(log.message for log in logs)


def test_a_run_that_crashed_before_its_flow_started_is_a_failed_job(prefect_api):
    """The pull step fails (as a pod's does when the code is not where the deployment says), so the flow never
    runs and never tags the run: `ow ls --status failed` still lists it, under the id its parameters give."""
    from prefect.client.orchestration import get_client
    from prefect.flows import load_flow_from_entrypoint

    entrypoint = "flows/custom.py:custom_run"
    flow = load_flow_from_entrypoint(str(ROOT / entrypoint))
    with get_client(sync_client=True) as client:
        client.create_deployment(
            flow_id=client.create_flow_from_name(flow.name),
            name="broken-pull",
            entrypoint=entrypoint,
            work_pool_name=POOL,
            parameter_openapi_schema=flow.parameters.model_dump(mode="json"),
            pull_steps=[{"prefect.deployments.steps.set_working_directory": {"directory": "/nonexistent/ow_prefect"}}],
        )
    command = f"echo never runs {uuid.uuid4().hex[:8]}"
    crashed = final_run(deployment_run(prefect_api, "custom/broken-pull", {"entrypoint": command}), timeout=180)
    assert crashed.state.type.value in ("CRASHED", "FAILED") and not any(t.startswith("ow-") for t in crashed.tags)

    job_id = OpenWeights().custom.validate(entrypoint=command)
    env = server_env(prefect_api)
    assert job_id in ow("ls", "--status", "failed", env=env).stdout.split()
    assert job_id not in ow("ls", "--status", "completed", env=env).stdout.split()
    shown = ow("show", job_id, env=env)
    assert shown.returncode == 0, shown.stderr
    assert f"{job_id}  custom  failed ({crashed.state.name})" in shown.stdout and str(crashed.id) in shown.stdout
