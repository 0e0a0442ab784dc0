"""The embedded default: no server, no worker; flows run in this process on Prefect's ephemeral API."""

import os
import re

import pytest

from ow_prefect import AsyncOpenWeights, JobFailedError, OpenWeights
from tests.helpers import eventually

SCRIPT = """
import json, os, sys
print("hello from the job", sys.argv[1:])
os.makedirs("uploads/sub", exist_ok=True)
open("uploads/answer.txt", "w").write("42")
open("uploads/sub/more.txt", "w").write("more")
json.dump({"score": 0.5}, open(os.environ["OW_OUTPUTS"], "w"))
"""


def test_custom_job_end_to_end(script_file, tmp_path):
    ow = OpenWeights()
    assert ow.embedded
    file_id = script_file(SCRIPT)
    job = ow.custom.create(entrypoint="python job.py embedded", mounts={"job.py": file_id})
    assert job.status == "completed", job.error
    assert job.outputs["score"] == 0.5
    assert set(job.outputs["files"]) == {"answer.txt", "sub/more.txt"}
    assert eventually(lambda: "hello from the job ['embedded']" in ow.jobs.logs(job.id))
    out = job.download(tmp_path / "out")
    assert (out / "answer.txt").read_text() == "42" and (out / "sub" / "more.txt").read_text() == "more"

    again = ow.custom.create(mounts={"job.py": file_id}, entrypoint="python job.py embedded")
    assert again.id == job.id and again.flow_run_id == job.flow_run_id
    assert job.id in [j.id for j in ow.jobs.list(status="completed", type="custom")]
    assert ow.jobs.retrieve(job.id).outputs == job.outputs


def test_the_logs_of_a_job_are_read_to_the_last_line():
    """Prefect answers at most 200 log lines per request: `ow.jobs.logs` and `run.logs()` read every page."""
    ow = OpenWeights()
    job = ow.custom.create(entrypoint=f"python -c \"for i in range(1000): print('line', i)\" # {os.getpid()}")
    assert job.status == "completed", job.error

    def numbers(text: str) -> list[int]:
        return [int(n) for n in re.findall(r" line (\d+)$", text, re.MULTILINE)]

    assert eventually(lambda: numbers(ow.jobs.logs(job.id)) == list(range(1000)))
    assert numbers(job.logs()) == numbers(job.runs[-1].logs()) == list(range(1000))


def test_failed_command_fails_the_job_with_its_output(script_file):
    ow = OpenWeights()
    job = ow.custom.create(entrypoint="echo about to fail; exit 3")
    assert job.status == "failed"
    assert "exited with code 3" in job.error and "about to fail" in job.error
    with pytest.raises(JobFailedError, match="exited with code 3"):
        job.wait(timeout=5)


def test_direct_flow_call_caches_the_work_under_the_job_id(script_file):
    """Calling the flow from Python (no deployment) runs the work once; the second call returns the stored
    outputs; force_rerun runs it again, keeping the first run's outputs in the job's history."""
    from flows.custom import custom_run

    counter = script_file(
        "import pathlib, os; p = pathlib.Path(os.environ['OW_HOME'], 'count'); "
        "p.write_text(str(int(p.read_text()) + 1 if p.exists() else 1))"
    )
    first = custom_run(entrypoint="python count.py", mounts={"count.py": counter})
    second = custom_run(entrypoint="python count.py", mounts={"count.py": counter})
    assert first == second
    from ow_prefect.settings import get_settings

    assert (get_settings().home_dir / "count").read_text() == "1"
    forced = custom_run(entrypoint="python count.py", mounts={"count.py": counter}, force_rerun=True)
    assert (get_settings().home_dir / "count").read_text() == "2" and forced["flow_run_id"] != first["flow_run_id"]
    ow = OpenWeights()
    job_id = ow.custom.validate(entrypoint="python count.py", mounts={"count.py": counter})
    assert ow.jobs.history(job_id) == [first, forced] and ow.jobs.retrieve(job_id).outputs == forced


async def test_async_twin_runs_embedded_jobs_too():
    async with AsyncOpenWeights() as ow:
        job = await ow.custom.create(entrypoint="echo async twin")
        assert job.status == "completed"
        assert (await job.refresh()).flow_run_id == job.flow_run_id
        assert [j.id for j in await ow.jobs.list(type="custom", limit=50)].count(job.id) == 1


def test_outputs_that_are_not_a_json_object_fail_the_job_clearly():
    job = OpenWeights().custom.create(entrypoint='echo "[1, 2]" > "$OW_OUTPUTS"')
    assert job.status == "failed" and "must hold a JSON object, not list" in job.error


def test_an_api_whose_server_dies_before_serving_raises_job_failed_naming_the_job(tiny_model, tmp_path, monkeypatch):
    """`up()` on an API job that ends before it serves: JobFailedError carrying the job and vLLM's last words (it
    once raised an AttributeError from building the error). Here vLLM's interpreter is a script that fails."""
    broken = tmp_path / "python"
    broken.write_text("#!/bin/sh\necho 'no vLLM in this interpreter' >&2\nexit 7\n")
    broken.chmod(0o755)
    monkeypatch.setenv("OW_VLLM_PYTHON", str(broken))
    api = OpenWeights().api.deploy(str(tiny_model), max_model_len=200, max_num_seqs=3, keep_alive=30)
    with pytest.raises(JobFailedError, match="ended failed before serving") as failed:
        api.up()
    assert failed.value.job.id == api.job_id and "no vLLM in this interpreter" in failed.value.job.error
