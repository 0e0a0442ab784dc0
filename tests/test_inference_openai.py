"""Batch inference with OpenAI models against tests/fake_openai.py (a FAKE OpenAI server with the chat, Files
and Batches routes as OpenAI documents them: OpenAI has no local stand-in). Embedded jobs, real Prefect."""

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import threading

import pytest

from ow_prefect import OpenWeights, ParameterError
from ow_prefect.jobs.inference import OPENAI_DEPLOYMENT, InferenceJob
from ow_prefect.testing.servers import seed_database
from ow_prefect.testing.tiny_model import write_jsonl
from tests.conftest import ROOT
from tests.fake_openai import FakeOpenAI
from tests.helpers import eventually

KEY = "sk-test-0penai-k3y-that-must-never-show"
MODEL = "openai/gpt-4o-mini"


@pytest.fixture
def fake(monkeypatch, tmp_path):
    with FakeOpenAI(api_key=KEY) as server:
        monkeypatch.setenv("OPENAI_BASE_URL", server.url)
        monkeypatch.setenv("OPENAI_API_KEY", KEY)
        monkeypatch.setenv("OW_CHAT_CACHE_DIR", str(tmp_path / "chat-cache"))
        monkeypatch.setenv("OW_OPENAI_BATCH_POLL_SECONDS", "0.05")
        yield server


def upload(rows, path):
    return OpenWeights().files.upload(write_jsonl(rows, path), purpose="conversations").id


@pytest.fixture(scope="module")
def prompts(session_dir):
    """Six questions; row 3's is refused by the fake (a per-row failure)."""
    rows = [{"messages": [{"role": "user", "content": f"question number {i}"}], "row": i} for i in range(6)]
    rows[3]["messages"][0]["content"] = "FAIL this one"
    return upload(rows, session_dir / "openai-prompts.jsonl")


def result_rows(ow, job):
    assert job.status == "completed", job.error
    return [json.loads(line) for line in ow.files.content(job.outputs["result_file"]).decode().splitlines()]


def sent_bodies(fake):
    return [json.loads(body) for body in fake.requests]


def check_rows(rows, n=1):
    """Every input row, in order, with the fake's answer (the question reversed); row 3 failed in its place."""
    assert [row["row"] for row in rows] == list(range(6))
    for row in rows:
        if row["row"] == 3:
            assert row["completion"] is None and "400" in row["error"] and "injected failure" in row["error"]
            continue
        expected = f"question number {row['row']}"[::-1]
        assert row["completion"] == ([expected] + [f"{expected} #{i}" for i in range(1, n)] if n > 1 else expected)
        assert "error" not in row


def test_the_batch_api_keeps_input_order_maps_parameters_and_reports_failed_rows(fake, prompts):
    ow = OpenWeights()
    params = dict(max_tokens=20, temperature=0.7, top_p=0.9, stop=["\n\n"], n_completions_per_prompt=2, logprobs=2)
    job = ow.inference.create(model=MODEL, input_file_id=prompts, seed=1, **params)
    assert job.params["use_batch"] is True  # OpenWeights' default, resolved before the id is computed
    rows = result_rows(ow, job)
    check_rows(rows, n=2)  # the fake writes its output file in reverse: rows come back by custom_id
    first = rows[0]["logprobs"]
    assert len(first) == 2 and first[0][0] == {
        "token": "0",
        "logprob": -0.25,
        "top_logprobs": [{"token": "0", "logprob": -0.25}, {"token": "0~1", "logprob": -0.5}],
    }
    assert {"failed_rows": 1, "rows": 6}.items() <= job.outputs.items() and job.outputs["generated_tokens"] > 0
    (batch_id,) = job.outputs["openai_batches"]
    batch = fake.batches[batch_id]
    assert batch["endpoint"] == "/v1/chat/completions" and batch["metadata"]["ow_job"] == job.id
    assert fake.files[batch["input_file_id"]].get("deleted")  # not left in the organisation's storage
    body = sent_bodies(fake)[0]
    assert body == {
        "model": "gpt-4o-mini",
        "messages": body["messages"],
        "max_completion_tokens": 20,
        "temperature": 0.7,
        "top_p": 0.9,
        "stop": ["\n\n"],
        "n": 2,
        "seed": 1,
        "logprobs": True,
        "top_logprobs": 2,
    }
    assert len(sent_bodies(fake)) == 6


