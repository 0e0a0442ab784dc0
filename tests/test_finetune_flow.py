"""The `finetune` flow end to end in embedded mode: SDK -> flow -> training -> storage -> outputs, events,
artifacts, training lines in the run's logs; a second direct call running nothing; the Hub push up to the
network call."""

import re

import pytest

from ow_prefect import OpenWeights, ParameterError
from tests.helpers import eventually

pytestmark = pytest.mark.usefixtures("transformers_backend")
SMALL = {
    "max_steps": 4,
    "r": 8,
    "per_device_train_batch_size": 4,
    "gradient_accumulation_steps": 1,
    "learning_rate": 3e-3,
    "warmup_steps": 0,
}


@pytest.fixture
def transformers_backend(monkeypatch):
    monkeypatch.setenv("OW_TRAIN_BACKEND", "transformers")


@pytest.fixture(scope="module")
def files(datasets_dir):
    ow = OpenWeights()
    return {
        "sft": ow.files.upload(datasets_dir / "conversations.jsonl", purpose="conversations").id,
        "dpo": ow.files.upload(datasets_dir / "preference.jsonl", purpose="preference").id,
    }


def artifacts_of(flow_run_id):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    with get_client(sync_client=True) as client:
        return client.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id]))
        )


def test_sft_job_end_to_end(tiny_model, files, tmp_path):
    ow = OpenWeights()
    job = ow.fine_tuning.create(
        model=str(tiny_model), training_file=files["sft"], test_file=files["sft"], save_steps=2, **SMALL
    )
    assert job.id.startswith("ftjob-") and job.status == "completed", job.error
    out = job.outputs
    assert out["model"] == {"base": str(tiny_model), "adapter": out["adapter"], "job": job.id}
    assert out["adapter"].startswith("adapter:dir-") and out["merged"].startswith("model:dir-")
    assert out["steps"] == 4 and out["train_loss"] > 0 and out["eval_loss"] > 0 and len(out["checkpoints"]) == 2
    assert out["train_examples"] == 64  # one per single-turn row
    adapter = ow.files.download(out["adapter"], tmp_path / "adapter")
    assert (adapter / "adapter_config.json").exists() and (adapter / "adapter_model.safetensors").exists()
    assert job.download(tmp_path / "results") and (tmp_path / "results" / "loss_curve.svg").read_text().startswith(
        "<svg"
    )

    def train_metrics():
        return [e for e in job.events() if e["event"] == "ow.train.metrics"]

    assert eventually(lambda: len(train_metrics()) >= 4), "events arrive in batches, a moment late"
    events = train_metrics()
    assert [e["payload"]["step"] for e in events][:4] == [1, 2, 3, 4]
    assert all(e["resource"] == f"ow.job.{job.id}" for e in events)
    kinds = {a.type for a in artifacts_of(job.flow_run_id)}
    assert {"progress", "table", "image"} <= kinds
    # the trainer's progress in the run's logs (the UI's Logs tab): the first and the last step at least
    assert eventually(lambda: re.search(r"step 4/4  loss [0-9.]+  lr [0-9.e+-]+", job.logs())), job.logs()
    assert re.search(r"step 1/4  loss [0-9.]+  lr [0-9.e+-]+  [0-9,]+ tokens/s", job.logs())

    again = ow.fine_tuning.create(
        model=str(tiny_model), training_file=files["sft"], test_file=files["sft"], save_steps=2, **SMALL
    )
    assert (again.id, again.flow_run_id) == (job.id, job.flow_run_id)


def test_dpo_job(tiny_model, files):
    job = OpenWeights().fine_tuning.create(
        model=str(tiny_model), training_file=files["dpo"], loss="dpo", merge_before_push=False, **SMALL
    )
    assert job.status == "completed", job.error
    assert job.outputs["merged"] is None and job.outputs["adapter"].startswith("adapter:dir-")


def test_bad_configs_start_no_flow_run(tiny_model, files):
    ow = OpenWeights()
    before = len(ow.jobs.list(type="fine_tuning", limit=200))
    for bad in ({"wrong_key": 1}, {"training_file": files["dpo"]}, {"lora_dropout": 2}):
        with pytest.raises(ParameterError):
            ow.fine_tuning.create(**{"model": str(tiny_model), "training_file": files["sft"], **bad})
    assert len(ow.jobs.list(type="fine_tuning", limit=200)) == before


