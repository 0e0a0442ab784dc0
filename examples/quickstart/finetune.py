"""The main demo: fine-tune a tiny model with LoRA (SFT) on CPU and compare its answers before and after.

Runs on the embedded default (no Prefect server, no worker, no cloud): a tiny Qwen2-style model and its
tokenizer are built locally, a small arithmetic dataset is uploaded, and `ow.fine_tuning.create` trains — the
trainer's progress bar and loss lines stream to the terminal. Then the loss by step (from the run's metrics
artifact), the answers before and after, and where the same run shows in the Prefect UI.
With a real model, the call is the same: `model="Qwen/Qwen2.5-0.5B-Instruct"`, and a GPU pool does the work.
"""

import json
import time
from pathlib import Path

from ow_prefect import OpenWeights
from ow_prefect.settings import get_settings
from ow_prefect.testing.tiny_model import build_tiny_model, sample_conversations, write_jsonl

QUESTIONS = ["What is two plus three?", "What is seven plus one?", "What is four plus four?"]


def answers(model_dir: Path, adapter_dir: Path | None = None) -> list[str]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    if adapter_dir is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter_dir)
    replies = []
    for question in QUESTIONS:
        messages = [
            {"role": "system", "content": "You are a brief math helper."},
            {"role": "user", "content": question},
        ]
        inputs = tokenizer.apply_chat_template(
            messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
        )
        with torch.no_grad():
            output = model.generate(**inputs, max_new_tokens=16, do_sample=False)
        replies.append(tokenizer.decode(output[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True).strip())
    return replies


def main() -> None:
    started = time.perf_counter()
    home = get_settings().home_dir / "demo"
    model_dir = build_tiny_model(home / "tiny-model")
    ow = OpenWeights()
    data = ow.files.upload(
        write_jsonl(sample_conversations(256), home / "conversations.jsonl"), purpose="conversations"
    )
    print(f"model {model_dir}, training file {data.id}")
    before = answers(model_dir)

    job = ow.fine_tuning.create(
        model=str(model_dir),
        training_file=data.id,
        loss="sft",
        max_steps=120,
        r=16,
        lora_alpha=32,
        learning_rate=4e-3,
        per_device_train_batch_size=16,
        gradient_accumulation_steps=1,
        warmup_steps=5,
        logging_steps=10,
        merge_before_push=False,
    )
    job = job.wait()
    print(
        f"{job.id}: {job.status} in {job.outputs['steps']} steps with {job.outputs['backend']}, "
        f"train loss {job.outputs['train_loss']:.3f}"
    )
    with ow.prefect_settings():
        print_loss_curve(job.id)
    adapter = ow.files.download(job.outputs["adapter"], home / "adapters" / job.id)
    after = answers(model_dir, adapter)
    for question, old, new in zip(QUESTIONS, before, after, strict=True):
        print(f"\n{question}\n  before: {old!r}\n  after:  {new!r}")
    print(f"\ndone in {time.perf_counter() - started:.0f} s; run it again: the same job is returned, no retraining")
    print(
        "\nIn the Prefect UI: `.venv/bin/prefect server start` (it opens the database this run was recorded in),\n"
        f"then http://127.0.0.1:4200/runs/flow-run/{job.flow_run_id} — Artifacts: the loss curve, the metrics\n"
        "table and the progress bar; Logs: the trainer's output; Events: one ow.train.metrics per logged step."
    )


def print_loss_curve(job_id: str, width: int = 40) -> None:
    """The loss by logged step, from the metrics table artifact the flow published."""
    from prefect.artifacts import Artifact

    artifact = Artifact.get(f"{job_id}-metrics".replace("_", "-"), _sync=True)
    rows = json.loads(artifact.data) if isinstance(artifact.data, str) else artifact.data
    losses = [(row["step"], row["loss"]) for row in rows if row.get("loss") is not None]
    low, high = min(loss for _, loss in losses), max(loss for _, loss in losses)
    print(f"\nloss by step (bars from {low:.3f} to {high:.3f}):")
    for step, loss in losses:
        print(f"  step {step:>4}  {loss:7.3f}  {'#' * (1 + round(width * (loss - low) / ((high - low) or 1)))}")


if __name__ == "__main__":
    main()
