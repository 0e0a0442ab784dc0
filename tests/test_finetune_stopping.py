"""A stop request (the RunPod worker's `max_cost`, ow_prefect/costs/stop.py) through a real Prefect Variable: the
trainer saves a checkpoint at once — even between save_steps — that goes to storage, training ends with
StopRequested, and a rerun resumes from that checkpoint. Real LoRA training on the tiny local model."""

from uuid import uuid4

import anyio
import pytest

from flows.finetune import train
from flows.finetune.reporting import CheckpointSync
from flows.finetune.stopping import StopOnRequest, StopRequested
from ow_prefect.costs.stop import clear_stop, request_stop, stop_requested
from ow_prefect.storage import LocalBackend, Storage
from tests.test_finetune_train import config, data_file


def test_a_stop_request_saves_a_checkpoint_and_a_rerun_resumes_from_it(
    use_server, tiny_model, datasets_dir, tmp_path, monkeypatch
):
    monkeypatch.setenv("OW_TRAIN_BACKEND", "transformers")  # unsloth patches transformers: not in this process
    flow_run_id = str(uuid4())
    assert stop_requested(flow_run_id) is None
    anyio.run(request_stop, flow_run_id, "max_cost ($0.50) reached")
    assert stop_requested(flow_run_id) == "max_cost ($0.50) reached"

    storage = Storage(LocalBackend(tmp_path / "storage"))
    cfg = config(tiny_model, save_steps=1000)  # no checkpoint would be saved in 6 steps otherwise
    sync = CheckpointSync("ftjob-stopped", storage)
    with pytest.raises(StopRequested, match=r"Stopped at step 1 of 6: max_cost \(\$0.50\) reached"):
        train.main(
            cfg,
            data_file(datasets_dir, "sft"),
            None,
            tmp_path / "first",
            callbacks=[sync, StopOnRequest(flow_run_id, every=0)],
        )
    assert len(sync.uploaded) == 1

    anyio.run(clear_stop, flow_run_id)
    assert stop_requested(flow_run_id) is None
    resume = CheckpointSync.restore("ftjob-stopped", storage, tmp_path / "second")
    assert resume is not None and resume.name == "checkpoint-1"
    result = train.main(
        cfg,
        data_file(datasets_dir, "sft"),
        None,
        tmp_path / "second",
        resume_from=resume,
        callbacks=[StopOnRequest(flow_run_id, every=0)],
    )
    assert (result.resumed_from_step, result.global_step) == (1, 6)
