"""Which GPU to ask RunPod for: every (GPU type, cloud) that fits the job, cheapest first.

The catalog's availability is a hint, not a reservation: candidates listed as available can still answer
"no capacity", so the worker walks the list until a create succeeds.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
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


# NVIDIA's CUDA forward compatibility (the cuda-compat package) works on data-center GPUs only, not on GeForce or
# RTX workstation cards: https://docs.nvidia.com/deploy/cuda-compatibility/forward-compatibility.html
DATA_CENTER_GPU = re.compile(
    r"^(Tesla |NVIDIA (A100|A30|A40|A10|A16|A2|H100|H200|GH200|B200|B300|L4|L40S?|T4)\b)|Server Edition"
)
# CUDA 13 dropped the architectures before Turing: no CUDA 13 build runs on these, whatever the host's driver.
BEFORE_TURING = re.compile(r"V100|P100|P40|K80|M60")


@dataclass(frozen=True)
class Candidate:
    gpu_id: str
    cloud: str
    price_per_hour: float
    memory_gb: int
    count: int
    availability: str | None
    min_cuda_version: str | None = None  # the host CUDA floor sent with this candidate's create

    def __str__(self) -> str:
        return f"{self.count}x {self.gpu_id} ({self.memory_gb} GB) in {self.cloud} at ${self.price_per_hour:.2f}/h"


@dataclass
class Ranking:
    """The candidates, and why the catalog's other offers (GPU type × cloud) were left out: `removed` counts
    each offer under the first filter that removed it (keys: cloud, gpu_types, vram, stock, data_centers, cuda,
    price)."""

    candidates: list[Candidate]
    considered: int = 0
    removed: dict[str, int] = field(default_factory=dict)


def is_data_center_gpu(gpu_id: str) -> bool:
    return bool(DATA_CENTER_GPU.search(gpu_id))


def cuda_floor(gpu_id: str, min_cuda_version: str | None, data_center_min_cuda_version: str | None) -> str | None:
    """The lowest host CUDA version an image can run on with this GPU: `data_center_min_cuda_version` (an image
    with cuda-compat) on data-center GPUs, `min_cuda_version` on every other card."""
    if data_center_min_cuda_version and is_data_center_gpu(gpu_id):
        return data_center_min_cuda_version
    return min_cuda_version


def cuda_version(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in text.split("."))


def _runs_cuda(gpu: GpuType, floor: str | None, image_cuda: str | None) -> bool:
    """Whether some host with this GPU and CUDA >= `floor` is available (RunPod's `cudaVersions`; none listed:
    no CUDA host), and the GPU's architecture is still supported by the image's CUDA major."""
    if image_cuda and cuda_version(image_cuda)[0] >= 13 and BEFORE_TURING.search(gpu.id):
        return False
    if floor is None:
        return True
    return any(v.available and cuda_version(v.version) >= cuda_version(floor) for v in gpu.cuda_versions or ())


def rank_offers(
    gpus: Sequence[GpuType] | Mapping[str, Sequence[GpuType]],
    *,
    min_vram_gb: float,
    gpu_count: int = 1,
    preferred: Sequence[str] = (),
    clouds: Sequence[str] = CLOUDS,
    max_price_per_hour: float | None = None,
    data_centers: Sequence[str] = (),
    min_cuda_version: str | None = None,
    data_center_min_cuda_version: str | None = None,
) -> Ranking:
    """Candidates that are offered in one of `clouds`, are in `preferred` (when given), fit `min_vram_gb` over
    `gpu_count` GPUs, are not sold out, are in one of `data_centers` (when given and the catalog says where), have
    a host at the GPU's CUDA floor (see `cuda_floor`) and are within the price cap; the preference list first (in
    its order) when given, then by price per hour for the whole pod.

    `gpus` is one catalog for every cloud, or a catalog per cloud (RunPod reports availability per cloud)."""
    ranking = Ranking([])
    for cloud in clouds:
        catalog = gpus.get(cloud, ()) if isinstance(gpus, Mapping) else gpus
        for gpu in catalog:
            ranking.considered += 1
            floor = cuda_floor(gpu.id, min_cuda_version, data_center_min_cuda_version)
            price = gpu.price_in(cloud)
            total = round(price * gpu_count, 4) if price is not None else None
            checks = (
                ("cloud", gpu.offered_in(cloud) and price is not None),
                ("gpu_types", not preferred or gpu.id in preferred),
                ("vram", gpu.memory * gpu_count >= min_vram_gb),
                ("stock", gpu.availability != "NONE"),
                ("data_centers", _in_data_centers(gpu, data_centers)),
                ("cuda", _runs_cuda(gpu, floor, min_cuda_version)),
                ("price", max_price_per_hour is None or (total is not None and total <= max_price_per_hour)),
            )
            failed = next((reason for reason, ok in checks if not ok), None)
            if failed:
                ranking.removed[failed] = ranking.removed.get(failed, 0) + 1
                continue
            ranking.candidates.append(Candidate(gpu.id, cloud, total, gpu.memory, gpu_count, gpu.availability, floor))
    rank = {gpu_id: i for i, gpu_id in enumerate(preferred)}
    ranking.candidates.sort(key=lambda c: (rank.get(c.gpu_id, 0), c.price_per_hour, c.gpu_id, c.cloud))
    return ranking


def _in_data_centers(gpu: GpuType, data_centers: Sequence[str]) -> bool:
    if not data_centers or gpu.data_centers is None:
        return True
    offered = {dc.id for dc in gpu.data_centers if dc.availability != "NONE"}
    return bool(offered.intersection(data_centers))


def rank_candidates(gpus: Sequence[GpuType] | Mapping[str, Sequence[GpuType]], **filters: Any) -> list[Candidate]:
    """`rank_offers(...).candidates`."""
    return rank_offers(gpus, **filters).candidates


async def find_offers(
    runpod: AsyncRunPodClient,
    *,
    min_vram_gb: float,
    gpu_count: int = 1,
    preferred: Sequence[str] = (),
    clouds: Sequence[str] = CLOUDS,
    fresh: bool = False,
    **filters: Any,
) -> Ranking:
    """Read RunPod's catalog (per cloud, for `gpu_count` GPUs) and rank it (`filters`: see `rank_offers`);
    refuses unknown GPU type ids."""
    catalogs = {cloud: await runpod.gpu_types(count=gpu_count, cloud=cloud, fresh=fresh) for cloud in clouds}
    known = {gpu.id for catalog in catalogs.values() for gpu in catalog}
    unknown = [gpu_id for gpu_id in preferred if gpu_id not in known]
    if unknown:
        raise ValueError(
            f"gpu_types {unknown} are not RunPod GPU type ids; valid ids include {sorted(known)[:8]} "
            "(the full list: GET /v2/catalog/gpus)"
        )
    return rank_offers(
        catalogs, min_vram_gb=min_vram_gb, gpu_count=gpu_count, preferred=preferred, clouds=clouds, **filters
    )


async def find_candidates(runpod: AsyncRunPodClient, **filters: Any) -> list[Candidate]:
    """`find_offers(...).candidates`."""
    return (await find_offers(runpod, **filters)).candidates


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
        if candidate.min_cuda_version or min_cuda_version:
            gpu["minCudaVersion"] = candidate.min_cuda_version or min_cuda_version
        log(f"Creating pod {number}/{len(candidates)}: {candidate}")
        try:
            body = request_for(request, candidate) if request_for else request
            return await runpod.create_pod({**body, "gpu": gpu, "cloud": candidate.cloud}), candidate
        except RunPodNoCapacity as exc:
            log(f"No capacity for {candidate}: {exc.detail}")
            tried.append(f"{candidate}: no capacity")
    raise RunPodNoCapacity(f"no capacity on any of {len(candidates)} candidates: " + "; ".join(tried), tried=tried)
