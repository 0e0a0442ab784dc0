"""Network volumes and where pods run: a pod that mounts one runs in the volume's data center, and the Hugging Face
cache (`HF_HOME`) lives on it, so the next pod there finds the model downloaded; vLLM's cache (`VLLM_CACHE_ROOT`:
its torch.compile artifacts and model inspections) too, so the next vLLM start there does not compile again.

- `network_volume_id`: one volume the pod must mount (your data is on it): only offers in its data center are tried.
- `cache_volume_ids`: model cache volumes, one per data center you use: offers in their data centers are tried first,
  each with its volume mounted; when none has capacity, the pod runs anywhere else without a cache (the model is
  downloaded, as without a volume).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

from ow_prefect.runpod.errors import RunPodNoCapacity, RunPodNotFound
from ow_prefect.runpod.offers import Candidate, create_on_first

HF_CACHE = ".cache/huggingface"  # under the mount path, where the images put HF_HOME (/workspace/.cache/huggingface)
VLLM_CACHE = ".cache/vllm"  # and VLLM_CACHE_ROOT (/workspace/.cache/vllm)

FindCandidates = Callable[[Sequence[str]], Awaitable[list[Candidate]]]


def cache_env(mount_path: str) -> dict[str, str]:
    """The caches on a volume mounted at `mount_path`: the Hugging Face cache and vLLM's."""
    root = mount_path.rstrip("/")
    return {"HF_HOME": f"{root}/{HF_CACHE}", "VLLM_CACHE_ROOT": f"{root}/{VLLM_CACHE}"}


@dataclass
class VolumeChoice:
    """Offers to try with one request: in a volume's data center with it mounted, or anywhere."""

    request: dict[str, Any]
    candidates: list[Candidate]
    where: str
    cached: bool = False


async def volume_choices(
    runpod: Any, configuration: Any, request: dict[str, Any], candidates: list[Candidate], find: FindCandidates
) -> list[VolumeChoice]:
    """Where to try, in order. `find(data_centers)` ranks the offers of those data centers as `candidates`
    were ranked (the configuration's filters)."""
    if configuration.network_volume_id:
        volume = await _volume(runpod, configuration.network_volume_id, "network_volume_id")
        body = {**request, "dataCenterIds": [volume.data_center]}
        where = f"data center {volume.data_center} (network volume {volume.id})"
        return [VolumeChoice(body, await find([volume.data_center]), where, cached=True)]
    found = []
    for volume_id in configuration.cache_volume_ids:
        volume = await _volume(runpod, volume_id, "cache_volume_ids")
        if configuration.data_center_ids and volume.data_center not in configuration.data_center_ids:
            continue
        where = f"data center {volume.data_center} with model cache volume {volume.id}"
        offers = await find([volume.data_center])
        found.append(VolumeChoice(_mounting(request, volume, configuration), offers, where, cached=True))
    return [*found, VolumeChoice(request, candidates, "any data center" + (" without a cache" if found else ""))]


async def create_on_choices(
    runpod: Any,
    choices: Sequence[VolumeChoice],
    *,
    log: Callable[[str], Any],
    placed: Callable[[VolumeChoice], Awaitable[list[Candidate]]] | None = None,
    **options: Any,
) -> tuple[Any, Candidate, VolumeChoice]:
    """Create on the first offer with capacity, choice after choice (`placed(choice)`, when given, is awaited just
    before a choice is tried and gives the candidates to try there); no capacity anywhere: RunPodNoCapacity naming
    every offer tried."""
    tried: list[str] = []
    for choice in choices:
        candidates = await placed(choice) if placed else choice.candidates
        if len(choices) > 1:
            log(f"Trying {choice.where}: {len(candidates)} offer(s)")
        try:
            pod, candidate = await create_on_first(runpod, choice.request, candidates, log=log, **options)
            return pod, candidate, choice
        except RunPodNoCapacity as exc:
            tried += [f"{entry} ({choice.where})" if len(choices) > 1 else entry for entry in exc.tried]
    raise RunPodNoCapacity(f"no capacity on any of {len(tried)} offers: " + "; ".join(tried), tried=tried)


def _mounting(request: dict[str, Any], volume: Any, configuration: Any) -> dict[str, Any]:
    path = configuration.volume_mount_path
    env = {**cache_env(path), **request["env"]}  # a job's own HF_HOME or VLLM_CACHE_ROOT wins
    mounts = {"network": [{"volumeId": volume.id, "path": path}]}
    return {**request, "mounts": mounts, "dataCenterIds": [volume.data_center], "env": env}


async def _volume(runpod: Any, volume_id: str, variable: str) -> Any:
    try:
        return await runpod.get_network_volume(volume_id)
    except RunPodNotFound:
        raise ValueError(
            f"{variable}: network volume {volume_id!r} does not exist in this RunPod account (GET /v2/network-volumes "
            "lists them)"
        ) from None
