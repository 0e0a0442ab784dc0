"""GPU cost of a mixed job list: our worker's choice against OpenWeights' rule, on one RunPod catalog.

    .venv/bin/python bench/gpu_cost.py

The jobs are fine-tunes (0.5B to 70B, 4-bit and 16-bit), batch inference and temporary APIs; each one's VRAM
comes from ow_prefect/jobs/vram.py's estimators at the SDK's defaults (offline, so a model's size comes from its
name with a Llama-like shape, as when the Hub is unreachable). The catalog is the one FakeRunPod serves, with
every GPU type it knows in stock in both clouds (its stocked prices, else its list price), read through our
RunPod client.

- ours: `find_candidates` (ow_prefect/runpod/offers.py), as the worker calls it: every GPU type whose memory ×
  `gpu_count` covers the job, both clouds, cheapest pod first; `gpu_count` 1, or the smallest of 2, 4, 8 with a
  candidate when no single GPU fits.
- OpenWeights (longtermrisk/openweights, openweights/cluster/start_runpod.py and org_manager.py): hardware
  tiers from its GPU list (4000 Ada, L40, A100 PCIe, A100 SXM, H100 NVL, H100 SXM, H200) × counts 1, 2, 4, 8,
  each tier's usable memory being memory × count − 5 GB; a job takes the smallest tier that covers it. Its
  manager then picks at random within the tier (and now and then the next tier up); this bench gives it the
  cheapest configuration of the tier, in the cheaper cloud: the rule "smallest sufficient VRAM tier, cheapest
  within it", a lower bound of what it pays.

Prints each job's pick on both sides and the total $/h; the ratio ours / OpenWeights (goal ≤ 1.0).
"""

from __future__ import annotations

import asyncio
import os
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from bench.results import emit, row  # noqa: E402
from ow_prefect.jobs.hardware import gpu_type_id  # noqa: E402

# the GPU types OpenWeights' cluster manager rents, by its names
OPENWEIGHTS_GPUS = {name: gpu_type_id(name) for name in ("4000Ada", "L40", "A100", "A100S", "H100N", "H100S", "H200")}
OPENWEIGHTS_COUNTS = (1, 2, 4, 8)
OPENWEIGHTS_MARGIN_GB = 5
CLOUDS = ("SECURE", "COMMUNITY")


@dataclass(frozen=True)
class Job:
    name: str
    vram_gb: int


def jobs() -> list[Job]:
    """The mixed list: (description, VRAM estimate) at the SDK's defaults unless stated."""
    from ow_prefect.jobs.vram import estimate_serving_vram_gb, estimate_vram_gb

    def finetune(model: str, four_bit: bool) -> Job:
        vram = estimate_vram_gb(model, load_in_4bit=four_bit, max_seq_length=2048, batch_size=2)
        return Job(f"fine-tune {model.split('/')[-1]}{' 4-bit' if four_bit else ''}", vram)

    def serve(kind: str, model: str, adapters: int = 0, quantized: bool = False, seqs: int = 64) -> Job:
        vram = estimate_serving_vram_gb(
            model,
            max_model_len=2048,
            max_num_seqs=seqs,
            lora_rank=64 if adapters else 0,
            lora_adapters=adapters,
            quantized=quantized,
        )
        extra = (f" +{adapters} LoRA" if adapters else "") + (" 4-bit" if quantized else "")
        return Job(f"{kind} {model.split('/')[-1]}{extra}", vram)

    return [
        finetune("Qwen/Qwen2.5-0.5B-Instruct", False),
        finetune("Qwen/Qwen2.5-1.5B-Instruct", False),
        finetune("Qwen/Qwen3-4B", True),
        finetune("Qwen/Qwen2.5-7B-Instruct", True),
        finetune("Qwen/Qwen2.5-7B-Instruct", False),
        finetune("Qwen/Qwen2.5-14B-Instruct", True),
        finetune("Qwen/Qwen2.5-32B-Instruct", True),
        finetune("Qwen/Qwen2.5-32B-Instruct", False),
        finetune("meta-llama/Llama-3.3-70B-Instruct", True),
        finetune("meta-llama/Llama-3.3-70B-Instruct", False),
        serve("inference", "Qwen/Qwen2.5-7B-Instruct", adapters=1),
        serve("inference", "Qwen/Qwen2.5-32B-Instruct", adapters=1),
        serve("inference", "meta-llama/Llama-3.3-70B-Instruct", quantized=True),
        serve("API", "meta-llama/Llama-3.1-8B-Instruct", adapters=4),
        serve("API", "Qwen/Qwen2.5-14B-Instruct"),
        serve("API", "meta-llama/Llama-3.3-70B-Instruct"),
    ]