def test_calling_the_flow_directly_twice_trains_once(tiny_model, files):
    """A direct call is an entry point like any other: the second finds the first completed and runs nothing."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    from flows.finetune.flow import finetune

    params = {"model": str(tiny_model), "training_file": files["sft"], "seed": 11, "merge_before_push": False, **SMALL}
    first = finetune(**params, return_state=True)
    second = finetune(**params, return_state=True)
    assert first.result() == second.result()
    assert first.result()["flow_run_id"] == str(first.state_details.flow_run_id)
    with get_client(sync_client=True) as client:
        tasks = [
            client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[run_id])))
            for run_id in (first.state_details.flow_run_id, second.state_details.flow_run_id)
        ]
        original = client.read_flow_run(first.state_details.flow_run_id)
    assert [t.state.name for t in tasks[0]] == ["Completed"] and tasks[1] == []
    assert second.is_completed() and f"already completed in flow run '{original.name}'" in second.message
    assert str(original.id) in second.message


def test_hub_push_is_real_up_to_the_network_call(tiny_model, files, monkeypatch):
    """The Hub is not reachable here: HfApi is replaced by a recorder (the only stand-in in this suite)."""
    import huggingface_hub
    from prefect.blocks.system import Secret

    calls = []

    class RecordingHfApi:
        def __init__(self, token):
            calls.append(("token", token))

        def whoami(self):
            raise AssertionError("OW_HF_ORG is set: whoami must not be called")

        def create_repo(self, repo_id, **kwargs):
            calls.append(("create_repo", repo_id, kwargs))

        def upload_folder(self, repo_id, folder_path, **kwargs):
            from pathlib import Path

            calls.append(("upload_folder", repo_id, sorted(p.name for p in Path(folder_path).iterdir())))

    Secret(value="hf_test_token").save("ow-test-hf-token", overwrite=True, _sync=True)
    monkeypatch.setenv("OW_HF_TOKEN_SECRET", "ow-test-hf-token")
    monkeypatch.setenv("OW_HF_ORG", "my-lab")
    monkeypatch.setattr(huggingface_hub, "HfApi", RecordingHfApi)
    job = OpenWeights().fine_tuning.create(
        model=str(tiny_model),
        training_file=files["sft"],
        seed=5,
        finetuned_model_id="{org}/{model_name}-{job_id}",
        **SMALL,
    )
    assert job.status == "completed", job.error
    repo = f"my-lab/tiny-model-{job.id}"
    assert job.outputs["hub_model_id"] == repo
    assert calls[0] == ("token", "hf_test_token")
    assert calls[1] == ("create_repo", repo, {"private": True, "exist_ok": True, "repo_type": "model"})
    assert calls[2][:2] == ("upload_folder", repo) and "model.safetensors" in calls[2][2]
    assert "hf_test_token" not in job.logs()


def test_a_crashed_job_resumes_from_its_newest_stored_checkpoint(tiny_model, files, monkeypatch):
    """Training dies after step 5 (checkpoints at 2 and 4); running the job again continues from step 4."""
    from transformers import TrainerCallback

    from flows.finetune import train

    class Preempted(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 5:
                raise RuntimeError("preempted")

    real_main = train.main

    def crashing_main(*args, callbacks=(), **kwargs):
        return real_main(*args, callbacks=[*callbacks, Preempted()], **kwargs)

    ow = OpenWeights()
    params = {
        "model": str(tiny_model),
        "training_file": files["sft"],
        "seed": 21,
        "save_steps": 2,
        "merge_before_push": False,
        **{**SMALL, "max_steps": 6},
    }
    monkeypatch.setattr(train, "main", crashing_main)
    failed = ow.fine_tuning.create(**params)
    assert failed.status == "failed" and "preempted" in failed.error
    monkeypatch.setattr(train, "main", real_main)
    resumed = ow.fine_tuning.create(**params)
    assert resumed.id == failed.id and resumed.status == "completed", resumed.error
    assert resumed.outputs["resumed_from_step"] == 4 and resumed.outputs["steps"] == 6
