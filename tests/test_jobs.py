"""Job types, the registry, parameter validation and submission semantics (no server needed)."""

from types import SimpleNamespace

import pytest
from pydantic import BaseModel, ConfigDict

from ow_prefect import Job, OpenWeights, ParameterError, register
from ow_prefect.jobs import get_job_type
from ow_prefect.jobs.custom import CommandJob
from ow_prefect.jobs.submit import idempotency_key, plan, status_of, tags_for

FILE = "custom_job_file:file-0123456789ab"


class EchoParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    word: str


@register("echo_test")
class EchoJob(Job):
    deployment = "custom/run"
    entrypoint = "flows/custom.py:custom_run"
    params = EchoParams
    code = ("flows/custom.py",)


def test_register_makes_the_type_available_on_every_client():
    assert get_job_type("echo_test") is EchoJob
    ow = OpenWeights()
    assert ow.echo_test.job_cls is EchoJob
    assert ow.custom.job_cls is CommandJob
    with pytest.raises(AttributeError, match="no job type 'nope'"):
        ow.nope  # noqa: B018


def test_register_checks_its_input():
    with pytest.raises(ValueError):
        register("not an identifier")
    with pytest.raises(TypeError, match="must define 'params'"):
        register("broken")(type("Broken", (Job,), {"deployment": "x/y", "entrypoint": "a.py:f"}))


def test_unknown_and_invalid_params_are_rejected_with_field_names():
    ow = OpenWeights()
    with pytest.raises(ParameterError, match=r"wrod: Extra inputs are not permitted"):
        ow.echo_test.validate(wrod="x")
    with pytest.raises(ParameterError, match=r"requires_vram_gb: Input should be greater than or equal to 0"):
        ow.custom.validate(entrypoint="true", requires_vram_gb=-1)


@pytest.mark.parametrize("target", ["../x.py", "/etc/passwd", "a/../../b", ""])
def test_mount_targets_that_escape_the_work_dir_are_rejected(target):
    with pytest.raises(ParameterError, match="escapes the work dir"):
        OpenWeights().custom.validate(entrypoint="true", mounts={target: FILE})


def test_mounts_are_file_ids_or_existing_local_paths():
    with pytest.raises(ParameterError, match=r"mounts\['a.py'\]: 'a.py' does not exist"):
        OpenWeights().custom.validate(entrypoint="true", mounts={"a.py": "a.py"})
    with pytest.raises(ParameterError, match="is neither a file id nor an existing local file"):
        CommandJob.validate_params(entrypoint="true", mounts={"a.py": "a.py"})


def test_validate_returns_the_job_id_stable_across_key_order():
    ow = OpenWeights()
    a = ow.custom.validate(entrypoint="python a.py", mounts={"a.py": FILE, "b/c.py": FILE})
    b = ow.custom.validate(mounts={"b/c.py": FILE, "a.py": FILE}, entrypoint="python a.py")
    assert a == b and a.startswith("customjob-")
    assert ow.custom.validate(entrypoint="python b.py") != a


def run(state_type: str, deployment: bool = True):
    return SimpleNamespace(
        state=SimpleNamespace(type=SimpleNamespace(value=state_type)), deployment_id="d" if deployment else None
    )


@pytest.mark.parametrize(
    "state,status",
    [
        ("SCHEDULED", "pending"),
        ("PENDING", "pending"),
        ("PAUSED", "pending"),
        ("RUNNING", "in_progress"),
        ("CANCELLING", "in_progress"),
        ("COMPLETED", "completed"),
        ("FAILED", "failed"),
        ("CRASHED", "failed"),
        ("CANCELLED", "canceled"),
    ],
)
def test_status_mapping(state, status):
    assert status_of(run(state)) == status


def test_submission_plan():
    assert plan(None) == "create"
    for state in ("SCHEDULED", "PENDING", "RUNNING", "CANCELLING", "COMPLETED"):
        assert plan(run(state)) == "existing"
    for state in ("FAILED", "CRASHED", "CANCELLED"):
        assert plan(run(state)) == "retry"
        assert plan(run(state, deployment=False)) == "create"


def test_tags_and_idempotency_key_name_the_deployment_and_job():
    assert idempotency_key("finetune/dpo", "ftjob-abc") == "finetune/dpo:ftjob-abc"
    assert tags_for(CommandJob, "customjob-1") == ["ow-job", "ow-job:customjob-1", "ow-type:custom"]


@pytest.mark.parametrize(
    "state,cancel",
    [("SCHEDULED", "CANCELLED"), ("PAUSED", "CANCELLED"), ("PENDING", "CANCELLING"), ("RUNNING", "CANCELLING")],
)
def test_only_an_unclaimed_run_is_cancelled_outright(state, cancel):
    """A PENDING run's process may be starting, and Prefect lets a Cancelled run move on to Running."""
    from ow_prefect.client.jobs import _cancel_state

    assert _cancel_state(run(state)).type.value == cancel


