"""One LoRA training run on CUDA through the project's own training code (flows/finetune/train.py), in a process
of its own so that unsloth's patches never leak into the plain transformers + PEFT run it is compared with.

    OW_TRAIN_BACKEND=unsloth python tests/gpu/train_one.py --loss sft --model DIR --data FILE --out DIR [...]

Prints one JSON line: backend, losses (every step), train_loss, tokens_per_s, peak_gb, logit_delta (how much
the saved adapter, loaded again onto the base model, changes the logits) and adapter. Needs only torch,
transformers, peft, trl, datasets (and unsloth for its backend): not Prefect, not ow_prefect's client.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from types import SimpleNamespace

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

# FineTuningParams' defaults for the fields the training code reads (tests/test_gpu_kit.py keeps them equal).
DEFAULTS = {
    "beta": 0.1,
    "chat_template": "default",
    "epochs": 1,
    "eval_batch_size": 8,
    "gradient_accumulation_steps": 8,
    "learning_rate": 1e-4,
    "load_in_4bit": False,
    "logging_steps": 1,
    "lora_alpha": 16,
    "lora_bias": "none",
    "lora_dropout": 0.0,
    "lr_scheduler_type": "linear",
    "max_grad_norm": 1.0,
    "max_seq_length": 2048,
    "max_steps": None,
    "merge_before_push": None,
    "optim": "adamw_8bit",
    "packing": False,
    "per_device_train_batch_size": 2,
    "r": 16,
    "save_steps": 5000,
    "seed": 3407,
    "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "test_file_eval_steps": None,
    "test_file_eval_strategy": "epoch",
    "train_on_responses_only": True,
    "use_rslora": True,
    "warmup_steps": 5,
    "weight_decay": 0.01,
}


def logit_delta(base_dir: str, adapter_dir: Path) -> float:
    """Largest change the saved adapter makes to the base model's logits on one input, loaded fresh."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    device, dtype = ("cuda", torch.bfloat16) if torch.cuda.is_available() else ("cpu", torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    inputs = tokenizer("What is two plus three?", return_tensors="pt").to(device)
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=dtype).to(device).eval()
    with torch.no_grad():
        before = base(**inputs).logits.float()
        tuned = PeftModel.from_pretrained(base, str(adapter_dir)).eval()
        after = tuned(**inputs).logits.float()
    return float((after - before).abs().max())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--loss", choices=["sft", "dpo", "orpo"], required=True)
    parser.add_argument("--model", required=True)
    parser.add_argument("--data", required=True, type=Path)
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--max-seq-length", type=int, default=512)
    # adamw_torch, not the jobs' default adamw_8bit: bitsandbytes does not fit in the kit's one call (64 MiB), and
    # both backends of the comparison train with the same optimizer
    parser.add_argument("--optim", default="adamw_torch")
    args = parser.parse_args(argv)
    import torch

    from flows.finetune import train  # imports unsloth first when that is the backend (backends.load)

    cfg = SimpleNamespace(
        **DEFAULTS
        | {
            "loss": args.loss,
            "model": args.model,
            "max_steps": args.steps,
            "per_device_train_batch_size": args.batch,
            "gradient_accumulation_steps": 1,
            "learning_rate": args.lr,
            "max_seq_length": args.max_seq_length,
            "warmup_steps": 2,
            "optim": args.optim,
        }
    )
    cuda = torch.cuda.is_available()  # False only when the kit itself is checked on a CPU (tests/test_gpu_kit.py)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    started = time.monotonic()
    result = train.main(cfg, args.data, None, args.out)
    wall = time.monotonic() - started
    peak_gb = torch.cuda.max_memory_allocated() / 2**30 if cuda else None
    losses = [h["loss"] for h in result.log_history if "loss" in h]
    report = {
        "backend": result.backend,
        "loss": args.loss,
        "steps": result.global_step,
        "losses": losses,
        "train_loss": result.train_loss,
        "train_tokens": result.train_tokens,
        "train_seconds": result.train_seconds,
        "tokens_per_s": result.train_tokens / result.train_seconds if result.train_seconds else None,
        "wall_seconds": wall,
        "peak_gb": peak_gb,
        "logit_delta": logit_delta(args.model, result.adapter_dir),
        "adapter": str(result.adapter_dir),
        "gpu": torch.cuda.get_device_name() if cuda else None,
        "torch": torch.__version__,
    }
    print("RESULT " + json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
