"""`finetune`: LoRA fine-tuning with SFT, DPO, ORPO or token-weighted SFT (deployments finetune/sft, finetune/dpo,
finetune/orpo, finetune/weighted-sft).

Training data comes from storage by file id; the adapter (and the merged model when `merge_before_push`)
goes back to storage, checkpoints too as they are written. A rerun of the same job resumes from its newest
stored checkpoint.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger

from flows._runtime import JobRun, hf_token, hf_token_secret, run_job, with_params_signature
from ow_prefect.jobs.finetune import FineTuningParams, job_class_for

ADAPTER_PURPOSE = "adapter"
MODEL_PURPOSE = "model"


def _train(job: JobRun) -> dict[str, Any]:
    from flows.finetune import hub, reporting, stopping, train

    logger = get_run_logger()
    cfg = job.job_cls.params(**job.parameters)
    flow_run_id = str(job.flow_run.id) if job.flow_run else None
    with tempfile.TemporaryDirectory(prefix=f"{job.id}-") as tmp:
        work = Path(tmp)
        training_path = job.storage.download(cfg.training_file, work / "train.jsonl")
        test_path = job.storage.download(cfg.test_file, work / "test.jsonl") if cfg.test_file else None
        resume_from = reporting.CheckpointSync.restore(job.id, job.storage, work / "out")
        if resume_from:
            logger.info("resuming from stored checkpoint %s", resume_from.name)
        checkpoints = reporting.CheckpointSync(job.id, job.storage)
        watched = {*cfg.logp_callback_datasets.values(), *(c.dataset for c in cfg.sampling_callbacks)}
        dataset_paths = {
            file_id: job.storage.download(file_id, work / "watch" / f"{n}.jsonl")
            for n, file_id in enumerate(sorted(watched))
        }
        sink = reporting.PrefectSink(job.id, flow_run_id, job.storage)
        result = train.main(
            cfg,
            training_path,
            test_path,
            work / "out",
            resume_from=resume_from,
            # StopOnRequest after checkpoints: it ends training once the checkpoint it asked for is stored
            callbacks=[
                reporting.PrefectReporter(job.id, flow_run_id),
                checkpoints,
                stopping.StopOnRequest(flow_run_id),
            ],
            sink=sink,
            dataset_paths=dataset_paths,
        )
        checkpoints.finish()
        adapter = job.storage.put_path(result.adapter_dir, ADAPTER_PURPOSE)
        merged = job.storage.put_path(result.merged_dir, MODEL_PURPOSE) if result.merged_dir else None
        loss_curve = reporting.publish_results(job.id, result.log_history, job.storage)
        hub_model_id = None
        token = hf_token()
        if token:
            hub_model_id = hub.push(
                result.merged_dir or result.adapter_dir,
                cfg.finetuned_model_id,
                job_id=job.id,
                model=cfg.model,
                private=cfg.push_to_private,
                token=token,
            )
            logger.info("pushed to the Hub as %s", hub_model_id)
        else:
            logger.info("no HF token Secret block '%s': not pushing to the Hub", hf_token_secret())
    logger.info(
        "job %s: %s steps over %s examples from %s rows with %s, train loss %s, eval loss %s",
        job.id,
        result.global_step,
        result.train_examples,
        result.train_rows,
        result.backend,
        result.train_loss,
        result.eval_loss,
    )
    return {
        "model": {"base": cfg.model, "adapter": adapter.id, "job": job.id},
        "adapter": adapter.id,
        "merged": merged.id if merged else None,
        "train_loss": result.train_loss,
        "eval_loss": result.eval_loss,
        "steps": result.global_step,
        "train_tokens": result.train_tokens,
        "train_examples": result.train_examples,
        "train_seconds": result.train_seconds,
        "backend": result.backend,
        "resumed_from_step": result.resumed_from_step,
        "checkpoints": checkpoints.uploaded,
        "hub_model_id": hub_model_id,
        "files": {"loss_curve.svg": loss_curve, **sink.files},
        **{kind: records for kind, records in sink.records.items() if records},
    }


def finetune(**parameters: Any) -> dict[str, Any]:
    """Fine-tune a model with LoRA (SFT, DPO, ORPO or token-weighted SFT)."""
    return run_job(job_class_for(parameters.get("loss", "sft")), parameters, _train)


finetune = flow(name="finetune")(with_params_signature(finetune, FineTuningParams))