def test_the_chat_client_path_gives_the_same_result_file_and_retries(fake, prompts):
    ow = OpenWeights()
    params = dict(model=MODEL, input_file_id=prompts, max_tokens=30, logprobs=1, temperature=0.5, seed=2)
    batch_rows = result_rows(ow, ow.inference.create(**params))
    fake.requests.clear()
    fake.fail(429, times=2, retry_after=0)
    job = ow.inference.create(**params, use_batch=False)
    assert "openai_batches" not in job.outputs and job.outputs["failed_rows"] == 1
    chat_rows = result_rows(ow, job)
    check_rows(chat_rows)
    assert chat_rows == batch_rows  # the same shape whichever route answered
    assert sum(fake.requests.values()) == 6 + 2  # two 429s retried (the failed row's 400 is not)
    fake.requests.clear()
    again = ow.inference.create(**params, use_batch=False, n_completions_per_prompt=1)
    assert again.id == job.id  # the same job: nothing sent again
    assert not fake.requests


def test_more_rows_than_one_batch_holds_become_several_batches_in_order(fake, prompts, monkeypatch):
    import flows.inference.openai_models as openai_flow

    monkeypatch.setattr(openai_flow, "MAX_BATCH_REQUESTS", 4)
    ow = OpenWeights()
    job = ow.inference.create(model=MODEL, input_file_id=prompts, max_tokens=40, seed=3)
    check_rows(result_rows(ow, job))
    first, second = (fake.batches[b] for b in job.outputs["openai_batches"])
    assert (first["metadata"]["first_row"], second["metadata"]["first_row"]) == ("0", "4")
    assert first["request_counts"]["total"] == 4 and second["request_counts"]["total"] == 2
    restarted = job.restart().wait()  # its batches completed: picked up again, not paid for twice
    assert restarted.outputs["openai_batches"] == job.outputs["openai_batches"] and len(fake.batches) == 2
    check_rows(result_rows(ow, restarted))


def test_an_expired_batch_keeps_its_answers_and_a_failed_one_fails_the_job_with_openai_s_reason(fake, prompts):
    ow = OpenWeights()
    fake.batch_outcome = "expired"
    rows = result_rows(ow, ow.inference.create(model=MODEL, input_file_id=prompts, max_tokens=45, seed=7))
    assert [row["completion"] is not None for row in rows] == [True, True, True, False, False, False]
    assert rows[4]["error"] == "batch_expired: This request could not be executed before the batch expired."
    fake.batch_outcome = "failed"
    failed = ow.inference.create(model=MODEL, input_file_id=prompts, max_tokens=46, seed=7)
    assert failed.status == "failed" and "answered none of the 6 rows" in failed.error
    assert "(status failed: invalid_json_line: injected validation failure)" in failed.error


def test_cancelling_the_job_cancels_its_openai_batch(fake, prompts):
    ow = OpenWeights()
    params = dict(model=MODEL, input_file_id=prompts, max_tokens=50, seed=4)
    job_id = InferenceJob.compute_id(InferenceJob.flow_parameters(InferenceJob.validate_params(**params)))
    ow.jobs.list(limit=1)  # the embedded API is up before two threads use it
    fake.hold_batches = True
    finished = {}
    runner = threading.Thread(target=lambda: finished.update(job=ow.inference.create(**params)))
    runner.start()
    eventually(lambda: fake.batches and next(iter(fake.batches.values()))["status"] == "in_progress", timeout=60)
    ow.jobs.cancel(job_id)
    runner.join(timeout=60)
    assert not runner.is_alive() and finished["job"].status == "canceled"
    (batch,) = fake.batches.values()
    assert batch["status"] in ("cancelling", "cancelled")
    fake.hold_batches = False
    retried = ow.inference.create(**params)  # a cancelled batch is not picked up again: a new one
    assert retried.status == "completed" and len(fake.batches) == 2
    check_rows(result_rows(ow, retried))


def test_a_terminated_run_cancels_its_openai_batch(fake, prompts, tmp_path, prefect_database):
    """What a worker does to a cancelled run: SIGTERM to the flow's process (Prefect raises TerminationSignal
    in the flow). Here the flow runs embedded in a child process, so the signal reaches it the same way."""
    fake.hold_batches = True
    script = (
        "from ow_prefect import OpenWeights\n"
        f"OpenWeights().inference.create(model={MODEL!r}, input_file_id={prompts!r}, max_tokens=80, seed=5)\n"
    )
    seed_database(tmp_path / "prefect", prefect_database)
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect")}  # its own embedded API
    log = (tmp_path / "child.log").open("w")
    child = subprocess.Popen(
        [sys.executable, "-c", script], env=env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )
    try:
        assert eventually(lambda: [b for b in fake.batches.values() if b["status"] == "in_progress"], timeout=240)
        child.send_signal(signal.SIGTERM)
        child.wait(timeout=120)
    finally:
        with contextlib.suppress(ProcessLookupError):  # the child's embedded Prefect server outlives it otherwise
            os.killpg(child.pid, signal.SIGKILL)
        child.wait()
    (batch,) = fake.batches.values()
    assert batch["status"] in ("cancelling", "cancelled"), (tmp_path / "child.log").read_text()[-3000:]


