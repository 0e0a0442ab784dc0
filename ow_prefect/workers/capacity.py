"""Why no RunPod pod could be rented, and what to change: the message of a run that ends `NoCapacity`.

A room of the `runpod` worker (workers/runpod.py): it turns the worker's ranking of offers (`ow_prefect.runpod.offers`:
how many offers each filter removed, which candidates answered "no capacity") and the run's job variables into
one message that names what was asked, what each filter removed and the variable that would let a GPU through.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from ow_prefect.runpod.offers import Ranking, with_margin

if TYPE_CHECKING:
    from ow_prefect.workers.runpod import RunPodJobConfiguration

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
