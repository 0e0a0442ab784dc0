"""A fine-tuning job on a RunPod (fake) pod is preempted mid-training: the run reschedules itself, a new pod
picks it up, training resumes from the last checkpoint it stored, and the job completes with its adapter."""

import pytest

from tests.helpers import eventually
from tests.runpod_support import POD_COMMAND, assert_clean, deploy, pods_of, wait_for

pytestmark = pytest.mark.slow

SUFFIX = "-reliability"


def test_a_preempted_finetune_resumes_from_its_last_checkpoint_on_a_new_pod(
    fake, prefect_client, runpod_pool, runpod_worker, runpod_worker_log, use_server, tiny_model, tmp_path, monkeypatch
):
    from flows.finetune.reporting import CheckpointSync
    from ow_prefect import OpenWeights
    from ow_prefect.storage import Storage
    from ow_prefect.testing.tiny_model import sample_conversations, write_jsonl

    monkeypatch.setenv("OW_DEPLOYMENT_SUFFIX", SUFFIX)
    pod_env = {"OW_TRAIN_BACKEND": "transformers"}  # a pod has only the env its job variables and the image give it
    # the session's runpod worker and pool (tests/runpod_support.py); a real flow run in each pod
    deploy(
        prefect_client,
        runpod_pool,
        f"sft{SUFFIX}",
        entrypoint="flows/finetune/flow.py:finetune",
        command=POD_COMMAND,
        env=pod_env,
    )
    ow = OpenWeights()
    data = ow.files.upload(write_jsonl(sample_conversations(128), tmp_path / "train.jsonl"), "conversations")
    storage = Storage.from_settings()

    job = ow.fine_tuning.create(
        model=str(tiny_model),
        training_file=data.id,
        max_steps=150,
        save_steps=10,
        per_device_train_batch_size=4,
        gradient_accumulation_steps=1,
        learning_rate=1e-3,
        merge_before_push=False,
    )

    def checkpoint_stored():
        try:
            return "id" in storage.get_json(CheckpointSync.key(job.id))
        except Exception:
            return False

    assert eventually(checkpoint_stored, timeout=240, interval=0.2), "no checkpoint was stored"
    (first,) = pods_of(fake, job.flow_run_id)
    fake.preempt(first.id)  # a spot interruption: SIGTERM, the pod is gone
    done = wait_for(prefect_client, job.flow_run_id, lambda fr: fr.state.is_final(), timeout=300)
    assert done.state.is_completed(), f"{done.state}\n{runpod_worker_log.read_text()[-3000:]}"
    assert_clean(fake)

    job = ow.jobs.retrieve(job.id)
    assert done.run_count == 2 and len(pods_of(fake, job.flow_run_id)) == 2
    resumed = job.outputs["resumed_from_step"]
    assert resumed and resumed % 10 == 0 and 10 <= resumed < 150, job.outputs
    assert job.outputs["steps"] == 150
    adapter = storage.info(job.outputs["adapter"])
    assert {entry.path for entry in adapter.entries} >= {"adapter_config.json", "adapter_model.safetensors"}
