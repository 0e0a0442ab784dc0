"""GPU cost of a mixed job list: our worker's choice against OpenWeights' current rule, on a dated price snapshot.

    .venv/bin/python bench/gpu_cost.py

The jobs are fine-tunes (0.5B to 70B, 4-bit and 16-bit), batch inference and temporary APIs; each one's VRAM
comes from ow_prefect/jobs/vram.py's estimators at the SDK's defaults (offline, so a model's size comes from its
name with a Llama-like shape, as when the Hub is unreachable).

Prices: PRICE_SNAPSHOT below (no live account or internet here; its sources and date are in it), served by
FakeRunPod as its SECURE-cloud catalog (GPU types without a sourced price are left out of the catalog, for both
sides) and read through our RunPod client.

- ours: `find_candidates` (ow_prefect/runpod/offers.py) as the worker calls it: the estimate plus the worker's
  default `vram_margin` (DEFAULT_VRAM_MARGIN), every GPU type whose memory × `gpu_count` covers it, cheapest pod
  first; `gpu_count` 1, or the smallest of 2, 4, 8 with a candidate when no single GPU fits. The same without
  the margin is printed too (what the worker did before the margin existed).
- OpenWeights: its current rule, longtermrisk/openweights at commit 286964fcf0e23d812f8c2ca226c41a3914eca27d,
  openweights/cluster/start_runpod.py (`VERIFIED_GPUs`, `RunpodHardwareRegistry.refresh` and
  `get_candidate_hardware`, `GPU_COST_PER_HOUR`) and openweights/cluster/org_manager.py (`determine_gpu_type`
  takes the first candidate): one GPU only (`1x`), usable memory = the catalog's memory − 5 GB, every tier at
  least the job's VRAM, smallest tier first and within a tier by its own hard-coded cost table (types missing
  from it sort last); no margin beyond the 5 GB. A job no single verified GPU fits cannot run there ("No
  suitable GPU configuration"): it is listed and left out of both totals.

Also prints the estimators' error against Unsloth's published minimum fine-tuning memory (the figures that chose
DEFAULT_VRAM_MARGIN). Emits: $/h of the jobs both can run, ours with the margin vs OpenWeights (goal ≤ 1.0).
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

SNAPSHOT_DATE = "2026-03-10"
# USD per GPU-hour for one pod GPU. Sources, in order of precedence:
#  [d] deploybase.ai, "RunPod GPU Pricing: 2026 Comprehensive Pricing Guide" (2026-03-10), its lower per-hour column
#      (RunPod's listed pod price; it agrees with [o] on H100 SXM and H200);
#  [o] OpenWeights' own GPU_COST_PER_HOUR ("approximate RunPod on-demand cost per GPU-hour", start_runpod.py at the
#      commit above), for H100 NVL, which [d] does not list;
#  [s] docs.runpod.io/serverless/pricing (RunPod's own per-second prices per GPU class, as stored by the search
#      tool), scaled to pods by the pod/serverless ratio of a class [d] prices: for GPU types [d] and [o] do not
#      list. 48 GB: A6000/A40 at $0.00034/s vs the L40/L40S class at $0.00053/s, whose pods are $0.69–0.79/h →
#      ×0.39; 16 GB: A4000/A4500/RTX 4000 at $0.00016/s vs the 3090/A5000/L4 class at $0.00019/s, pod $0.22 →
#      ×0.32; the RTX 6000 Ada and A5000 share a class with L40S and RTX 3090 and take their prices.
# Read on 2026-11-30 through the search tool's stored copies (no internet here): RunPod's live prices move.
PRICE_SNAPSHOT: dict[str, tuple[float, str]] = {
    "NVIDIA GeForce RTX 3090": (0.22, "d"),
    "NVIDIA GeForce RTX 4090": (0.34, "d"),
    "NVIDIA L4": (0.44, "d"),
    "NVIDIA L40": (0.69, "d"),
    "NVIDIA GeForce RTX 5090": (0.69, "d"),
    "NVIDIA L40S": (0.79, "d"),
    "NVIDIA RTX PRO 6000 Blackwell Server Edition": (0.89, "d"),
    "NVIDIA A100 80GB PCIe": (1.19, "d"),
    "NVIDIA A100-SXM4-80GB": (1.39, "d"),
    "NVIDIA H100 PCIe": (1.99, "d"),
    "NVIDIA H100 80GB HBM3": (2.69, "d"),
    "NVIDIA H200": (3.59, "d"),
    "NVIDIA B200": (5.98, "d"),
    "NVIDIA H100 NVL": (3.07, "o"),
    "NVIDIA RTX A6000": (0.48, "s"),
    "NVIDIA A40": (0.48, "s"),
    "NVIDIA RTX 6000 Ada Generation": (0.79, "s"),
    "NVIDIA RTX A5000": (0.22, "s"),
    "NVIDIA RTX A4000": (0.18, "s"),
    "NVIDIA RTX A4500": (0.18, "s"),
    "NVIDIA RTX 4000 Ada Generation": (0.18, "s"),
}

# OpenWeights' current rule (commit and files in the module docstring).
UPSTREAM_VERIFIED_GPUS = {
    name: gpu_type_id(name)
    for name in ("6000Ada", "A100", "A100S", "H100N", "H100S", "H200", "RTX3090", "A40", "A4500")
}
UPSTREAM_COST_TABLE = {"L40": 0.99, "A100": 1.39, "A100S": 1.49, "H100S": 2.69, "H100N": 3.07, "H200": 3.59}
UPSTREAM_UNLISTED_COST = 999.0
UPSTREAM_MARGIN_GB = 5

# Unsloth's published minimum fine-tuning memory (unsloth.ai/docs, "Unsloth Requirements", as stored by the
# search tool): model size → (QLoRA 4-bit GB, LoRA 16-bit GB); "sometimes more VRAM is required".
UNSLOTH_MINIMUM_GB = {
    "3B": (3.5, 8),
    "7B": (5, 19),
    "8B": (6, 22),
    "9B": (6.5, 24),
    "11B": (7.5, 29),
    "14B": (8.5, 33),
    "27B": (22, 64),
    "32B": (26, 76),
    "40B": (30, 96),
    "70B": (41, 164),
}


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


def estimator_error() -> list[tuple[str, str, float, int]]:
    """(size, method, published GB, our estimate GiB) for each of Unsloth's published points."""
    from ow_prefect.jobs.vram import estimate_vram_gb

    rows = []
    for size, (qlora, lora) in UNSLOTH_MINIMUM_GB.items():
        for method, published, four_bit in (("QLoRA", qlora, True), ("LoRA", lora, False)):
            estimate = estimate_vram_gb(f"x/Model-{size}", load_in_4bit=four_bit, max_seq_length=2048, batch_size=2)
            rows.append((size, method, published, estimate))
    return rows


