"""Loading the base model with LoRA: unsloth where it is installed (GPU kernels on CUDA, its CPU fallback
elsewhere), transformers + PEFT otherwise. Both hand a PEFT model to the same TRL trainers.

The ``OW_TRAIN_BACKEND`` setting = auto (default) | unsloth | transformers.
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from typing import Any

import torch


@dataclass
class Loaded:
    model: Any
    tokenizer: Any
    backend: str


def backend_setting() -> str:
    """``OW_TRAIN_BACKEND`` from ow_prefect's settings (``.env`` included); where ow_prefect's dependencies are
    not installed (the GPU kit runs this code with torch, transformers, trl and peft only), the variable itself."""
    try:
        from ow_prefect.settings import get_settings
    except ImportError:
        return os.environ.get("OW_TRAIN_BACKEND", "auto")
    return get_settings().train_backend


def choose_backend() -> str:
    wanted = backend_setting()
    if wanted not in ("auto", "unsloth", "transformers"):
        raise ValueError(f"OW_TRAIN_BACKEND={wanted!r}: use auto, unsloth or transformers")
    if wanted == "auto":
        # unsloth's kernels are CUDA's; on a CPU it only falls back to what transformers does (docs/local.md)
        return "unsloth" if importlib.util.find_spec("unsloth") and torch.cuda.is_available() else "transformers"
    if wanted == "unsloth" and not importlib.util.find_spec("unsloth"):
        raise ValueError("OW_TRAIN_BACKEND=unsloth but unsloth is not installed in this environment")
    return wanted


def compute_dtype() -> torch.dtype:
    if torch.cuda.is_available():
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def lora_kwargs(cfg: Any) -> dict[str, Any]:
    """The LoRA settings, in the names both unsloth's get_peft_model and PEFT's LoraConfig take."""
    return {
        "r": cfg.r,
        "lora_alpha": cfg.lora_alpha,
        "lora_dropout": cfg.lora_dropout,
        "target_modules": cfg.target_modules,
        "bias": cfg.lora_bias,
        "use_rslora": cfg.use_rslora,
    }


def load_unsloth(cfg: Any) -> Loaded:
    from unsloth import FastLanguageModel

    model, tokenizer = FastLanguageModel.from_pretrained(
        cfg.model, max_seq_length=cfg.max_seq_length, load_in_4bit=cfg.load_in_4bit, dtype=None
    )
    model = FastLanguageModel.get_peft_model(
        model,
        **lora_kwargs(cfg),
        random_state=cfg.seed,
        use_gradient_checkpointing="unsloth" if torch.cuda.is_available() else False,
    )
    return Loaded(model, tokenizer, "unsloth")


def load_transformers(cfg: Any) -> Loaded:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs: dict[str, Any] = {"dtype": compute_dtype()}
    if cfg.load_in_4bit:
        if not torch.cuda.is_available():
            raise RuntimeError("load_in_4bit needs a CUDA GPU (bitsandbytes); this machine has none")
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=compute_dtype()
        )
    model = AutoModelForCausalLM.from_pretrained(cfg.model, **kwargs)
    tokenizer = AutoTokenizer.from_pretrained(cfg.model)
    return Loaded(
        get_peft_model(model, LoraConfig(**lora_kwargs(cfg), task_type="CAUSAL_LM")), tokenizer, "transformers"
    )


def load(cfg: Any) -> Loaded:
    torch.manual_seed(cfg.seed)
    return load_unsloth(cfg) if choose_backend() == "unsloth" else load_transformers(cfg)
