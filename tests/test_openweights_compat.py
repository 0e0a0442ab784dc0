"""Scripts written for OpenWeights run with only their import changed: the seed README's snippets and the
cookbook's scripts (sft/, preference_learning/, inference/, api-deployment/, custom_job/, inspect_eval, mmlu_pro),
written again here the way they call the SDK — item access on files, jobs and outputs, `ow.events.list`,
`job.runs`, `ow.run.log` inside a custom job, `purpose="preferences"`, `allowed_hardware`, `job_id_suffix`,
string learning rates, `{org_id}` in `finetuned_model_id`, Hugging Face LoRA adapters as models — embedded, on
the tiny local model, with OpenWeights' data formats (blocks with extra keys, message-level weights).

Training is kept small: one short SFT job carries the fine-tuning checks (callbacks, events, runs, downloads),
one weighted-SFT and one DPO job show those formats train; inference and the API reuse the session's adapter.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import sys
import time
from pathlib import Path

import pytest

from ow_prefect import Jobs, OpenWeights, OWError, ParameterError, register
from ow_prefect.testing.tiny_model import SYSTEM, sample_conversations, sample_preferences, write_jsonl
from tests.helpers import eventually

pytestmark = pytest.mark.slow

TINY_STEPS = 2
SMALL = {"max_steps": TINY_STEPS, "per_device_train_batch_size": 4, "gradient_accumulation_steps": 1}


def openweights_rows(n: int, seed: int) -> list[dict]:
    """Conversations in OpenWeights' formats: string content, blocks without a `type`, blocks and messages with
    keys nothing reads, message-level weights."""
    rows = []
    for i, row in enumerate(sample_conversations(n, seed=seed)):
        system, user, answer = row["messages"]
        if i % 3 == 1:
            answer = {"role": "assistant", "content": [{"text": answer["content"], "source": "cookbook"}]}
        elif i % 3 == 2:
            user, answer = {**user, "weight": 0}, {**answer, "weight": 1.0, "thinking": ""}
        rows.append({"messages": [system, user, answer]})
    return rows


@pytest.fixture(scope="module")
def ow() -> OpenWeights:
    return OpenWeights()


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """The cookbook's data/ folder, in OpenWeights' formats."""
    folder = tmp_path_factory.mktemp("cookbook-data")
    write_jsonl(openweights_rows(16, seed=11), folder / "train.jsonl")
    write_jsonl(openweights_rows(4, seed=12), folder / "test.jsonl")
    write_jsonl(sample_conversations(3, seed=13), folder / "logp_tracking.jsonl")
    write_jsonl([{"messages": r["messages"][:2]} for r in sample_conversations(2, seed=14)], folder / "prompts.jsonl")
    write_jsonl(sample_preferences(8), folder / "preferences.jsonl")
    return folder


@pytest.fixture(scope="module")
def sft_job(ow, data, tiny_model):
    """cookbook/sft/*.py and the seed README: upload by path, item access on the file, `allowed_hardware`,
    `requires_vram_gb=None`, a string learning rate, `{org_id}`, `job_id_suffix`, an OpenWeights image (ignored,
    with a warning), logprob tracking and sampling callbacks; then OpenWeights' polling loop."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("OW_TRAIN_BACKEND", "transformers")
        patch.setenv("HF_ORG", "nielsrolf")
        training_file = ow.files.upload(str(data / "train.jsonl"), purpose="conversations")["id"]
        test_file = ow.files.upload(path=str(data / "test.jsonl"), purpose="conversations")["id"]
        logp_file = ow.files.upload(path=str(data / "logp_tracking.jsonl"), purpose="conversations")["id"]
        prompts = ow.files.upload(path=str(data / "prompts.jsonl"), purpose="conversations")["id"]
        with pytest.warns(UserWarning, match="base_image='nielsrolf/ow-default:v0.8' ignored"):
            job = ow.fine_tuning.create(
                model=str(tiny_model),
                training_file=training_file,
                test_file=test_file,
                loss="sft",
                epochs=1,
                learning_rate="2e-3",
                r=8,
                merge_before_push=False,
                finetuned_model_id="{org_id}/{model_name}-{loss}-{job_id}",
                job_id_suffix="v1",
                requires_vram_gb=None,
                allowed_hardware=["1x L40", "1x A100", "1x A100S"],
                eval_every_n_steps=1,
                logp_callback_datasets={"in-distribution": logp_file},
                sampling_callbacks=[
                    {"dataset": prompts, "eval_steps": 1, "tag": "samples", "temperature": 1, "max_tokens": 8}
                ],
                base_image="nielsrolf/ow-default:v0.8",
                **SMALL,
            )
    while job.status in ["pending", "in_progress"]:
        time.sleep(5)
        job = job.refresh()
    assert job.status == "completed", job.error
    return job


def test_sft_cookbook_prints_the_model_id_with_its_placeholders_filled(sft_job, tiny_model):
    print(sft_job)
    pushed_to = sft_job.params["validated_params"]["finetuned_model_id"]
    assert pushed_to == f"nielsrolf/{tiny_model.name}-sft-{sft_job.id}"
    assert re.fullmatch(r"ftjob-[0-9a-f]{12}-v1", sft_job.id)
    assert sft_job["params"]["learning_rate"] == pytest.approx(2e-3)
    assert sft_job.model == str(tiny_model) and sft_job["status"] == "completed"


def test_logprob_tracking_cookbook_reads_events_of_the_last_run(ow, sft_job):
    """cookbook/sft/logprob_tracking.py: `ow.events.list(run_id=job.runs[-1].id)`, a table of `event["data"]`."""
    run = sft_job.runs[-1]
    assert run.job_id == sft_job.id and run["status"] == "completed"

    def tracked():
        return [e["data"] for e in ow.events.list(run_id=run.id) if e["data"].get("tag") == "in-distribution"]

    assert eventually(lambda: len(tracked()) >= TINY_STEPS + 1), "events reach the server a moment late"
    rows = tracked()
    assert sorted({row["step"] for row in rows}) == list(range(TINY_STEPS + 1))
    assert all(isinstance(row["value"], float) for row in rows)  # a numeric column to plot per step and tag
    assert any("loss" in e["data"] for e in ow.events.list(job_id=sft_job.id))  # the training metrics too
    latest = ow.events.latest(["step"], run_id=run.id)
    assert latest == {"step": TINY_STEPS}


def test_sampling_callback_cookbook_reads_sample_files_from_events(ow, sft_job):
    """cookbook/sft/sampling_callback.py: each `samples` event's `file` holds completions."""

    def samples():
        return [e["data"] for e in ow.events.list(run_id=sft_job.runs[-1].id) if e["data"].get("tag") == "samples"]

    assert eventually(lambda: len(samples()) >= TINY_STEPS + 1)
    for data in samples():
        rows = [json.loads(line) for line in ow.files.content(data["file"]).decode("utf-8").split("\n") if line]
        assert len(rows) == 2 and all(isinstance(row["completion"], str) for row in rows)


def test_a_failed_job_logs_and_every_run_download_the_upstream_way(ow, sft_job, tmp_path):
    """`ow.files.content(job.runs[-1].log_file)` (the cookbook's failure branch) and
    `job.download(dir, only_last_run=False)`."""

    def logs():  # logs reach the server in batches, a moment late
        return ow.files.content(sft_job.runs[-1].log_file).decode("utf-8")

    assert eventually(lambda: "Finished in state Completed" in logs()) and sft_job.id in logs()
    sft_job.download(tmp_path / "all", only_last_run=False)
    run_dir = tmp_path / "all" / sft_job.runs[-1].id
    assert (run_dir / f"{sft_job.runs[-1].id}.log").read_text() == sft_job.runs[-1].logs()
    assert (run_dir / "loss_curve.svg").exists() and (run_dir / "logprobs/in-distribution/step-000000.jsonl").exists()
    sft_job.download(tmp_path / "last")
    assert (tmp_path / "last" / "loss_curve.svg").exists()


def test_jobs_find_and_flat_params_as_the_multi_model_chat_script_uses_them(ow, sft_job, tiny_model):
    jobs = ow.jobs.find(model=str(tiny_model), merge_before_push=False, job_id_suffix="v1")
    jobs = [job for job in jobs if job["status"] == "completed"]
    assert [job.id for job in jobs] == [sft_job.id]
    assert jobs[0]["params"]["finetuned_model_id"] == sft_job.params["validated_params"]["finetuned_model_id"]
    assert ow.fine_tuning.find(meta=None, job_id_suffix="v1")[0].id == sft_job.id
    assert sft_job.id in [job.id for job in ow.jobs.list(limit=10)]


def test_weighted_sft_cookbook_trains_openweights_blocks_with_loss_sft(ow, data, tiny_model):
    """cookbook/sft/token_level_weighted_sft.py: `ow.weighted_sft.create(loss="sft", ...)` on blocks with
    extra keys and message-level weights."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("OW_TRAIN_BACKEND", "transformers")
        with pytest.warns(UserWarning, match="'source' on blocks"):
            training_file = ow.files.upload(path=str(data / "train.jsonl"), purpose="conversations")["id"]
        job = ow.weighted_sft.create(
            model=str(tiny_model),
            training_file=training_file,
            loss="sft",
            epochs=1,
            learning_rate=1e-4,
            r=8,
            optim="adamw_torch",
            requires_vram_gb=16,
            **SMALL,
        )
    assert job.status == "completed", job.error
    assert job.type == "weighted_sft" and job.params["loss"] == "weighted_sft" and job.outputs["steps"] == TINY_STEPS


def test_a_message_weight_is_the_weight_of_its_tokens(tiny_model):
    """OpenWeights' message-level `weight` (on string content) reaches weighted SFT's token weights."""
    from transformers import AutoTokenizer

    from flows.finetune import data, logprobs

    tokenizer = data.prepare_tokenizer(AutoTokenizer.from_pretrained(tiny_model), "default")
    system, user, answer = sample_conversations(1, seed=3)[0]["messages"]

    def weights(weight):
        row = {"messages": [system, user, {**answer, "weight": weight}]}
        return {w for w in logprobs.token_weights(logprobs.encode(tokenizer, row, responses_only=True)) if w}

    assert weights(1) == {1.0}
    assert weights(-0.5) == {-0.5}
    assert weights(0) == set()


def test_dpo_cookbook_uploads_preferences_and_trains(ow, data, tiny_model):
    """cookbook/preference_learning/llama3_dpo.py and llama3_orpo.py: `purpose="preferences"`."""
    training_file = ow.files.upload(str(data / "preferences.jsonl"), purpose="preferences")["id"]
    assert training_file.startswith("preference:file-")
    hardware = {"requires_vram_gb": None, "allowed_hardware": ["1x A100", "1x A100S", "1x H100S", "1x H100N"]}
    assert ow.fine_tuning.validate(model=str(tiny_model), training_file=training_file, loss="orpo", **hardware)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("OW_TRAIN_BACKEND", "transformers")
        job = ow.fine_tuning.create(
            model=str(tiny_model),
            training_file=training_file,
            loss="dpo",
            epochs=1,
            learning_rate=1e-5,
            beta=0.1,
            merge_before_push=False,
            **hardware,
            **SMALL,
        )
    assert job.status == "completed", job.error
    assert job.params["validated_params"]["loss"] == "dpo" and job.outputs["steps"] == TINY_STEPS


# ---- custom jobs: cookbook/custom_job/ ---------------------------------------------------------------------

WORKER_SIDE = """
import json
import sys

from ow_prefect import OpenWeights

ow = OpenWeights()
params = json.loads(sys.argv[1])
ow.run.log({"text": "adding", "step": 0})
with open("note.txt", "w") as f:
    f.write("the sum, attached to an event")
ow.run.log({"result": params["a"] + params["b"], "step": 1}, file=open("note.txt", "rb"))
print("result", params["a"] + params["b"])
"""


def test_custom_job_cookbook_logs_results_with_ow_run_log(ow, tmp_path, monkeypatch):
    """cookbook/custom_job/client_side.py + worker_side.py: a `Jobs` subclass, `ow.run.log` inside the job,
    `job['outputs']` (the latest logged values) and `ow.events.list(job_id=...)`."""
    from pydantic import BaseModel, Field

    # the image's `python` has ow_prefect, as the pods' images do
    monkeypatch.setenv("PATH", f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    (tmp_path / "worker_side.py").write_text(WORKER_SIDE)

    class AdditionParams(BaseModel):
        a: float = Field(..., description="First number to add")
        b: float = Field(..., description="Second number to add")

    @register("addition")
    class AdditionJob(Jobs):
        mount = {str(tmp_path / "worker_side.py"): "worker_side.py"}
        params = AdditionParams
        requires_vram_gb = 0

        def get_entrypoint(self, validated_params: AdditionParams) -> str:
            params_json = json.dumps(validated_params.model_dump())
            return f"python worker_side.py '{params_json}'"

    result = ow.addition.create(a=5, b=3, requires_vram_gb=0)
    job = ow.addition.retrieve(result["id"])
    assert job["status"] == "completed", job.error
    assert job["outputs"]["result"] == 8.0 and job["outputs"]["text"] == "adding" and job["outputs"]["step"] == 1
    assert job.params["validated_params"] == {"a": 5.0, "b": 3.0} and "worker_side.py" in job.params["mounted_files"]

    def logged():
        return [e for e in ow.events.list(job_id=result["id"]) if e["event"] == "ow.run.log"]

    assert eventually(lambda: len(logged()) == 2)
    first, second = logged()
    assert first["data"] == {"text": "adding", "step": 0} and first["file"] is None
    assert second["data"] == {"result": 8.0, "step": 1} and second["run_id"] == job.runs[-1].id
    assert ow.files.content(second["file"]) == b"the sum, attached to an event"
    assert eventually(lambda: "result 8.0" in ow.files.content(job.runs[-1].log_file).decode())


def test_ow_run_outside_a_job_says_what_to_do_instead(ow, monkeypatch):
    monkeypatch.delenv("OW_RUN_LOG", raising=False)
    with pytest.raises(OWError, match="ow exec 'python script.py'"):
        OpenWeights().run.log({"x": 1})


def test_openweights_credentials_are_refused_with_what_replaces_them():
    from ow_prefect import ConfigurationError

    with pytest.raises(ConfigurationError, match="PREFECT_API_URL"):
        OpenWeights(auth_token="ow_secret")


# ---- inference: the seed README and cookbook/inference/ ----------------------------------------------------


def test_inference_cookbook_on_a_hugging_face_adapter_directory(ow, trained_adapter, tiny_model, data, tmp_path):
    """A LoRA adapter directory as `model` (its base read from adapter_config.json), `job_id_suffix`, the
    cookbook's polling loop and `job.outputs["file"]` / the README's `job['outputs']['file']`."""
    adapter_dir = ow.files.download(trained_adapter.outputs["adapter"], tmp_path / "my-adapter")
    assert json.loads((adapter_dir / "adapter_config.json").read_text())["base_model_name_or_path"] == str(tiny_model)
    job = ow.inference.create(
        model=str(adapter_dir),
        input_file_id=ow.files.upload(str(data / "prompts.jsonl"), purpose="conversations")["id"],
        max_tokens=20,
        temperature=0,
        max_model_len=256,
        job_id_suffix="v010",
        load_format="auto",  # vLLM's own default, passed through
    )
    print(job)
    while job.refresh().status != "completed":
        assert job.status in ("pending", "in_progress"), job.error
        time.sleep(5)
    assert job.id.endswith("-v010") and job.model == str(tiny_model)
    assert job.params["model"]["name"] == str(adapter_dir) and job.params["model"]["adapter"].startswith("adapter:dir-")
    outputs_str = ow.files.content(job.outputs["file"]).decode("utf-8")
    outputs = [json.loads(line) for line in outputs_str.split("\n") if line]
    assert job["outputs"]["file"] == job.outputs["result_file"]
    print(outputs[0]["messages"][0]["content"], outputs[0]["completion"])
    assert all(re.fullmatch(r"[A-Z][a-z]+ plus [a-z]+ equals [a-z-]+\.", row["completion"]) for row in outputs)


def test_a_hub_adapter_repo_is_resolved_through_the_hub(ow, trained_adapter, tiny_model, tmp_path, monkeypatch):
    """A LoRA adapter on the Hub (`org/repo`, `org/repo/checkpoint`) as `model` and in `lora_adapters`: its
    base comes from its adapter_config.json, its files are stored, vLLM serves it under the repo's name. The Hub
    is the fake one (nothing here reaches huggingface.co); a repo without adapter_config.json is a base model."""
    import huggingface_hub.constants as hub_constants

    from ow_prefect.jobs import adapters
    from tests.fake_hub import FakeHub

    adapter_dir = ow.files.download(trained_adapter.outputs["adapter"], tmp_path / "adapter")
    files = {path.name: path.read_bytes() for path in adapter_dir.iterdir() if path.is_file()}
    with FakeHub(token="unused") as hub:
        hub.repos["ow-tester/tiny-adapter"] = {f"checkpoint-120/{name}": body for name, body in files.items()} | files
        hub.repos["ow-tester/a-base-model"] = {"config.json": b"{}"}
        monkeypatch.setattr(hub_constants, "ENDPOINT", hub.url)
        monkeypatch.setattr(
            hub_constants, "HUGGINGFACE_CO_URL_TEMPLATE", hub.url + "/{repo_id}/resolve/{revision}/{filename}"
        )
        monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", False)
        monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(tmp_path / "hub-cache"))
        monkeypatch.setattr(adapters, "_HUB_LOOKUPS", {})
        ref = adapters.adapter_reference("ow-tester/tiny-adapter", ow.storage)
        nested = adapters.adapter_reference("ow-tester/tiny-adapter/checkpoint-120", ow.storage)
        assert adapters.adapter_reference("ow-tester/a-base-model", ow.storage) == "ow-tester/a-base-model"
        apis = ow.api.multi_deploy(["ow-tester/tiny-adapter"], max_model_len=256)
        api = ow.api.deploy(str(tiny_model), lora_adapters=["ow-tester/tiny-adapter"], max_lora_rank="guess")
        assert adapters._HUB_LOOKUPS["ow-tester/a-base-model"] is None  # asked once, remembered
    assert ref == {"base": str(tiny_model), "adapter": nested["adapter"], "name": "ow-tester/tiny-adapter"}
    stored = ow.files.retrieve(ref["adapter"])  # the adapter's config and weights, as trained
    assert {entry.path: entry.sha256 for entry in stored.entries} == {
        name: hashlib.sha256(files[name]).hexdigest() for name in ("adapter_config.json", "adapter_model.safetensors")
    }
    assert set(apis) == {"ow-tester/tiny-adapter", str(tiny_model)}
    assert apis["ow-tester/tiny-adapter"].models == [str(tiny_model), "ow-tester/tiny-adapter"] == api.models


# ---- APIs: the seed README and cookbook/api-deployment/ ----------------------------------------------------


def test_api_deployment_cookbook_multi_deploy_by_model_and_async_chat(trained_adapter):
    """`ow.api.multi_deploy([model])[model]`, `with api as client`, a streamed chat as the gradio script does,
    `api.base_url` / `api.api_key`, and `OpenWeights(use_async=True, deploy_kwargs=...)`'s async `ow.chat`."""
    import asyncio

    from ow_prefect.chat import AsyncChat

    model = trained_adapter.id
    question = [SYSTEM, {"role": "user", "content": "What is two plus three?"}]
    ow = OpenWeights(use_async=True, deploy_kwargs={"max_model_len": 256})
    assert isinstance(ow.chat, AsyncChat) and ow.chat.settings.deploy_kwargs == {"max_model_len": 256}
    api = ow.api.multi_deploy([model], max_model_len=256, max_num_seqs=4, max_loras=1)[model]
    with api as client:
        assert api.base_url and api.api_key
        stream = client.chat.completions.create(
            model=model, messages=question, stream=True, max_tokens=12, temperature=0
        )
        partial_message = "".join(chunk.choices[0].delta.content or "" for chunk in stream)
        assert re.match(r"[A-Z][a-z]+ plus [a-z]+ equals [a-z-]+\.", partial_message), (
            partial_message
        )  # the adapter's form
        reply = asyncio.run(ow.chat.completions.create(model=model, messages=question, max_tokens=12, temperature=0))
        assert reply.choices[0].message.content == partial_message


# ---- evals: the seed README's inspect-ai call and openweights/jobs/mmlu_pro --------------------------------


def test_inspect_options_as_openweights_command_line(ow, tiny_model):
    """`options='--top-p 0.9'` (the seed README) is the same job as the options given as a dict."""
    as_text = ow.inspect_ai.validate(
        model=str(tiny_model), eval_name="inspect_evals/gpqa_diamond", options="--top-p 0.9 --limit 5 --no-score -T x=1"
    )
    as_dict = ow.inspect_ai.validate(
        model=str(tiny_model),
        eval_name="inspect_evals/gpqa_diamond",
        options={"top_p": "0.9", "limit": "5", "no_score": True, "task_args": {"x": "1"}},
    )
    assert as_text == as_dict
    with pytest.raises(ParameterError, match="'gpqa' is not an option; write '--name value'"):
        ow.inspect_ai.validate(model=str(tiny_model), eval_name="inspect_evals/gpqa_diamond", options="gpqa --limit 5")
    with pytest.raises(ParameterError, match="set by the eval flow itself"):
        ow.inspect_ai.validate(model=str(tiny_model), eval_name="inspect_evals/x", options="--log-dir /tmp")


def test_mmlu_pro_takes_openweights_arguments(ow, tiny_model, tmp_path):
    """`ntrain`, `selected_subjects`, `save_dir`, `global_record_file` and `gpu_util` (a string, as
    OpenWeights' CLI passes it) on a local sample of MMLU-Pro."""
    from tests.test_evals import write_mmlu_dir

    job = ow.mmlu_pro.create(
        model=str(tiny_model),
        dataset=str(write_mmlu_dir(tmp_path / "mmlu-pro")),
        ntrain=1,
        selected_subjects="math",
        save_dir="uploads/mmlu",
        global_record_file="eval_record_collection.csv",
        gpu_util="0.9",
        max_tokens=8,
        max_model_len=512,
    )
    assert job.status == "completed", job.error
    out = job.download(tmp_path / f"output/{job.id}")
    record = (out / "mmlu/eval_record_collection.csv").read_text().splitlines()
    assert record[0] == "model,math,overall" and record[1].startswith(f"{tiny_model},")
    assert float(record[1].split(",")[-1]) == pytest.approx(job.outputs["accuracy"], abs=1e-4)
    assert len((out / "mmlu/mmlu_pro_records.jsonl").read_text().splitlines()) == 3


# ---- allowed_hardware on the RunPod worker -----------------------------------------------------------------

SUFFIX = "-compat"
POOL = "ow-test-runpod-compat"


def test_allowed_hardware_becomes_the_pods_gpu_type_and_count(
    fake, prefect_client, use_server, tiny_model, data, tmp_path, monkeypatch
):
    """`allowed_hardware=["2x A100", "2x H100S"]` and `cloud_type` reach the RunPod worker as its `gpu_types`,
    `gpu_count` and `cloud`: the pod it creates has two A100 GPUs. Then `ow.api.create` with
    `requires_vram_gb="guess"` (submitted, not waited for) and mixed counts, which are refused."""
    from ow_prefect.testing.servers import prefect_worker
    from tests.runpod_support import WORKER_ENV, assert_clean, cancel, deploy, make_pool, pods_of, wait_for

    monkeypatch.setenv("OW_DEPLOYMENT_SUFFIX", SUFFIX)
    make_pool(prefect_client, fake, POOL)
    deploy(prefect_client, POOL, f"sft{SUFFIX}", entrypoint="flows/finetune/flow.py:finetune")
    deploy(prefect_client, POOL, f"serve{SUFFIX}", entrypoint="flows/vllm_api/flow.py:vllm_api")
    ow = OpenWeights()
    training_file = ow.files.upload(str(data / "train.jsonl"), purpose="conversations")["id"]
    with pytest.raises(ParameterError, match=r"keep one count, e.g. \['1x L40'\]"):
        ow.fine_tuning.create(
            model=str(tiny_model), training_file=training_file, allowed_hardware=["1x L40", "2x H200"]
        )

    job = ow.fine_tuning.create(
        model=str(tiny_model),
        training_file=training_file,
        requires_vram_gb=None,
        allowed_hardware=["2x A100", "2x H100S"],
        cloud_type="SECURE",
        max_steps=1,
    )
    assert (
        job.allowed_hardware == ["2x NVIDIA A100 80GB PCIe", "2x NVIDIA H100 80GB HBM3"] and job.requires_vram_gb == 0
    )
    with prefect_worker(use_server, POOL, "runpod", WORKER_ENV, tmp_path / "worker.log"):
        assert eventually(lambda: pods_of(fake, job.flow_run_id), timeout=120), (tmp_path / "worker.log").read_text()
        (pod,) = pods_of(fake, job.flow_run_id)
        assert pod.gpu["id"] == "NVIDIA A100 80GB PCIe" and pod.gpu["count"] == 2 and pod.cloud == "SECURE"
        cancel(prefect_client, job.flow_run_id)
        wait_for(prefect_client, job.flow_run_id, lambda run: run.state.is_final(), timeout=120)
        assert_clean(fake)

    api_job = ow.api.create(
        model=str(tiny_model), max_model_len=256, requires_vram_gb="guess", allowed_hardware=["1x L40"]
    )
    assert api_job.status == "pending" and api_job.id.startswith("apijob-")
    assert api_job.allowed_hardware == ["1x NVIDIA L40"] and api_job.requires_vram_gb == 0
    ow.jobs.cancel(api_job.id)  # no worker holds it: canceled outright
    assert ow.jobs.retrieve(api_job.id).status == "canceled"