def snapshot_catalog(fake) -> None:
    """The snapshot as the fake's SECURE catalog: those types in stock at their snapshot price, nothing else."""
    for gpu_id, (price, _) in PRICE_SNAPSHOT.items():
        fake.set_stock(gpu_id, 64, "SECURE", price_per_hour=price)


async def ours(runpod, job: Job, margin: float) -> tuple[str, float]:
    from ow_prefect.runpod.offers import find_candidates, with_margin

    for count in (1, 2, 4, 8):
        candidates = await find_candidates(
            runpod, min_vram_gb=with_margin(job.vram_gb, margin), gpu_count=count, clouds=("SECURE",)
        )
        if candidates:
            best = candidates[0]
            return f"{best.count}x {best.gpu_id.removeprefix('NVIDIA ')}", best.price_per_hour
    raise ValueError(f"no GPU configuration fits {job}")


def upstream_candidates(catalog) -> list[tuple[int, float, str, str]]:
    """OpenWeights' candidate list, in its order: (usable GB, its sort cost, short name, GPU id), 1x only."""
    memory = {gpu.id: gpu.memory for gpu in catalog}
    offered = [(short, gpu_id) for short, gpu_id in UPSTREAM_VERIFIED_GPUS.items() if gpu_id in memory]
    rows = [
        (memory[gpu_id] - UPSTREAM_MARGIN_GB, UPSTREAM_COST_TABLE.get(short, UPSTREAM_UNLISTED_COST), short, gpu_id)
        for short, gpu_id in offered
    ]
    return sorted(rows)


