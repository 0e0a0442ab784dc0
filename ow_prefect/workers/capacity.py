"""Renting a run's pod, and why none could be rented: a room of the `runpod` worker (workers/runpod.py).

`PodCreation` (a mixin of `RunPodWorker`) walks the run's candidates, cheapest first, until one has capacity: in the
data centers of its network or model cache volumes first (ow_prefect/runpod/volumes.py), less what the run's
placement avoids (workers/placement.py); with `capacity_wait`, it tries again for that long, and a run cancelled
meanwhile gets no pod. When none is left, the message of a run that ends `NoCapacity`: it turns the worker's ranking
of offers (`ow_prefect.runpod.offers`: how many offers each filter removed, which candidates answered "no capacity")
and the run's job variables into one message that names what was asked, what each filter removed and the variable
that would let a GPU through.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import anyio

from ow_prefect.runpod.errors import RunPodNoCapacity
from ow_prefect.runpod.offers import Candidate, Ranking, with_margin
from ow_prefect.runpod.volumes import VolumeChoice, create_on_choices, volume_choices

if TYPE_CHECKING:
    from prefect.client.schemas.objects import FlowRun

    from ow_prefect.runpod.client import AsyncRunPodClient
    from ow_prefect.runpod.models import Pod
    from ow_prefect.workers.placement import Placement
    from ow_prefect.workers.runpod import RunPodJobConfiguration

CAPACITY_RETRY_SECONDS = (5.0, 60.0)  # first and longest pause between rounds while waiting for capacity

# Why offers were left out, and what to change: (reason, phrase with {n}, the fix).
FILTER_REASONS = {
    "cloud": ("{n} not offered in cloud {cloud}", "cloud: ANY adds the other cloud"),
    "gpu_types": ("{n} not in gpu_types", "add types to gpu_types, or leave it empty"),
    "vram": (
        "{n} with less than {vram:g} GB over {count} GPU(s)",
        "lower min_vram_gb (or requires_vram_gb) or vram_margin, or raise gpu_count",
    ),
    "stock": ("{n} sold out", "capacity_wait retries for a while"),
    "data_centers": ("{n} not in data centers {data_centers}", "widen or empty data_center_ids"),
    "cuda": (
        "{n} without a free host at the CUDA floor ({cuda})",
        "lower min_cuda_version / "
        "data_center_min_cuda_version only for an image built for an older CUDA (docs/runpod.md, CUDA)",
    ),
    "price": ("{n} above ${price:g}/h", "raise max_price_per_hour"),
    # left out by ow_prefect/workers/placement.py
    "verified": ("{n} not verified", "gpu_types: [] takes any type that fits"),
    "cooldown": (
        "{n} on cooldown after their pods failed",
        "wait, or end it with `ow gpus --clear TYPE` (docs/troubleshooting.md)",
    ),
}


def _filter_summary(configuration: RunPodJobConfiguration, ranking: Ranking) -> tuple[str, str]:
    """(what each filter removed, with counts; what to change), in filter order."""
    cuda = f"host CUDA >= {configuration.min_cuda_version}" if configuration.min_cuda_version else ""
    if configuration.data_center_min_cuda_version:
        cuda = ", ".join(filter(None, [cuda, f">= {configuration.data_center_min_cuda_version} on data-center GPUs"]))
    values = {
        "cloud": configuration.cloud,
        "vram": with_margin(configuration.min_vram_gb, configuration.vram_margin),  # what the filter compares
        "count": configuration.gpu_count,
        "data_centers": configuration.data_center_ids,
        "cuda": cuda or "none",
        "price": configuration.max_price_per_hour or 0,
    }
    removed = [(reason, n) for reason in FILTER_REASONS if (n := ranking.removed.get(reason))]
    what = "; ".join(FILTER_REASONS[reason][0].format(n=n, **values) for reason, n in removed)
    fixes = "; ".join(FILTER_REASONS[reason][1] for reason, _ in removed)
    return what, fixes


def _no_capacity_message(configuration: RunPodJobConfiguration, ranking: Ranking, tried: Sequence[str] = ()) -> str:
    wanted = (
        f"{configuration.gpu_count} GPU(s) with {configuration.min_vram_gb:g} GB in total "
        f"(+{configuration.vram_margin:.0%} margin: "
        f"{with_margin(configuration.min_vram_gb, configuration.vram_margin):g} GB), cloud "
        f"{configuration.cloud}"
        + (f", types {configuration.gpu_types}" if configuration.gpu_types else "")
        + (f", data centers {configuration.data_center_ids}" if configuration.data_center_ids else "")
        + (f", at most ${configuration.max_price_per_hour:g}/h" if configuration.max_price_per_hour else "")
        + (f", host CUDA >= {configuration.min_cuda_version}" if configuration.min_cuda_version else "")
        + (
            f" (>= {configuration.data_center_min_cuda_version} on data-center GPUs)"
            if configuration.data_center_min_cuda_version
            else ""
        )
    )
    what, fixes = _filter_summary(configuration, ranking)
    filtered = f"Of {ranking.considered} offers (GPU type × cloud) in RunPod's catalog: {what}." if what else ""
    if not ranking.candidates:
        change = f" To change: {fixes}." if fixes else ""
        return f"No RunPod GPU fits {wanted}. {filtered}{change}".strip()
    waited = f" (waited {configuration.capacity_wait} s)" if configuration.capacity_wait else ""
    return (
        f"No capacity on any of {len(ranking.candidates)} candidates{waited} for {wanted}. Tried: "
        + "; ".join(tried[-20:])
        + (f". {filtered}" if filtered else "")
        + " Set capacity_wait to keep trying, or widen the filters."
    )


class PodCreation:
    """A run's pod create, a mixin of `RunPodWorker` (whose `_state`, `_poll` and `_mark_flow_run_as_cancelled` it
    uses)."""

    async def _create(
        self,
        runpod: AsyncRunPodClient,
        flow_run: FlowRun,
        configuration: RunPodJobConfiguration,
        request: dict[str, Any],
        logger: Any,
        placement: Placement,
    ) -> tuple[Pod, Candidate, VolumeChoice] | None:
        """Walk the candidates, cheapest first (in the data centers of the run's volumes first), until one has
        capacity; wait for capacity if configured. The placement leaves out the types and data centers that failed
        (and unverified types when asked)."""
        give_up = time.monotonic() + configuration.capacity_wait
        fresh = False
        pause = CAPACITY_RETRY_SECONDS[0]
        while True:
            ranking = await configuration.find_offers(runpod, fresh=fresh)

            async def in_data_centers(data_centers: Sequence[str], fresh: bool = fresh) -> list[Candidate]:
                return (await configuration.find_offers(runpod, fresh=fresh, data_centers=data_centers)).candidates

            async def placed(choice: VolumeChoice, ranking: Ranking = ranking) -> list[Candidate]:
                """The choice's candidates less what the placement avoids, just before they are tried (the
                placement's per-candidate data centers are those of the choice being tried)."""
                kept = await placement.candidates(runpod, choice.candidates, choice.request.get("dataCenterIds") or ())
                if choice.candidates is ranking.candidates:  # the choice anywhere: what the no-capacity message counts
                    ranking.candidates = kept
                    ranking.removed |= placement.skipped
                return kept

            choices = await volume_choices(runpod, configuration, request, ranking.candidates, in_data_centers)
            try:
                return await create_on_choices(
                    runpod, choices, log=logger.info, placed=placed, request_for=placement.request_for
                )
            except RunPodNoCapacity as exc:
                tried = exc.tried
            if time.monotonic() >= give_up:
                raise RunPodNoCapacity(_no_capacity_message(configuration, ranking, tried))
            wait = min(pause, give_up - time.monotonic())
            pause = min(pause * 2, CAPACITY_RETRY_SECONDS[1])
            logger.info(f"No candidate has capacity; trying again in {wait:.0f} s (capacity_wait)")
            if await self._cancelled_within(flow_run, wait):
                await self._mark_flow_run_as_cancelled(
                    flow_run, {"message": "Cancelled while waiting for GPU capacity; no pod was created."}
                )
                return None
            fresh = True

    async def _cancelled_within(self, flow_run: FlowRun, seconds: float) -> bool:
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            await anyio.sleep(min(self._poll, max(0.0, end - time.monotonic())))
            state = await self._state(flow_run.id)
            if state is not None and (state.is_cancelling() or state.is_cancelled()):
                return True
        return False