@pytest.mark.parametrize(
    ("rows", "params", "message"),
    [
        (None, {"prefill": "Sure,"}, "prefill: OpenAI's chat API cannot continue"),
        (None, {"min_tokens": 5}, "min_tokens: OpenAI's chat API has no minimum"),
        (None, {"stop": ["a", "b", "c", "d", "e"]}, "at most 4 stop strings, not 5"),
        (None, {"quantization": "awq", "max_model_len": 4096}, "max_model_len, quantization: vLLM settings"),
        (None, {"requires_vram_gb": 24}, "requires_vram_gb: vLLM settings"),
        ([{"text": "raw text"}], {}, "line 1: raw text, not 'messages'"),
        (
            [{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "The answer is"}]}],
            {},
            "line 1: ends with an assistant message",
        ),
    ],
)
def test_what_openai_cannot_do_is_refused_before_anything_is_sent(fake, prompts, rows, params, message, tmp_path):
    input_file = upload(rows, tmp_path / "bad.jsonl") if rows else prompts
    with pytest.raises(ParameterError, match=re.escape(message)):
        OpenWeights().inference.create(model=MODEL, input_file_id=input_file, **params)
    assert not fake.requests and not fake.files and not fake.batches


def test_use_batch_is_for_openai_models_only(prompts):
    with pytest.raises(ParameterError, match="use_batch applies to OpenAI models"):
        OpenWeights().inference.create(model="Qwen/Qwen2.5-0.5B-Instruct", input_file_id=prompts, use_batch=False)


def test_openai_jobs_run_on_a_process_pool_without_a_gpu(fake, prompts):
    validated = InferenceJob.validate_params(model="gpt-4.1", input_file_id=prompts, use_batch=False)
    assert InferenceJob.deployment_for(validated) == OPENAI_DEPLOYMENT
    assert InferenceJob.job_variables(validated) == {}  # no min_vram_gb (and no look-up of a model config)


@pytest.mark.usefixtures("use_server", "deployed")
def test_on_a_server_openai_jobs_are_submitted_to_inference_openai_with_no_gpu_variables(fake, prompts):
    from prefect.client.orchestration import get_client

    ow = OpenWeights()
    job = ow.inference.create(model=MODEL, input_file_id=prompts, max_tokens=90, seed=6)
    try:
        with get_client(sync_client=True) as client:
            run = client.read_flow_run(job.flow_run_id)
            assert client.read_deployment(run.deployment_id).name == "openai"
            assert "min_vram_gb" not in (run.job_variables or {})
            assert run.parameters["use_batch"] is True and KEY not in json.dumps(run.parameters)
    finally:
        ow.jobs.cancel(job.id)  # no worker here has the fake's address


def test_the_key_reaches_no_parameter_log_result_or_artifact(fake, prompts):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId, LogFilter, LogFilterFlowRunId

    ow = OpenWeights()
    jobs = [ow.inference.create(model=MODEL, input_file_id=prompts, max_tokens=60, use_batch=b) for b in (True, False)]
    with get_client(sync_client=True) as client:
        for job in jobs:
            run = client.read_flow_run(job.flow_run_id)
            log_filter = LogFilter(flow_run_id=LogFilterFlowRunId(any_=[run.id]))
            logs = eventually(lambda f=log_filter: len(found := client.read_logs(log_filter=f)) >= 3 and found)
            artifacts = client.read_artifacts(
                artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[run.id]))
            )
            assert logs  # the check below reads real log lines (they reach the server a moment late)
            seen = [
                json.dumps(run.parameters),
                json.dumps(job.outputs),
                ow.files.content(job.outputs["result_file"]).decode(),
                *(log.message for log in logs),
                *(json.dumps(artifact.data, default=str) for artifact in artifacts),
            ]
            assert not [text for text in seen if KEY in text or KEY[-12:] in text]
    fake.api_key = "sk-another"  # OpenAI refuses the key: the job fails, and says so without it
    failed = ow.inference.create(model=MODEL, input_file_id=prompts, max_tokens=70, use_batch=False)
    assert failed.status == "failed" and "401" in failed.error and KEY not in failed.error
