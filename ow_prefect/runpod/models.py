"""Typed records of what RunPod returns (unknown fields are kept: the API grows)."""

from __future__ import annotations

import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

PodStatus = Literal["PROVISIONING", "STARTING", "RUNNING", "EXITED", "ERROR", "TERMINATED"]


class _Record(BaseModel):
    model_config = ConfigDict(extra="allow", populate_by_name=True)


class PodGpu(_Record):
    id: str
    count: int = 1


class PodRuntime(_Record):
    uptime: int | None = None
    ports: list[dict[str, Any]] = Field(default_factory=list)


class Pod(_Record):
    id: str
    name: str
    status: PodStatus
    image: str | None = None
    env: dict[str, str] = Field(default_factory=dict)
    gpu: PodGpu | None = None
    cloud: str | None = None
    data_center_id: str | None = Field(default=None, alias="dataCenterId")
    cost: float | None = Field(default=None, description="USD per hour billed for this pod")
    runtime: PodRuntime | None = None
    ssh: dict[str, Any] | None = Field(default=None, description="`proxy` and `direct` ssh endpoints, each or null")
    created_at: str | None = Field(default=None, alias="createdAt")
    started_at: str | None = Field(default=None, alias="startedAt")

    @property
    def started(self) -> bool:
        """RunPod reports RUNNING right after create, before the container exists: trust `runtime` instead."""
        return self.status == "RUNNING" and self.runtime is not None

    @property
    def ended(self) -> bool:
        return self.status in ("EXITED", "ERROR", "TERMINATED")


class GpuPrice(_Record):
    secure: float | None = None
    community: float | None = None


class DataCenterAvailability(_Record):
    id: str
    name: str | None = None
    availability: Literal["NONE", "LOW", "MEDIUM", "HIGH"]


class CudaVersionAvailability(_Record):
    version: str
    available: bool = False


class GpuType(_Record):
    id: str
    name: str | None = None
    memory: int = Field(description="VRAM in GB")
    secure: bool = False
    community: bool = False
    price: GpuPrice = Field(default_factory=GpuPrice)
    availability: Literal["NONE", "LOW", "MEDIUM", "HIGH"] | None = None
    data_centers: list[DataCenterAvailability] | None = Field(default=None, alias="dataCenters")
    cuda_versions: list[CudaVersionAvailability] | None = Field(
        default=None, alias="cudaVersions", description="Host CUDA versions offered with this GPU (with availability)"
    )

    def price_in(self, cloud: str) -> float | None:
        return self.price.secure if cloud == "SECURE" else self.price.community

    def offered_in(self, cloud: str) -> bool:
        return self.secure if cloud == "SECURE" else self.community


class NetworkVolume(_Record):
    id: str
    name: str | None = None
    size: int | None = Field(default=None, description="GB")
    data_center: str = Field(alias="dataCenter", description="where it is, and so where pods mounting it run")


class LogLine(BaseModel):
    """One log event: RunPod sends `data: {"ts", "source", "line"}` with a resumable `id:`."""

    id: str | None = None
    line: str
    source: str | None = None
    ts: str | None = None

    @classmethod
    def from_event(cls, event_id: str | None, data: str) -> LogLine:
        try:
            payload = json.loads(data)
        except ValueError:
            payload = None
        if isinstance(payload, dict) and isinstance(payload.get("line"), str):
            return cls(id=event_id, line=payload["line"], source=payload.get("source"), ts=payload.get("ts"))
        return cls(id=event_id, line=data)
