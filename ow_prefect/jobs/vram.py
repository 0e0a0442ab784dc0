"""GPU memory a fine-tuning job needs, from the model's config (not a regex on its name, which is only the
fallback). Used by the SDK to pass `requires_vram_gb` to the worker; a job can override it."""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

GIB = 1024**3
DEFAULT_VRAM_GB = 24
NAME_SIZE_RE = re.compile(r"(\d+(?:\.\d+)?)\s*[bB](?![a-zA-Z])")


def read_config(model: str) -> dict[str, Any] | None:
    """config.json of a local model directory or a Hub model (only that small file is fetched)."""
    local = Path(model).expanduser()
    if (local / "config.json").exists():
        return json.loads((local / "config.json").read_text())
    try:
        from huggingface_hub import hf_hub_download

        return json.loads(Path(hf_hub_download(model, "config.json")).read_text())
    except Exception:
        return None


def parameter_count(config: dict[str, Any]) -> int | None:
    """Parameters of a decoder-only transformer from its config (Llama, Qwen, Mistral, Gemma shapes)."""
    config = config.get("text_config", config)
    try:
        hidden = config["hidden_size"]
        layers = config["num_hidden_layers"]
        vocab = config["vocab_size"]
        intermediate = config.get("intermediate_size") or 4 * hidden
        heads = config["num_attention_heads"]
    except KeyError:
        return None
    head_dim = config.get("head_dim") or hidden // heads
    kv_heads = config.get("num_key_value_heads") or heads
    attention = hidden * head_dim * (2 * heads + 2 * kv_heads)
    experts = config.get("num_local_experts") or config.get("num_experts") or 1
    mlp = 3 * hidden * intermediate * experts
    # Qwen2 always has q/k/v biases; other families say so with attention_bias.
    if config.get("attention_bias", config.get("model_type") == "qwen2"):
        attention += head_dim * (heads + 2 * kv_heads)
    embeddings = vocab * hidden * (1 if config.get("tie_word_embeddings") else 2)
    return layers * (attention + mlp + 2 * hidden) + hidden + embeddings


# The shape assumed when only the name says how big a model is (a Llama-3-8B-like decoder).
FALLBACK_SHAPE = {"hidden_size": 4096, "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8}


def model_size(model: str) -> tuple[int, dict[str, Any]] | None:
    """(parameters, text config) from the model's config, else from a size in its name ("…-7B") with a
    Llama-like shape; None when neither says."""
    config = read_config(model)
    params = parameter_count(config) if config else None
    if params is not None:
        return params, config.get("text_config", config)
    match = NAME_SIZE_RE.search(model.split("/")[-1])
    return (int(float(match.group(1)) * 1e9), FALLBACK_SHAPE) if match else None


def estimate_vram_gb(model: str, *, load_in_4bit: bool, max_seq_length: int, batch_size: int) -> int:
    """Weights (bf16, or ~4.5 bits) + 20% for LoRA states and buffers + activations + CUDA context."""
    size = model_size(model)
    if size is None:
        return DEFAULT_VRAM_GB
    params, text = size
    hidden = text["hidden_size"]
    weight_bytes = params * (0.56 if load_in_4bit else 2)
    activation_bytes = batch_size * max_seq_length * hidden * 2 * 34
    total = weight_bytes * 1.2 + activation_bytes + 1.5 * GIB
    return max(1, math.ceil(total / GIB))


def estimate_serving_vram_gb(
    model: str,
    *,
    max_model_len: int,
    max_num_seqs: int = 16,
    lora_rank: int = 0,
    lora_adapters: int = 0,
    quantized: bool = False,
) -> int:
    """GPU memory for vLLM serving `model`: weights (16-bit, or ~4.5 bits quantized) + LoRA slots (rank × every
    linear layer, per adapter) + a KV cache holding `max_num_seqs` full-length sequences (capped at 4 of them:
    vLLM pages the rest) + 2 GiB of CUDA context and activations."""
    size = model_size(model)
    if size is None:
        return DEFAULT_VRAM_GB
    params, text = size
    hidden, layers = text["hidden_size"], text["num_hidden_layers"]
    heads = text["num_attention_heads"]
    head_dim = text.get("head_dim") or hidden // heads
    kv_heads = text.get("num_key_value_heads") or heads
    weight_bytes = params * (0.56 if quantized else 2)
    lora_bytes = lora_adapters * lora_rank * layers * 7 * 2 * hidden * 2 if lora_rank else 0
    kv_bytes = 2 * layers * kv_heads * head_dim * 2 * max_model_len * min(max_num_seqs, 4)
    total = weight_bytes + lora_bytes + kv_bytes + 2 * GIB
    return max(1, math.ceil(total / GIB))


def vram_variables(params: Any, estimate: Callable[..., int], *args: Any, **kwargs: Any) -> dict[str, int]:
    """The worker's ``min_vram_gb`` job variable: the job's ``requires_vram_gb`` when given, else
    ``estimate(*args, **kwargs)`` (called only then: it may read the model's config from the Hub)."""
    given = params.requires_vram_gb
    return {"min_vram_gb": estimate(*args, **kwargs) if given is None else given}


def single_model_vram_gb(params: Any) -> int:
    """The estimate for serving `params.base_model` (plus `params.adapter` as one LoRA of rank 64, the largest
    usual) at `params.max_model_len`: batch inference and evals."""
    return estimate_serving_vram_gb(
        params.base_model,
        max_model_len=params.max_model_len,
        lora_rank=64 if params.adapter else 0,
        lora_adapters=1 if params.adapter else 0,
        quantized=params.quantization is not None,
    )