def full_catalog(fake) -> None:
    """Every GPU type of the fake in stock in both clouds, keeping the prices it already has."""
    from ow_prefect.testing.fake_runpod import GPU_TYPES

    for gpu_id in GPU_TYPES:
        for cloud in CLOUDS:
            fake.set_stock(gpu_id, 64, cloud)


async def ours(runpod, job: Job) -> tuple[str, float]:
    from ow_prefect.runpod.offers import find_candidates

    for count in (1, 2, 4, 8):
        candidates = await find_candidates(runpod, min_vram_gb=job.vram_gb, gpu_count=count)
        if candidates:
            best = candidates[0]
            return f"{best.count}x {best.gpu_id.removeprefix('NVIDIA ')} {best.cloud.lower()}", best.price_per_hour
    raise ValueError(f"no GPU configuration fits {job}")


def openweights_tiers(catalog) -> dict[int, list[tuple[float, str]]]:
    """usable GB -> [(pod $/h in its cheaper cloud, label)], from OpenWeights' GPU list and counts."""
    by_id = {gpu.id: gpu for gpu in catalog}
    tiers: dict[int, list[tuple[float, str]]] = {}
    for short, gpu_id in OPENWEIGHTS_GPUS.items():
        gpu = by_id[gpu_id]
        prices = [(gpu.price_in(cloud), cloud) for cloud in CLOUDS if gpu.offered_in(cloud) and gpu.price_in(cloud)]
        price, cloud = min(prices)
        for count in OPENWEIGHTS_COUNTS:
            usable = gpu.memory * count - OPENWEIGHTS_MARGIN_GB
            tiers.setdefault(usable, []).append((round(price * count, 4), f"{count}x {short} {cloud.lower()}"))
    return tiers


def openweights(tiers: dict[int, list[tuple[float, str]]], job: Job) -> tuple[str, float]:
    for usable in sorted(tiers):
        if job.vram_gb <= usable:
            price, label = min(tiers[usable])
            return label, price
    raise ValueError(f"no OpenWeights tier fits {job}")


async def measure() -> tuple[list[tuple[Job, str, float, str, float]], float, float]:
    from ow_prefect.runpod.client import AsyncRunPodClient
    from ow_prefect.testing.fake_runpod import FakeRunPod

    with FakeRunPod(api_key="bench-key") as fake:
        full_catalog(fake)
        async with AsyncRunPodClient("bench-key", base_url=fake.url) as runpod:
            tiers = openweights_tiers(await runpod.gpu_types())
            picks = []
            for job in jobs():
                our_label, our_price = await ours(runpod, job)
                ow_label, ow_price = openweights(tiers, job)
                picks.append((job, our_label, our_price, ow_label, ow_price))
    return picks, sum(p[2] for p in picks), sum(p[4] for p in picks)


def main() -> None:
    picks, total_ours, total_ow = asyncio.run(measure())
    width = max(len(job.name) for job, *_ in picks)
    print(f"{'job':{width}}  {'VRAM':>5}  {'ours':34} {'$/h':>6}  {'OpenWeights':24} {'$/h':>6}")
    for job, our_label, our_price, ow_label, ow_price in picks:
        print(
            f"{job.name:{width}}  {job.vram_gb:>3} GB  {our_label:34} {our_price:6.2f}  {ow_label:24} {ow_price:6.2f}"
        )
    ratio = total_ours / total_ow
    print(
        f"total $/h for {len(picks)} jobs: ours {total_ours:.2f}, OpenWeights {total_ow:.2f} → {ratio:.3f}× (goal ≤ 1)"
    )
    emit(
        "gpu_cost",
        [
            row(
                f"$/h of {len(picks)} mixed jobs",
                round(total_ours, 2),
                round(total_ow, 2),
                "$/h",
                "ratio ≤ 1.0",
                ratio <= 1,
            )
        ],
    )


if __name__ == "__main__":
    main()
