"""The main demo: fine-tune a tiny model with LoRA (SFT) on CPU and compare its answers before and after.

Runs on the embedded default (no Prefect server, no worker, no cloud): a tiny Qwen2-style model and its
tokenizer are built locally (random weights: it knows nothing), a small counting dataset is uploaded
("What is seven plus one?" -> "Eight."), and `ow.fine_tuning.create` trains — the trainer's progress bar and
loss lines stream to the terminal. Then the loss by step (from the run's metrics artifact), the answers before
and after, and what to try next.
With a real model, the call is the same: `model="Qwen/Qwen2.5-0.5B-Instruct"`, and a GPU pool does the work.
"""

import json
import time
from pathlib import Path

from ow_prefect import OpenWeights
from ow_prefect.settings import get_settings
from ow_prefect.testing.tiny_model import NUMBERS, SYSTEM, build_tiny_model, write_jsonl

# A task a model of 362k random parameters learns in about a minute on two cores: one fact per question, ten
# facts. (Sums of two numbers are a hundred facts that need two lookups each: not in a minute.)
QUESTIONS = {"What is two plus one?": "Three.", "What is seven plus one?": "Eight.", "What is four plus one?": "Five."}


def plus_one_conversations(n: int = 256) -> list[dict]:
    rows = []
    for i in range(n):
        number = i % 10
        question = {"role": "user", "content": f"What is {NUMBERS[number]} plus one?"}
        answer = {"role": "assistant", "content": f"{NUMBERS[number + 1].capitalize()}."}
        rows.append({"messages": [SYSTEM, question, answer]})
    return rows


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
        messages = [SYSTEM, {"role": "user", "content": question}]
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
    data = ow.files.upload(write_jsonl(plus_one_conversations(), home / "plus_one.jsonl"), purpose="conversations")
    print(f"model {model_dir}, training file {data.id}")
    before = answers(model_dir)

    job = ow.fine_tuning.create(
        model=str(model_dir),
        training_file=data.id,
        loss="sft",
        max_steps=120,
        r=16,
        lora_alpha=32,
        learning_rate=2e-3,
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
    for (question, expected), old, new in zip(QUESTIONS.items(), before, after, strict=True):
        print(f"\n{question}\n  before: {old!r}\n  after:  {new!r}  {'right' if new == expected else 'WRONG'}")
    right_before = sum(old == expected for old, expected in zip(before, QUESTIONS.values(), strict=True))
    right_after = sum(new == expected for new, expected in zip(after, QUESTIONS.values(), strict=True))
    print(f"\n{right_after}/{len(QUESTIONS)} right after training ({right_before}/{len(QUESTIONS)} before)")
    print(f"done in {time.perf_counter() - started:.0f} s")
    print_next_steps(job)


def print_next_steps(job) -> None:
    print(
        f"""
What to try next:
  - Run `make demo` again: the same parameters are the same job ({job.id}), returned at once; nothing trains.
  - The command line: `.venv/bin/ow ls`, `.venv/bin/ow show {job.id}`, `.venv/bin/ow fetch {job.id}`
    (the adapter and the loss curve; `OW_MODE=embedded` like the demo, or no PREFECT_API_URL).
  - The Prefect UI: `.venv/bin/prefect server start` opens the database this run was recorded in; then
    http://127.0.0.1:4200/runs/flow-run/{job.flow_run_id}
    (Logs: the trainer's steps; Artifacts: loss curve, metrics table; Events: ow.train.metrics per step).
  - A Prefect server with a local worker, jobs started from the UI or `prefect deployment run`: docs/local.md.
  - GPUs on RunPod, one pod per run, deleted when it ends: `ow setup` with RUNPOD_API_KEY, then
    `prefect worker start --pool gpu` (docs/runpod.md), and `model="Qwen/Qwen2.5-0.5B-Instruct"`."""
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
