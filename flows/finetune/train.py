"""LoRA fine-tuning with TRL: load -> prepare data -> build the trainer -> train -> save.

No Prefect here: the flow adds its callbacks (events, artifacts, checkpoints to storage). The same file runs
on its own with local paths:

    python -m flows.finetune.train --config cfg.json

where cfg.json holds the `finetune` parameters with `training_file` / `test_file` (and the datasets of
`logp_callback_datasets` / `sampling_callbacks`) as local JSONL paths, plus optional "output_dir"; the
callbacks' files go under output_dir/callbacks/.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")

import torch  # noqa: E402

from flows.finetune import backends, data  # noqa: E402
from flows.finetune import callbacks as callbacks_module  # noqa: E402

OPTIMIZERS = {
    "adamw": "adamw_torch",
    "adam": "adamw_torch",
    "adamw_torch": "adamw_torch",
    "sgd": "sgd",
    "adafactor": "adafactor",
    "adamw_8bit": "adamw_8bit",
}


@dataclass
class TrainResult:
    adapter_dir: Path
    merged_dir: Path | None
    backend: str
    global_step: int
    train_loss: float | None
    eval_loss: float | None
    log_history: list[dict[str, Any]]
    resumed_from_step: int | None = None
    train_tokens: int = 0
    train_seconds: float = 0.0
    train_rows: int = 0  # rows of the training file
    train_examples: int = 0  # the examples they train as (see build_trainer)
    eval_examples: int | None = None  # the test file's


def optimizer_name(cfg: Any) -> str:
    name = OPTIMIZERS[cfg.optim]
    # 8-bit AdamW is a bitsandbytes CUDA kernel; on CPU the same update runs in full precision.
    return "adamw_torch" if name == "adamw_8bit" and not torch.cuda.is_available() else name


def common_args(cfg: Any, output_dir: Path, has_eval: bool) -> dict[str, Any]:
    cuda = torch.cuda.is_available()
    eval_strategy = cfg.test_file_eval_strategy if has_eval else "no"
    return dict(
        output_dir=str(output_dir),
        num_train_epochs=cfg.epochs,
        max_steps=cfg.max_steps or -1,
        per_device_train_batch_size=cfg.per_device_train_batch_size,
        gradient_accumulation_steps=cfg.gradient_accumulation_steps,
        learning_rate=cfg.learning_rate,
        lr_scheduler_type=cfg.lr_scheduler_type,
        warmup_steps=cfg.warmup_steps,
        weight_decay=cfg.weight_decay,
        max_grad_norm=cfg.max_grad_norm,
        optim=optimizer_name(cfg),
        seed=cfg.seed,
        logging_steps=cfg.logging_steps,
        save_strategy="steps",
        save_steps=cfg.save_steps,
        save_total_limit=2,
        eval_strategy=eval_strategy,
        eval_steps=cfg.test_file_eval_steps if eval_strategy == "steps" else None,
        per_device_eval_batch_size=cfg.eval_batch_size,
        report_to="none",
        use_cpu=not cuda,
        bf16=cuda and torch.cuda.is_bf16_supported(),
        fp16=cuda and not torch.cuda.is_bf16_supported(),
        gradient_checkpointing=False,
        dataloader_num_workers=0,
        max_length=cfg.max_seq_length,
        include_num_input_tokens_seen=True,
        disable_tqdm=False,
    )


def build_trainer(
    cfg: Any,
    loaded: backends.Loaded,
    training_path: Path,
    test_path: Path | None,
    output_dir: Path,
    callbacks: list[Any],
    sink: callbacks_module.Sink | None = None,
    dataset_paths: dict[str, Path] | None = None,
):
    tokenizer = data.prepare_tokenizer(loaded.tokenizer, cfg.chat_template)
    args = common_args(cfg, output_dir, test_path is not None)
    callbacks = [*callbacks, *callbacks_module.build(cfg, tokenizer, sink, dataset_paths or {})]
    extra: dict[str, Any] = {}
    if cfg.loss == "weighted_sft":
        from trl import SFTConfig as Config

        from flows.finetune.weighting import WeightedCollator, weighted_dataset
        from flows.finetune.weighting import WeightedSFTTrainer as Trainer

        def load(path: Path):
            return weighted_dataset(path, tokenizer, cfg.train_on_responses_only, cfg.max_seq_length)

        extra["data_collator"] = WeightedCollator(pad_token_id=tokenizer.pad_token_id)
    elif cfg.loss == "sft":
        from trl import SFTConfig as Config
        from trl import SFTTrainer as Trainer

        def load(path: Path):
            return data.sft_dataset(path, tokenizer, cfg.train_on_responses_only)

        args["packing"] = cfg.packing
    else:
        if cfg.loss == "dpo":
            from trl import DPOConfig as Config
            from trl import DPOTrainer as Trainer
        else:
            from trl.experimental.orpo import ORPOConfig as Config
            from trl.experimental.orpo import ORPOTrainer as Trainer
        load = data.preference_dataset
        args["beta"] = cfg.beta
    train_dataset = load(training_path)
    eval_dataset = load(test_path) if test_path else None
    trainer = Trainer(
        model=loaded.model,
        args=Config(**args),
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        processing_class=tokenizer,
        callbacks=callbacks,
        **extra,
    )
    # examples, not rows (SFT trains a turn a row renders otherwise in an example of its own), before packing
    trainer.example_counts = (len(train_dataset), len(eval_dataset) if eval_dataset is not None else None)
    return trainer


def _last(history: list[dict[str, Any]], key: str) -> float | None:
    values = [h[key] for h in history if key in h and math.isfinite(h[key])]
    return values[-1] if values else None


def main(
    cfg: Any,
    training_path: Path,
    test_path: Path | None,
    output_dir: Path,
    *,
    callbacks: list[Any] = (),
    resume_from: Path | None = None,
    sink: callbacks_module.Sink | None = None,
    dataset_paths: dict[str, Path] | None = None,
) -> TrainResult:
    """Train and save the adapter (and the merged model when cfg.merge_before_push) under `output_dir`.
    `sink` receives what logp_callback_datasets / sampling_callbacks compute; `dataset_paths` maps their file
    ids to local files."""
    output_dir.mkdir(parents=True, exist_ok=True)
    loaded = backends.load(cfg)
    trainer = build_trainer(
        cfg, loaded, training_path, test_path, output_dir, list(callbacks), sink=sink, dataset_paths=dataset_paths
    )
    output = trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
    history = trainer.state.log_history
    evaluated_at = [h["step"] for h in history if "eval_loss" in h]
    if (
        test_path is not None
        and cfg.test_file_eval_strategy != "no"
        and evaluated_at[-1:] != [trainer.state.global_step]
    ):
        trainer.evaluate()
    eval_loss = _last(history, "eval_loss")
    adapter_dir = output_dir / "adapter"
    trainer.save_model(str(adapter_dir))
    loaded.tokenizer.save_pretrained(str(adapter_dir))
    merged_dir = None
    if cfg.merge_before_push:  # last: merging changes the model in place (and DPO's reference with it)
        merged_dir = output_dir / "merged"
        merged = trainer.model.merge_and_unload()
        merged.save_pretrained(str(merged_dir))
        loaded.tokenizer.save_pretrained(str(merged_dir))
    return TrainResult(
        adapter_dir=adapter_dir,
        merged_dir=merged_dir,
        backend=loaded.backend,
        global_step=trainer.state.global_step,
        train_loss=_last(history, "loss") or output.training_loss,
        eval_loss=eval_loss,
        log_history=history,
        resumed_from_step=int(resume_from.name.split("-")[-1]) if resume_from else None,
        train_tokens=int(getattr(trainer.state, "num_input_tokens_seen", 0) or 0),
        train_seconds=float(output.metrics.get("train_runtime", 0.0)),
        train_rows=len(data.read_jsonl(training_path)),
        train_examples=trainer.example_counts[0],
        eval_examples=trainer.example_counts[1],
    )


def cli(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m flows.finetune.train", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", required=True, type=Path)
    args = parser.parse_args(argv)
    from ow_prefect.jobs.finetune import DATA_PURPOSE, job_class_for

    raw = json.loads(args.config.read_text())
    output_dir = Path(raw.pop("output_dir", "finetune-output"))
    loss = raw.get("loss", "sft")
    paths: dict[str, Path] = {}

    def local(path: str, purpose: str = "conversations") -> str:
        file_id = f"{purpose}:file-{len(paths):012x}"
        paths[file_id] = Path(path)
        return file_id

    raw["training_file"] = local(raw["training_file"], DATA_PURPOSE[loss])
    if raw.get("test_file"):
        raw["test_file"] = local(raw["test_file"], DATA_PURPOSE[loss])
    raw["logp_callback_datasets"] = {tag: local(p) for tag, p in raw.get("logp_callback_datasets", {}).items()}
    for spec in raw.get("sampling_callbacks", []):
        spec["dataset"] = local(spec["dataset"])
    cfg = job_class_for(loss).params(**raw)
    sink = callbacks_module.LocalSink(output_dir / "callbacks")
    test_path = paths[cfg.test_file] if cfg.test_file else None
    result = main(cfg, paths[cfg.training_file], test_path, output_dir, sink=sink, dataset_paths=paths)
    print(
        json.dumps(
            {
                "adapter": str(result.adapter_dir),
                "train_loss": result.train_loss,
                "eval_loss": result.eval_loss,
                "steps": result.global_step,
                "train_examples": result.train_examples,
                "backend": result.backend,
                "callbacks": sink.records,
            }
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(cli())
