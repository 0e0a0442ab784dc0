"""Tokens per second per GPU type and model size, from `throughput.toml` (its header says how, and its sources).

python -m ow_prefect.costs          # the table: tokens/s per GPU type and model size
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

TABLE_FILE = Path(__file__).with_name("throughput.toml")
GIB = 1024**3


@dataclass(frozen=True)
class GpuSpec:
    gpu_id: str
    memory_gb: float
    tflops: float  # dense BF16, FP32 accumulate
    memory_tb_s: float
    source: str


@dataclass(frozen=True)
class Table:
    gpus: dict[str, GpuSpec]
    efficiency: dict[str, float]
    scaling: dict[str, float]
    slow: float
    fast: float
    boot_seconds: tuple[float, float, float]
    download_mb_per_s: tuple[float, float, float]
    load_mb_per_s: float
    raw: dict[str, Any] = field(repr=False, default_factory=dict)


@cache
def table() -> Table:
    raw = tomllib.loads(TABLE_FILE.read_text())
    gpus = {
        gpu_id: GpuSpec(gpu_id, row["memory_gb"], row["tflops"], row["memory_tb_s"], row["source"])
        for gpu_id, row in raw["gpus"].items()
    }
    return Table(
        gpus=gpus,
        efficiency=raw["efficiency"],
        scaling=raw["scaling"],
        slow=raw["range"]["slow"],
        fast=raw["range"]["fast"],
        boot_seconds=tuple(raw["boot"]["seconds"]),
        download_mb_per_s=tuple(raw["download"]["mb_per_s"]),
        load_mb_per_s=raw["load"]["mb_per_s"],
        raw=raw,
    )


@dataclass(frozen=True)
class Rates:
    """Expected tokens per second of one pod (GPU type × count) for one model."""

    train: float
    prefill: float
    decode: float
    gpu: GpuSpec


def _size_factor(params: float) -> float:
    scaling = table().scaling
    small = scaling["small_model_b"] * 1e9
    return 1.0 if params >= small else (params / small) ** scaling["small_model_exponent"]


def kv_bytes_per_token(text_config: dict[str, Any] | None) -> float:
    """Bytes of KV cache one token takes (16-bit K and V over every layer); a Llama-8B shape when unknown."""
    from ow_prefect.jobs.vram import FALLBACK_SHAPE

    config = text_config or FALLBACK_SHAPE
    hidden, heads = config["hidden_size"], config["num_attention_heads"]
    head_dim = config.get("head_dim") or hidden // heads
    kv_heads = config.get("num_key_value_heads") or heads
    return 2 * config["num_hidden_layers"] * kv_heads * head_dim * 2


def rates(
    gpu_id: str,
    params: float,
    *,
    gpu_count: int = 1,
    weight_bytes: float | None = None,
    text_config: dict[str, Any] | None = None,
    sequence_tokens: float = 2048,
) -> Rates | None:
    """Tokens/s on `gpu_count` × `gpu_id` for a model of `params` parameters (`weight_bytes` in memory: 2 per
    parameter unless given); None for a GPU type the table lacks. Generation is bounded by the sequences whose KV
    cache (`sequence_tokens` each) fits beside the weights."""
    gpu = table().gpus.get(gpu_id)
    if gpu is None or params <= 0:
        return None
    eff, scaling = table().efficiency, table().scaling
    flops = gpu.tflops * 1e12 * _size_factor(params)
    parallel = 1 + (gpu_count - 1) * scaling["tensor_parallel"]  # vLLM's tensor parallelism; training: one GPU
    weight_bytes = weight_bytes or 2 * params
    room = gpu.memory_gb * gpu_count * GIB * scaling["kv_cache_share"] - weight_bytes
    sequences = max(1.0, min(scaling["max_num_seqs"], room / (kv_bytes_per_token(text_config) * sequence_tokens)))
    decode = min(
        eff["decode"] * flops * parallel / (2 * params),
        sequences * eff["bandwidth"] * gpu.memory_tb_s * 1e12 * gpu_count / weight_bytes,
    )
    return Rates(
        train=eff["train"] * flops / (6 * params),
        prefill=eff["prefill"] * flops * parallel / (2 * params),
        decode=decode,
        gpu=gpu,
    )


SIZES_B = (0.5, 1.5, 8, 14, 32, 70)


def format_table(sizes: tuple[float, ...] = SIZES_B) -> str:
    """Training / generation tokens/s per GPU type (rows) and model size (columns): 16-bit weights, one GPU, a
    Llama-like shape, 2k-token sequences; `-` where the weights do not fit in the card's memory."""
    header = f"{'GPU type (RunPod id)':<50}" + "".join(f"{f'{size:g}B':>18}" for size in sizes)
    lines = [
        "tokens/s of one GPU: LoRA training / batch generation (vLLM); prompts are processed 2.5x faster than "
        "generation where compute-bound",
        header,
        "-" * len(header),
    ]
    gpus = sorted(table().gpus.values(), key=lambda gpu: -gpu.tflops)
    for gpu in gpus:
        cells = []
        for size in sizes:
            if 2 * size * 1e9 > gpu.memory_gb * GIB * table().scaling["kv_cache_share"]:
                cells.append(f"{'-':>18}")
                continue
            found = rates(gpu.gpu_id, size * 1e9)
            cells.append(f"{_three_digits(found.train):>9} /{_three_digits(found.decode):>8}")
        lines.append(f"{gpu.gpu_id:<50}" + "".join(cells))
    return "\n".join(lines)


def _three_digits(value: float) -> str:
    return f"{float(f'{value:.3g}'):,.0f}"
