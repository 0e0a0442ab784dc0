"""Which GPU to ask RunPod for: every (GPU type, cloud) that fits the job, cheapest first.

The catalog's availability is a hint, not a reservation: candidates listed as available can still answer
"no capacity", so the worker walks the list until a create succeeds.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ow_prefect.runpod.errors import RunPodNoCapacity
from ow_prefect.runpod.models import GpuType, Pod

if TYPE_CHECKING:
    from ow_prefect.runpod.client import AsyncRunPodClient

CLOUDS = ("SECURE", "COMMUNITY")
# The share of GPU memory asked for on top of a job's estimate (`vram_margin`, a job variable). The estimators
# (ow_prefect/jobs/vram.py) fall short of Unsloth's published minimum fine-tuning memory by up to 12% (32B
# QLoRA: 23 GiB estimated, 26 GB published; bench/gpu_cost.py prints the whole comparison), so 15% covers every
# published point; a job packed to its estimate with no margin (a 47 GB estimate on a 48 GB card) risks an OOM.
DEFAULT_VRAM_MARGIN = 0.15


def with_margin(min_vram_gb: float, vram_margin: float = DEFAULT_VRAM_MARGIN) -> float:
    """The GPU memory to ask for: the job's estimate plus the safety margin."""
    return round(min_vram_gb * (1 + vram_margin), 3)


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


async def find_candidates(
    runpod: AsyncRunPodClient,
    *,
    min_vram_gb: float,
    gpu_count: int = 1,
    preferred: Sequence[str] = (),
    clouds: Sequence[str] = CLOUDS,
    max_price_per_hour: float | None = None,
    data_centers: Sequence[str] = (),
    fresh: bool = False,
) -> list[Candidate]:
    """Read RunPod's catalog (per cloud, for `gpu_count` GPUs) and rank it; refuses unknown GPU type ids."""
    catalogs = {cloud: await runpod.gpu_types(count=gpu_count, cloud=cloud, fresh=fresh) for cloud in clouds}
    known = {gpu.id for catalog in catalogs.values() for gpu in catalog}
    unknown = [gpu_id for gpu_id in preferred if gpu_id not in known]
    if unknown:
        raise ValueError(
            f"gpu_types {unknown} are not RunPod GPU type ids; valid ids include {sorted(known)[:8]} "
            "(the full list: GET /v2/catalog/gpus)"
        )
    return rank_candidates(
        catalogs,
        min_vram_gb=min_vram_gb,
        gpu_count=gpu_count,
        preferred=preferred,
        clouds=clouds,
        max_price_per_hour=max_price_per_hour,
        data_centers=data_centers,
    )


async def create_on_first(
    runpod: AsyncRunPodClient,
    request: dict[str, Any],
    candidates: Sequence[Candidate],
    *,
    min_cuda_version: str | None = None,
    log: Callable[[str], Any] = print,
    request_for: Callable[[dict[str, Any], Candidate], dict[str, Any]] | None = None,
) -> tuple[Pod, Candidate]:
    """Create the pod `request` describes (`request_for(request, candidate)`, when given, adapts it to each
    candidate) on the first candidate with capacity, logging every attempt.

    Raises `RunPodNoCapacity` naming every candidate tried when none had room; any other error at once."""
    tried = []
    for number, candidate in enumerate(candidates, 1):
        gpu: dict[str, Any] = {"id": candidate.gpu_id, "count": candidate.count}
        if min_cuda_version:
            gpu["minCudaVersion"] = min_cuda_version
        log(f"Creating pod {number}/{len(candidates)}: {candidate}")
        try:
            body = request_for(request, candidate) if request_for else request
            return await runpod.create_pod({**body, "gpu": gpu, "cloud": candidate.cloud}), candidate
        except RunPodNoCapacity as exc:
            log(f"No capacity for {candidate}: {exc.detail}")
            tried.append(f"{candidate}: no capacity")
    raise RunPodNoCapacity(f"no capacity on any of {len(candidates)} candidates: " + "; ".join(tried), tried=tried)
