"""Temporary OpenAI-compatible APIs (vLLM's server): the parameters, the `vllm_api` job type, and the
keep-alive channel between the SDK and the running flow.

The channel is three named Prefect objects per job (names from the job id, so both sides find them):
- Variable ``ow-api-deadline-<job id>``: ``{"deadline": epoch seconds, "reason": ...}``; clients move it
  forward, the flow's heartbeat stops vLLM once it has passed (``down()`` sets it to 0);
- Variable ``ow-api-endpoint-<job id>``: ``{"base_url", "models", "flow_run_id"}``, set once vLLM is healthy;
- Secret block ``ow-api-key-<job id>``: the API key of the run serving now (never a flow parameter, never
  logged); each run makes its own and deletes it when it ends.
"""

from __future__ import annotations

import time
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from ow_prefect.jobs.base import Job
from ow_prefect.jobs.inference import ModelRef, resolve_model
from ow_prefect.jobs.registry import register

FIRST_DEADLINE_SECONDS = 15 * 60  # until a client first extends it
SERVE_PORT = 8000


def deadline_variable(job_id: str) -> str:
    return f"ow-api-deadline-{job_id}"


def endpoint_variable(job_id: str) -> str:
    return f"ow-api-endpoint-{job_id}"


def key_secret(job_id: str) -> str:
    return f"ow-api-key-{job_id}"


def adapter_name(ref: ModelRef) -> str:
    """The model name a LoRA module is served under: its given name (a Hugging Face adapter's repo id), the
    fine-tuning job id, else the adapter's file id."""
    return ref.name or ref.job or ref.adapter.replace(":", "-")


class ApiParams(BaseModel):
    """Parameters of the `vllm-api` flow (vLLM's OpenAI-compatible server)."""

    model_config = ConfigDict(extra="forbid")

    model: str | ModelRef = Field(
        description="Base model (Hub id or local directory), a fine-tuning job id, or a model reference with an "
        "adapter (then served as a LoRA module on its base)."
    )
    lora_adapters: list[str | ModelRef] = Field(
        default_factory=list,
        description="More LoRA adapters on the same base: fine-tuning job ids or model references. Each is served "
        "under its job id (or adapter file id) as the model name.",
    )
    max_model_len: int = Field(default=2048, ge=16, description="Context length.")
    max_num_seqs: int = Field(default=64, ge=1, description="Sequences vLLM batches at once.")
    max_lora_rank: int | None = Field(default=None, ge=1, description="Largest LoRA rank; default: the adapters'.")
    max_loras: int | None = Field(
        default=None,
        ge=1,
        description="LoRA adapters served in one batch (vLLM's --max-loras); default: all of them. Fewer saves GPU "
        "memory; requests for the others wait for a slot.",
    )
    quantization: str | None = Field(default=None, description="vLLM quantization (awq, gptq, fp8, ...).")
    kv_cache_dtype: str | None = Field(default=None, description="KV cache dtype (auto, fp8, ...).")
    requires_vram_gb: int | None = Field(default=None, ge=0, description="GPU memory; default: estimated.")

    @field_validator("model", mode="before")
    @classmethod
    def _model(cls, value: Any) -> Any:
        return resolve_model(value)

    @field_validator("max_loras", "max_lora_rank", mode="before")
    @classmethod
    def _openweights_defaults(cls, value: Any) -> Any:
        """OpenWeights' defaults mean ours: max_lora_rank='guess' (from the adapters), max_loras=-1 (all)."""
        return None if value in ("guess", -1) else value

    @field_validator("lora_adapters", mode="before")
    @classmethod
    def _adapters(cls, value: Any) -> Any:
        return [resolve_model(item) for item in value] if isinstance(value, list) else value

    @model_validator(mode="after")
    def _one_base(self) -> ApiParams:
        for adapter in self.lora_adapters:
            if not isinstance(adapter, ModelRef) or adapter.adapter is None:
                raise ValueError(f"lora_adapters: {adapter!r} is not an adapter (a fine-tuning job id or reference)")
            if adapter.base != self.base_model:
                raise ValueError(
                    f"lora_adapters: {adapter_name(adapter)} was trained on {adapter.base}, not {self.base_model}; "
                    "serve it on its own base (ow.api.multi_deploy groups adapters by base)"
                )
        return self

    @property
    def base_model(self) -> str:
        return self.model.base if isinstance(self.model, ModelRef) else self.model

    @property
    def adapters(self) -> list[ModelRef]:
        """Every LoRA module to serve: the model's own adapter first, then `lora_adapters`, without repeats."""
        found = [self.model] if isinstance(self.model, ModelRef) and self.model.adapter else []
        for adapter in self.lora_adapters:
            if adapter.adapter not in {a.adapter for a in found}:
                found.append(adapter)
        return found

    @property
    def served_names(self) -> list[str]:
        return [self.base_model, *(adapter_name(a) for a in self.adapters)]


@register("vllm_api")
class ApiJob(Job):
    """A long-running vLLM OpenAI server that stops itself when its keep-alive deadline passes."""

    deployment = "vllm-api/serve"
    entrypoint = "flows/vllm_api/flow.py:vllm_api"
    params = ApiParams
    code = ("flows/vllm_api", "flows/_runtime.py", "flows/_vllm.py", "flows/_gateway.py")
    id_prefix = "apijob"
    image_setting = "serve_image"

    @classmethod
    def prepare_params(cls, params: dict[str, Any], storage: Any) -> dict[str, Any]:
        """Hugging Face LoRA adapters (as `model` or in `lora_adapters`) are stored and referenced first."""
        from ow_prefect.jobs.adapters import adapter_references, with_adapter_model

        prepared = dict(with_adapter_model(params, storage))
        if "lora_adapters" in prepared:
            prepared["lora_adapters"] = adapter_references(prepared["lora_adapters"], storage)
        return prepared

    @classmethod
    def job_variables(cls, validated: ApiParams) -> dict[str, Any]:
        from ow_prefect.jobs.vram import estimate_serving_vram_gb, vram_variables

        vram = vram_variables(
            validated,
            estimate_serving_vram_gb,
            validated.base_model,
            max_model_len=validated.max_model_len,
            max_num_seqs=validated.max_num_seqs,
            lora_rank=validated.max_lora_rank or 64,
            lora_adapters=min(validated.max_loras or len(validated.adapters), len(validated.adapters)),
            quantized=validated.quantization is not None,
        )
        return {**vram, "ports": [f"{SERVE_PORT}/http"]}

    @classmethod
    def work(cls, validated: ApiParams, storage: Any) -> Any:
        from ow_prefect.costs.work import model_work

        return model_work(
            validated.base_model,
            quantized=validated.quantization is not None,
            open_ended="an API serves until its keep-alive deadline passes (the estimate is per hour)",
        )


def deadline_value(seconds_from_now: float, reason: str) -> dict[str, Any]:
    return {"deadline": time.time() + seconds_from_now, "reason": reason}
