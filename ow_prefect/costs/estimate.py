"""A run's cost before it runs: the GPU the RunPod worker would choose now, its price, the expected runtime (a job's
tokens over the throughput table's tokens/s for that GPU and model size, plus boot, download and load) and the cost
range. The SDK (`ow.<job>.estimate`), `ow exec --dry-run` and the worker (its `max_cost` check and the run's
`runpod-estimate-<flow run id>` artifact) all make it here, from the same configuration the worker resolves.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from ow_prefect.costs.throughput import TABLE_FILE, Rates, rates, table
from ow_prefect.costs.work import Work

LOW, EXPECTED, HIGH = 0, 1, 2


@dataclass
class Estimate:
    """What a run would cost now. `seconds` and `cost_usd` are (low, expected, high); the expected value is None
    when the runtime cannot be computed (`work.open_ended`, or a GPU type the throughput table lacks): the high end
    is then `max_runtime`. `gpu` is None when nothing is rented (a process pool) or no GPU fits."""

    job_type: str
    work: Work
    pool: str | None = None
    pool_type: str | None = None
    deployment: str | None = None
    job_id: str | None = None
    gpu: str | None = None  # "1x NVIDIA RTX A6000 (48 GB) in SECURE at $0.49/h"
    gpu_id: str | None = None
    gpu_count: int = 1
    cloud: str | None = None
    price_per_hour: float | None = None
    seconds: tuple[float, float | None, float] = (0.0, 0.0, 0.0)
    cost_usd: tuple[float, float | None, float] | None = (0.0, 0.0, 0.0)
    phases: dict[str, float] = field(default_factory=dict)  # expected seconds per phase
    rates: dict[str, float] = field(default_factory=dict)  # tokens/s used
    max_cost: float | None = None
    max_runtime: int | None = None
    cached_model: bool = False
    alternatives: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def expected_cost(self) -> float | None:
        return self.cost_usd[EXPECTED] if self.cost_usd else None

    @property
    def over_cap(self) -> bool:
        """The expected cost is above `max_cost` (what makes the worker refuse the run)."""
        expected = self.expected_cost
        return self.max_cost is not None and expected is not None and expected > self.max_cost

    def cost_text(self) -> str:
        if self.cost_usd is None:
            return "unknown"
        low, expected, high = self.cost_usd
        if expected is None:
            return f"${self.price_per_hour:.2f}/h; at most ${high:,.2f} (max_runtime)" if self.price_per_hour else "-"
        return f"~${expected:,.2f} (${low:,.2f} – ${high:,.2f})"

    def runtime_text(self) -> str:
        low, expected, high = self.seconds
        if expected is None:
            ready = sum(self.phases.get(name, 0.0) for name in ("boot", "download", "load"))
            return f"unknown: {self.work.open_ended or 'see the notes'}; ready after ~{_duration(ready)}"
        phases = ", ".join(f"{name} {_duration(seconds)}" for name, seconds in self.phases.items() if seconds >= 1)
        return f"~{_duration(expected)} ({_duration(low)} – {_duration(high)}): {phases}"

    def cap_text(self) -> str | None:
        if self.max_cost is None:
            return None
        if self.expected_cost is None:
            return f"${self.max_cost:g}: the pod is stopped when price × time reaches it"
        verdict = "refused: the expected cost is above it" if self.over_cap else "within"
        return f"${self.max_cost:g} ({verdict})"

    def lines(self) -> list[tuple[str, str]]:
        """(label, text) pairs: the estimate as `ow exec --dry-run` and the SDK's `str()` show it."""
        rows = [("job", f"{self.job_type}" + (f" {self.job_id}" if self.job_id else ""))]
        if self.pool_type == "embedded":
            rows.append(("runs on", f"{self.deployment}'s flow, in this process (embedded mode: no Prefect API)"))
        elif self.deployment:
            rows.append(("runs on", f"{self.deployment}, pool {self.pool} ({self.pool_type})"))
        if self.pool_type != "runpod":
            rows.append(("cost", "nothing is rented: it runs on the machine of the pool's worker, or this one"))
            return rows + [("note", note) for note in [*self.work.notes, *self.notes]]
        rows.append(("gpu", self.gpu or "none fits and is in stock now"))
        rows.append(("work", self.work.describe()))
        if self.gpu:
            rows.append(("runtime", self.runtime_text()))
            rows.append(("cost", self.cost_text()))
        if cap := self.cap_text():
            rows.append(("max_cost", cap))
        rows += [("or", alternative) for alternative in self.alternatives]
        rows += [("note", note) for note in [*self.work.notes, *self.notes]]
        return rows

    def __str__(self) -> str:
        return "\n".join(f"{label:<9} {text}" for label, text in self.lines())

    def markdown(self) -> str:
        """The run's estimate artifact."""
        table_rows = "\n".join(f"| {label} | {text} |" for label, text in self.lines())
        return (
            f"**Estimated cost: {self.cost_text()}**\n\n| | |\n|---|---|\n{table_rows}\n\n"
            f"Throughput per GPU type and model size: `{TABLE_FILE.name}` in ow_prefect/costs (its sources are in "
            "it); every figure is an estimate, the `runpod-cost-…` artifact says what the run cost."
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "job_type": self.job_type,
            "job_id": self.job_id,
            "deployment": self.deployment,
            "pool": self.pool,
            "pool_type": self.pool_type,
            "gpu": self.gpu,
            "gpu_id": self.gpu_id,
            "gpu_count": self.gpu_count,
            "cloud": self.cloud,
            "price_per_hour": self.price_per_hour,
            "seconds": list(self.seconds),
            "cost_usd": list(self.cost_usd) if self.cost_usd else None,
            "phases": self.phases,
            "tokens_per_second": self.rates,
            "work": self.work.describe(),
            "max_cost": self.max_cost,
            "over_cap": self.over_cap,
            "notes": [*self.work.notes, *self.notes],
        }