def test_equal_jobs_hash_equal():
    def handle(status: str) -> Job:
        return Job(id="customjob-0123456789ab", type="custom", status=status, params={}, flow_run_id="run-1")

    pending, completed = handle("pending"), handle("completed")  # the same job read twice, before and after
    assert pending == completed and hash(pending) == hash(completed)
    assert len({pending, completed}) == 1 and completed in {pending: "seen"}


VRAM_JOBS = {
    "fine_tuning": {"model": "nowhere/Model-8B", "training_file": "{file}"},
    "inference": {"model": "nowhere/Model-8B", "input_file_id": "{file}"},
    "logprob": {"model": "nowhere/Model-8B", "dataset": "{file}"},
    "vllm_api": {"model": "nowhere/Model-8B"},
}


@pytest.mark.parametrize("name", VRAM_JOBS)
def test_gpu_job_types_ask_the_worker_for_their_estimate_or_for_requires_vram_gb(name):
    conversation = b'{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}\n'
    file_id = OpenWeights().files.create(conversation, purpose="conversations").id
    params = {key: value.replace("{file}", file_id) for key, value in VRAM_JOBS[name].items()}
    job_cls = get_job_type(name)
    estimated = job_cls.job_variables(job_cls.validate_params(**params))["min_vram_gb"]
    assert 16 <= estimated <= 200, "an 8B model, estimated from its name"
    given = job_cls.job_variables(job_cls.validate_params(**params, requires_vram_gb=7))
    assert given["min_vram_gb"] == 7


def test_an_unreachable_prefect_api_is_reported_as_such_not_as_a_missing_job_or_run():
    from uuid import uuid4

    from prefect.settings import PREFECT_API_URL, temporary_settings

    from ow_prefect import PrefectUnavailableError
    from ow_prefect.testing.servers import free_port

    url = f"http://127.0.0.1:{free_port()}/api"
    with temporary_settings(updates={PREFECT_API_URL: url}):
        ow = OpenWeights()
    calls = {
        "ow.runs.retrieve": lambda: ow.runs.retrieve(str(uuid4())),
        "ow.jobs.retrieve": lambda: ow.jobs.retrieve(str(uuid4())),
        "ow.custom.create": lambda: ow.custom.create(entrypoint="echo never submitted"),
        "ow.events.list": lambda: ow.events.list(job_id="customjob-0123456789ab"),
    }
    for name, call in calls.items():
        with pytest.raises(PrefectUnavailableError, match=f"the Prefect API at {url} cannot be reached"):
            call()
            pytest.fail(f"{name} did not fail")


def test_the_logs_of_a_run_that_just_ended_are_read_once_its_last_lines_can_have_arrived(use_server):
    """The flow engine logs "Finished in state ..." after the final state is set and sends logs in batches, so
    `job.logs()` / `run.log_file` right after `wait()` waited for them (CI once read a log file one line short).
    A real flow run on the session server; its state and its late line are set through Prefect's client."""
    import asyncio
    import datetime
    import time

    from prefect import flow, get_client
    from prefect.client.schemas.actions import LogCreate
    from prefect.states import Completed, Running

    from ow_prefect.client._logs import LOGS_SETTLE_SECONDS, read_run_logs

    @flow(name="ow-test-late-logs")
    def nothing():
        pass

    def line(run_id, message, at):
        return LogCreate(name="test", level=20, message=message, timestamp=at, flow_run_id=run_id)

    async def scenario():
        async with get_client() as client:
            run = await client.create_flow_run(nothing)
            await client.set_flow_run_state(run.id, Running())
            await client.set_flow_run_state(run.id, Completed())
            ended = time.monotonic()

            async def late_line():
                await asyncio.sleep(1)
                at = datetime.datetime.now(datetime.UTC)
                await client.create_logs([line(run.id, "Finished in state Completed()", at)])

            sender = asyncio.create_task(late_line())
            logs = await read_run_logs(client, run.id)
            read_at = datetime.datetime.now(datetime.UTC)
            await sender
            assert [log.message for log in logs] == ["Finished in state Completed()"]
            end_time = (await client.read_flow_run(run.id)).end_time
            assert read_at >= end_time + datetime.timedelta(seconds=LOGS_SETTLE_SECONDS)
            assert time.monotonic() - ended < LOGS_SETTLE_SECONDS + 15

            started = time.monotonic()  # the same run, now ended long enough ago: read at once
            assert [log.message for log in await read_run_logs(client, run.id)] == ["Finished in state Completed()"]
            assert time.monotonic() - started < LOGS_SETTLE_SECONDS - 1

    asyncio.run(scenario())
