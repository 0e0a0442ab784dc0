"""Which GPU to ask RunPod for: every (GPU type, cloud) that fits the job, cheapest first.

The catalog's availability is a hint, not a reservation: candidates listed as available can still answer
"no capacity", so the worker walks the list until a create succeeds.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from ow_prefect.runpod.models import GpuType

CLOUDS = ("SECURE", "COMMUNITY")


@dataclass(frozen=True)
class Candidate:
    gpu_id: str
    cloud: str
    price_per_hour: float
    memory_gb: int
    count: int
    availability: str | None

    def __str__(self) -> str:
        return f"{self.count}x {self.gpu_id} ({self.memory_gb} GB) in {self.cloud} at ${self.price_per_hour:.2f}/h"


def rank_candidates(
    gpus: Sequence[GpuType] | Mapping[str, Sequence[GpuType]],
    *,
    min_vram_gb: float,
    gpu_count: int = 1,
    preferred: Sequence[str] = (),
    clouds: Sequence[str] = CLOUDS,
    max_price_per_hour: float | None = None,
    data_centers: Sequence[str] = (),
) -> list[Candidate]:
    """Candidates that fit `min_vram_gb` over `gpu_count` GPUs, are offered and not sold out (in one of
    `data_centers`, when given and the catalog says where), within the price cap; the preference list first
    (in its order) when given, then by price per hour for the whole pod.

    `gpus` is one catalog for every cloud, or a catalog per cloud (RunPod reports availability per cloud)."""
    candidates = []
    for cloud in clouds:
        catalog = gpus.get(cloud, ()) if isinstance(gpus, Mapping) else gpus
        for gpu in catalog:
            if preferred and gpu.id not in preferred:
                continue
            if gpu.memory * gpu_count < min_vram_gb or gpu.availability == "NONE":
                continue
            if data_centers and gpu.data_centers is not None:
                offered = {dc.id for dc in gpu.data_centers if dc.availability != "NONE"}
                if not offered.intersection(data_centers):
                    continue
            price = gpu.price_in(cloud)
            if not gpu.offered_in(cloud) or price is None:
                continue
            total = round(price * gpu_count, 4)
            if max_price_per_hour is not None and total > max_price_per_hour:
                continue
            candidates.append(Candidate(gpu.id, cloud, total, gpu.memory, gpu_count, gpu.availability))
    rank = {gpu_id: i for i, gpu_id in enumerate(preferred)}
    return sorted(candidates, key=lambda c: (rank.get(c.gpu_id, 0), c.price_per_hour, c.gpu_id, c.cloud))
