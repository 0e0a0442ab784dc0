"""The whole `finetune` flow against a bare TRL script doing the same work, on the same tiny model and data.

    .venv/bin/python bench/train_cpu.py [--steps 300] [--repeats 5]

Both run in this process, on CPU, with the transformers + PEFT backend (unsloth, when installed, patches TRL on
import and would change the baseline too), checkpoints on (every `steps / 3` steps) and the same seed.
- ours: `finetune(...)` called directly, timed from the call until it returns, i.e. until its outputs are
  stored: data download and validation, tokenization, training, checkpoints copied to storage, events and
  artifacts on embedded Prefect, the adapter stored.
- baseline: what a researcher's bare script does for the same result: build TRL's SFTTrainer (`peft_config`,
  `assistant_only_loss` on the conversational dataset), train with the same checkpoints, save the adapter;
  timed from the first line to the saved adapter.
One warm-up run of each first (imports, Prefect's ephemeral server), then --repeats interleaved pairs
(alternating which goes first); the ratio is of the medians (noise on a shared machine slows single runs down
by ±20%, and a median of interleaved runs is what survives it). Goal: ours ≤ 1.10 × the baseline.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
WORK = Path(tempfile.mkdtemp(prefix="ow-bench-train-"))
os.environ.update(
    OW_HOME=str(WORK / "ow"),
    PREFECT_HOME=str(WORK / "prefect"),
    OW_TRAIN_BACKEND="transformers",
    PREFECT_SERVER_ANALYTICS_ENABLED="false",
    # The flow runs on Prefect's ephemeral server; on a busy machine it takes longer than the default 20 s to start.
    PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS="120",
    TRL_EXPERIMENTAL_SILENCE="1",
    HF_HUB_OFFLINE="1",
)
os.environ.pop("PREFECT_API_URL", None)

BATCH, RANK, LR = 8, 16, 3e-3

from bench.results import emit, row  # noqa: E402


def save_every(steps: int) -> int:
    return max(1, steps // 3)


def baseline(model_dir: Path, data_path: Path, steps: int, seed: int) -> float:
    """Seconds from the first line of a bare TRL script to its saved adapter."""
    started = time.perf_counter()
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    rows = [json.loads(line) for line in data_path.read_text().splitlines()]
    output_dir = WORK / f"bare-{seed}-{steps}"
    args = SFTConfig(
        output_dir=str(output_dir),
        max_steps=steps,
        per_device_train_batch_size=BATCH,
        gradient_accumulation_steps=1,
        learning_rate=LR,
        logging_steps=1,
        save_strategy="steps",
        save_steps=save_every(steps),
        report_to="none",
        use_cpu=True,
        bf16=False,
        gradient_checkpointing=False,
        seed=seed,
        max_length=2048,
        assistant_only_loss=True,
        dataloader_num_workers=0,
        warmup_steps=0,
        optim="adamw_torch",
    )
    lora = LoraConfig(
        r=RANK,
        lora_alpha=RANK,
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        task_type="CAUSAL_LM",
        use_rslora=True,
    )
    trainer = SFTTrainer(
        model=str(model_dir),
        args=args,
        train_dataset=Dataset.from_list(rows),
        processing_class=AutoTokenizer.from_pretrained(model_dir),
        peft_config=lora,
    )
    trainer.train()
    trainer.save_model(str(output_dir / "adapter"))
    return time.perf_counter() - started


def flow_run(model_dir: Path, file_id: str, steps: int, seed: int) -> float:
    """Seconds from calling the flow until it returns with its outputs stored."""
    from flows.finetune.flow import finetune

    started = time.perf_counter()
    outputs = finetune(
        model=str(model_dir),
        training_file=file_id,
        max_steps=steps,
        per_device_train_batch_size=BATCH,
        gradient_accumulation_steps=1,
        learning_rate=LR,
        r=RANK,
        lora_alpha=RANK,
        warmup_steps=0,
        optim="adamw",
        save_steps=save_every(steps),
        merge_before_push=False,
        seed=seed,
    )
    elapsed = time.perf_counter() - started
    assert outputs["adapter"].startswith("adapter:dir-") and len(outputs["checkpoints"]) >= 1, outputs
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()

    from ow_prefect import OpenWeights
    from ow_prefect.testing.tiny_model import build_tiny_model, sample_conversations, write_jsonl

    model_dir = build_tiny_model(WORK / "tiny-model")
    data_path = write_jsonl(sample_conversations(512), WORK / "conversations.jsonl")
    file_id = OpenWeights().files.upload(data_path, purpose="conversations").id
    baseline(model_dir, data_path, 6, seed=0)  # warm-up: imports, first-call costs
    flow_run(model_dir, file_id, 6, seed=0)  # warm-up: Prefect's ephemeral server, the flow's imports
    bare, ours = [], []
    for repeat in range(args.repeats):  # interleaved, alternating which goes first
        runs = [(bare, baseline, data_path), (ours, flow_run, file_id)]
        for samples, run, data in runs if repeat % 2 == 0 else runs[::-1]:
            samples.append(run(model_dir, data, args.steps, seed=repeat + 1))
            print(f"repeat {repeat + 1}: {'bare TRL' if run is baseline else 'flow'} {samples[-1]:.2f} s", flush=True)
    ours_s, bare_s = statistics.median(ours), statistics.median(bare)
    result = {
        "steps": args.steps,
        "batch": BATCH,
        "save_steps": save_every(args.steps),
        "repeats": args.repeats,
        "bare_trl_wall_s": [round(x, 2) for x in bare],
        "flow_wall_s": [round(x, 2) for x in ours],
        "ratio_of_medians": round(ours_s / bare_s, 3),
        "ratio_of_bests": round(min(ours) / min(bare), 3),
    }
    print(json.dumps(result, indent=2))
    emit(
        "train_cpu",
        [
            row(
                f"wall s, call → outputs stored ({args.steps} steps, median)",
                round(ours_s, 2),
                round(bare_s, 2),
                "s",
                "ratio ≤ 1.10",
                ours_s <= 1.1 * bare_s,
            )
        ],
    )


if __name__ == "__main__":
    main()