def upstream(candidates, job: Job) -> tuple[str, float] | None:
    for usable, _, short, gpu_id in candidates:
        if job.vram_gb <= usable:
            return f"1x {short}", PRICE_SNAPSHOT[gpu_id][0]
    return None


async def measure(margin: float):
    from ow_prefect.runpod.client import AsyncRunPodClient
    from ow_prefect.testing.fake_runpod import FakeRunPod

    with FakeRunPod(api_key="bench-key", default_stock=False) as fake:
        snapshot_catalog(fake)
        async with AsyncRunPodClient("bench-key", base_url=fake.url) as runpod:
            candidates = upstream_candidates(await runpod.gpu_types(cloud="SECURE"))
            picks = []
            for job in jobs():
                picks.append(
                    (job, await ours(runpod, job, margin), await ours(runpod, job, 0), upstream(candidates, job))
                )
    return picks


def main() -> None:
    from ow_prefect.runpod.offers import DEFAULT_VRAM_MARGIN

    print("Estimators vs Unsloth's published minimum fine-tuning memory (batch 2 × 2048 tokens for ours):")
    worst = 0.0
    for size, method, published, estimate in estimator_error():
        short = 1 - estimate / published
        worst = max(worst, short)
        print(f"  {size:>4} {method:5}  published {published:5.1f} GB  estimate {estimate:4d} GiB  {-short:+.0%}")
    print(f"worst shortfall {worst:.0%} → default vram_margin {DEFAULT_VRAM_MARGIN:.0%}\n")

    picks = asyncio.run(measure(DEFAULT_VRAM_MARGIN))
    width = max(len(job.name) for job, *_ in picks)
    margin_label = f"ours (+{DEFAULT_VRAM_MARGIN:.0%})"
    print(f"Prices: snapshot of {SNAPSHOT_DATE} (sources in bench/gpu_cost.py), SECURE cloud, USD per pod-hour")
    print(f"{'job':{width}}  {'VRAM':>6}  {margin_label:28} {'$/h':>6}  {'ours (no margin)':28} {'$/h':>6}  "
          f"{'OpenWeights':12} {'$/h':>6}")  # fmt: skip
    total_ours = total_tight = total_ow = 0.0
    skipped = []
    for job, (label, price), (tight_label, tight_price), theirs in picks:
        ow_label, ow_price = theirs or ("no fit", None)
        print(
            f"{job.name:{width}}  {job.vram_gb:>3} GB  {label:28} {price:6.2f}  {tight_label:28} {tight_price:6.2f}  "
            f"{ow_label:12} {'—' if ow_price is None else f'{ow_price:.2f}':>6}"
        )
        if theirs is None:
            skipped.append(job.name)
            continue
        total_ours, total_tight, total_ow = total_ours + price, total_tight + tight_price, total_ow + ow_price
    counted = len(picks) - len(skipped)
    print(f"\nleft out (no single verified GPU fits on OpenWeights): {', '.join(skipped) or 'none'}")
    print(
        f"total $/h for {counted} jobs: ours {total_ours:.2f} with the margin ({total_tight:.2f} without), "
        f"OpenWeights {total_ow:.2f} → {total_ours / total_ow:.3f}× (goal ≤ 1)"
    )
    emit(
        "gpu_cost",
        [
            row(
                f"$/h of {counted} jobs, +{DEFAULT_VRAM_MARGIN:.0%} margin",
                round(total_ours, 2),
                round(total_ow, 2),
                "$/h",
                "ratio ≤ 1.0",
                total_ours <= total_ow,
            ),
            row(f"$/h of {counted} jobs, no margin", round(total_tight, 2), round(total_ow, 2), "$/h"),
        ],
    )


if __name__ == "__main__":
    main()
