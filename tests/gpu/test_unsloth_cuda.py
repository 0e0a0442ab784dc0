"""The CUDA training path, on a GPU (marker `gpu`; skipped without CUDA or unsloth). Run by `scripts/gpu-check`'s
command on a lent GPU machine; see docs/gpu-verification.md.

- unsloth on CUDA trains SFT, DPO and ORPO LoRA adapters on the tiny local model in bf16 through the project's own
  training code: the loss is finite and goes down, and the saved adapter, loaded again, changes the logits;
- on a bigger local model (~90M parameters) and the same batches, unsloth against plain transformers + PEFT in
  the same run: at least 1.3× the tokens/s, and no more peak GPU memory; the VRAM estimator's figure for the
  run is recorded next to both peaks (its measured error on a GPU).

Every result is appended as JSON to `$OW_GPU_RESULTS/gpu-results.jsonl` (default: the test's tmp dir).
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.gpu


def _cuda() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


if not _cuda() or importlib.util.find_spec("unsloth") is None:
    pytest.skip("needs CUDA and unsloth (scripts/gpu-check prints how to run this on a GPU)", allow_module_level=True)


def tiny_model_module():
    """ow_prefect/testing/tiny_model.py loaded by path: it needs only the standard library, transformers and
    tokenizers, while `import ow_prefect` would need the client's dependencies too."""
    spec = importlib.util.spec_from_file_location("tiny_model", ROOT / "ow_prefect" / "testing" / "tiny_model.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> dict[str, Path]:
    tm = tiny_model_module()
    root = tmp_path_factory.mktemp("gpu")
    long_rows = []
    for i in range(256):  # ~400-token conversations, so the throughput runs measure training, not overhead
        rows = tm.sample_conversations(24, seed=i)
        answers = " ".join(row["messages"][2]["content"] for row in rows)
        long_rows.append({"messages": [*rows[0]["messages"][:2], {"role": "assistant", "content": answers}]})
    return {
        "tiny": tm.build_tiny_model(root / "tiny"),
        "small": tm.build_tiny_model(
            root / "small",
            hidden_size=1024,
            intermediate_size=2816,
            num_hidden_layers=8,
            num_attention_heads=16,
            num_key_value_heads=4,
            head_dim=64,
            max_position_embeddings=2048,
        ),
        "sft": tm.write_jsonl(tm.sample_conversations(256), root / "sft.jsonl"),
        "preference": tm.write_jsonl(tm.sample_preferences(256), root / "preference.jsonl"),
        "long": tm.write_jsonl(long_rows, root / "long.jsonl"),
        "root": root,
    }


def train(backend: str, loss: str, model: Path, data: Path, out: Path, **options) -> dict:
    args = [sys.executable, str(ROOT / "tests" / "gpu" / "train_one.py"), "--loss", loss, "--model", str(model)]
    args += ["--data", str(data), "--out", str(out)]
    for name, value in options.items():
        args += [f"--{name.replace('_', '-')}", str(value)]
    env = {**os.environ, "OW_TRAIN_BACKEND": backend, "PYTHONPATH": os.pathsep.join([str(ROOT), *sys.path])}
    env |= {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    done = subprocess.run(args, env=env, capture_output=True, text=True, timeout=900)
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    assert done.returncode == 0 and lines, f"{backend} {loss} failed:\n{done.stdout[-4000:]}\n{done.stderr[-6000:]}"
    report = json.loads(lines[-1].removeprefix("RESULT "))
    record(report)
    return report


def record(report: dict) -> None:
    folder = Path(os.environ.get("OW_GPU_RESULTS") or ROOT / ".gpu-results")
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "gpu-results.jsonl", "a") as out:
        out.write(json.dumps({k: v for k, v in report.items() if k != "losses"} | {"losses": report["losses"]}) + "\n")
    print(json.dumps({k: v for k, v in report.items() if k != "losses"}))


@pytest.mark.parametrize("loss", ["sft", "dpo", "orpo"])
def test_unsloth_trains_lora_on_cuda(workdir, loss):
    data = workdir["sft"] if loss == "sft" else workdir["preference"]
    report = train("unsloth", loss, workdir["tiny"], data, workdir["root"] / f"unsloth-{loss}", steps=30)
    assert report["backend"] == "unsloth"
    losses = report["losses"]
    assert len(losses) >= 10 and all(math.isfinite(x) for x in losses)
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5, losses  # going down
    assert report["logit_delta"] > 1e-3  # the adapter, saved and loaded again, changes the model


def vram_estimate_gb(model: Path, batch: int, max_seq_length: int) -> int:
    """ow_prefect/jobs/vram.py's estimate for this run, loaded by path (it needs only the standard library)."""
    spec = importlib.util.spec_from_file_location("vram", ROOT / "ow_prefect" / "jobs" / "vram.py")
    vram = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(vram)
    return vram.estimate_vram_gb(str(model), load_in_4bit=False, max_seq_length=max_seq_length, batch_size=batch)


def test_unsloth_is_faster_than_transformers_peft_and_uses_no_more_memory(workdir):
    options = {"steps": 40, "batch": 8, "max_seq_length": 1024, "lr": 2e-4}
    runs = {
        backend: train(
            backend, "sft", workdir["small"], workdir["long"], workdir["root"] / f"speed-{backend}", **options
        )
        for backend in ("transformers", "unsloth")
    }
    fast, plain = runs["unsloth"], runs["transformers"]
    assert fast["backend"] == "unsloth" and plain["backend"] == "transformers"
    summary = {
        "kind": "throughput",
        "unsloth_tokens_per_s": fast["tokens_per_s"],
        "transformers_tokens_per_s": plain["tokens_per_s"],
        "ratio": fast["tokens_per_s"] / plain["tokens_per_s"],
        "unsloth_peak_gb": fast["peak_gb"],
        "transformers_peak_gb": plain["peak_gb"],
        "vram_estimate_gb": vram_estimate_gb(workdir["small"], options["batch"], options["max_seq_length"]),
        "losses": [],
    }
    record(summary)
    assert summary["ratio"] >= 1.3, summary  # unsloth's reason to be in the image
    assert fast["peak_gb"] <= plain["peak_gb"], summary