def estimate_on(
    work: Work,
    candidate: Any,
    *,
    job_type: str,
    max_runtime: int,
    max_cost: float | None = None,
    cached_model: bool = False,
    **fields: Any,
) -> Estimate:
    """The estimate of `work` on an offer (`ow_prefect.runpod.offers.Candidate`, or None when none fits)."""
    fields.setdefault("pool_type", "runpod")
    found = Estimate(job_type, work, max_cost=max_cost, max_runtime=max_runtime, **fields)
    if candidate is None:
        found.cost_usd = None
        return found
    found.gpu, found.gpu_id, found.gpu_count = str(candidate), candidate.gpu_id, candidate.count
    found.cloud, found.price_per_hour, found.cached_model = candidate.cloud, candidate.price_per_hour, cached_model
    found.seconds, found.phases, found.rates = _seconds(work, candidate, max_runtime, cached_model, found.notes)
    price = candidate.price_per_hour / 3600
    low, expected, high = found.seconds
    found.cost_usd = (low * price, None if expected is None else expected * price, high * price)
    return found


def estimate_candidates(work: Work, candidates: Sequence[Any], *, alternatives: int = 2, **options: Any) -> Estimate:
    """The estimate on the first candidate (the worker's choice), naming up to `alternatives` other GPU types whose
    expected cost is lower or whose runtime is shorter."""
    first = estimate_on(work, candidates[0] if candidates else None, **options)
    if first.expected_cost is None or len(candidates) < 2:
        return first
    others = []
    seen = {candidates[0].gpu_id}
    for candidate in candidates[1:]:
        if candidate.gpu_id in seen:
            continue
        seen.add(candidate.gpu_id)
        other = estimate_on(work, candidate, **options)
        if other.expected_cost is not None:
            others.append(other)
    cheaper = [o for o in others if o.expected_cost < first.expected_cost]
    faster = [o for o in others if o.seconds[EXPECTED] < first.seconds[EXPECTED] and o not in cheaper]
    picks = sorted(cheaper, key=lambda o: o.expected_cost) + sorted(faster, key=lambda o: o.seconds[EXPECTED])
    first.alternatives = [
        f"{o.gpu}: {o.cost_text()}, ~{_duration(o.seconds[EXPECTED])} (gpu_types: ['{o.gpu_id}'])"
        for o in picks[:alternatives]
    ]
    return first


def local_estimate(work: Work, *, job_type: str, **fields: Any) -> Estimate:
    """A run on a pool that rents nothing (a process pool, or embedded mode)."""
    return Estimate(job_type, work, cost_usd=(0.0, 0.0, 0.0), **fields)


def _seconds(
    work: Work, candidate: Any, max_runtime: int, cached_model: bool, notes: list[str]
) -> tuple[tuple[float, float | None, float], dict[str, float], dict[str, float]]:
    """(low, expected, high) seconds, each capped at max_runtime; the expected phases; the tokens/s used."""
    t = table()
    boot = t.boot_seconds
    megabytes = work.download_bytes / 1e6
    slow_mb, expected_mb, fast_mb = t.download_mb_per_s
    download = (
        0.0 if cached_model else megabytes / fast_mb,
        megabytes / expected_mb / (2 if cached_model else 1),
        megabytes / slow_mb,
    )
    load = megabytes / t.load_mb_per_s
    start = (boot[0] + download[0] + load, boot[1] + download[1] + load, boot[2] + download[2] + load)
    phases = {"boot": boot[1], "download": download[1], "load": load}
    if cached_model:
        notes.append("model cache volume: the download is skipped when an earlier pod in this data center made it")
    if work.open_ended:
        return (min(start[0], max_runtime), None, float(max_runtime)), phases, {}
    found = _rates(work, candidate)
    compute, used = (0.0, 0.0, 0.0), {}
    if work.has_tokens and found is None:
        missing = f"no throughput figures for {candidate.gpu_id} in {TABLE_FILE.name}"
        notes.append(f"{missing if work.params else 'the model size is unknown'}: runtime unknown")
        return (min(start[0], max_runtime), None, float(max_runtime)), phases, {}
    if found is not None and work.has_tokens:
        compute = tuple(
            work.train_tokens * work.train_flops_factor / (found.train * speed)
            + work.prefill_tokens / (found.prefill * speed)
            + work.decode_tokens[bound] / (found.decode * speed)
            for bound, speed in ((LOW, t.fast), (EXPECTED, 1.0), (HIGH, t.slow))
        )
        used = {
            name: round(rate)
            for name, rate, tokens in (
                ("train", found.train / work.train_flops_factor, work.train_tokens),
                ("prefill", found.prefill, work.prefill_tokens),
                ("decode", found.decode, work.decode_tokens[EXPECTED]),
            )
            if tokens
        }
        phases["work"] = compute[EXPECTED]
    phases["finish"] = work.extra_seconds
    total = tuple(min(float(max_runtime), s + c + work.extra_seconds) for s, c in zip(start, compute, strict=True))
    if total[HIGH] >= max_runtime:
        notes.append(f"max_runtime ({max_runtime} s) stops the run before the slow end of this range")
    return total, phases, used


def _rates(work: Work, candidate: Any) -> Rates | None:
    if not work.params:
        return None
    return rates(
        candidate.gpu_id,
        work.params,
        gpu_count=candidate.count,
        weight_bytes=work.weight_bytes,
        text_config=work.text_config,
        sequence_tokens=work.sequence_tokens,
    )


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"
