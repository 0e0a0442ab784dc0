"""Where a run's next pod goes, given what failed: the candidates the run may try now, the request for each (what
its health check expects, the data centers left), and the run's attempts.

A pod that fails its GPU health check (ow_prefect/runpod/health.py), or dies before its flow starts without having
passed it (the pod in ERROR, a container that exits or never comes up), costs one attempt: the worker deletes it,
puts its (GPU type, data center, image) on the shared cooldown (ow_prefect/workers/cooldown.py) and creates the
next pod on the next candidate — another type, or the same type in a data center that has not failed — up to
`max_pod_attempts` pods for the run; then the run crashes naming every attempt (`history`). A pod whose check
passed and whose command then died is not the GPU's fault: the run crashes as it did, no retry, no cooldown.

`gpu_types: verified` keeps the candidates to the types in ow_prefect/runpod/verified_gpus.json (each with the
date and how it was verified); any other value of `gpu_types` is a list of RunPod type ids, as before.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ow_prefect.runpod.health import Expectation
from ow_prefect.workers.cooldown import ANY_DATA_CENTER, Cooldown, CooldownStore

if TYPE_CHECKING:
    from ow_prefect.runpod.client import AsyncRunPodClient
    from ow_prefect.runpod.models import Pod
    from ow_prefect.runpod.offers import Candidate

VERIFIED = "verified"
VERIFIED_FILE = Path(__file__).parents[1] / "runpod" / "verified_gpus.json"
DEFAULT_MAX_POD_ATTEMPTS = 3
MIN_FREE_DISK_GB = 10.0  # the free container disk a pod must have (or half its disk, when that is less)
HEALTH_LOG_LINES = 300  # how far back in a pod's log the worker looks for its health report


@cache
def verified_gpu_types() -> dict[str, dict[str, str]]:
    """GPU type id -> {gpu_type, date, how}: the types `gpu_types: verified` allows."""
    return {entry["gpu_type"]: entry for entry in json.loads(VERIFIED_FILE.read_text())["types"]}


@dataclass
class Attempt:
    """A pod of this run that was given up before its flow started."""

    number: int
    pod: str
    gpu: str  # "1x NVIDIA RTX A6000"
    gpu_type: str
    cloud: str
    data_center: str
    reason: str

    def __str__(self) -> str:
        where = self.data_center or "an unknown data center"
        return f"{self.number}) pod {self.pod}: {self.gpu} in {where} ({self.cloud}): {self.reason}"


class Placement:
    """One run's pods so far, and what its next pod must avoid."""

    def __init__(
        self,
        image: str,
        *,
        store: CooldownStore | None,
        min_cuda: str | None = None,
        container_disk_gb: float = 50,
        verified_only: bool = False,
        log: Callable[[str], Any] = print,
    ) -> None:
        self.image = image
        self.store = store
        self.min_cuda = min_cuda
        self.min_free_disk_gb = min(MIN_FREE_DISK_GB, container_disk_gb / 2)
        self.verified_only = verified_only
        self.log = log
        self.attempts: list[Attempt] = []
        self.skipped: dict[str, int] = {}  # candidates left out, by why: "verified", "cooldown" (as Ranking.removed)
        self._data_centers: dict[tuple[str, str], list[str]] = {}

    async def candidates(
        self, runpod: AsyncRunPodClient, ranked: Sequence[Candidate], data_center_ids: Sequence[str] = ()
    ) -> list[Candidate]:
        """`ranked`, less the types that are not verified (when asked) and the types or data centers that cool down
        or failed in this run: a type keeps the data centers it is offered in that did neither."""
        blocked = await self._blocked()
        kept: list[Candidate] = []
        self.skipped = {}
        self._data_centers = {}
        for candidate in ranked:
            if self.verified_only and candidate.gpu_id not in verified_gpu_types():
                self.skipped["verified"] = self.skipped.get("verified", 0) + 1
                continue
            avoid = blocked.get(candidate.gpu_id, {})
            if not avoid:
                kept.append(candidate)
                continue
            offered = list(data_center_ids) or await _offered_data_centers(runpod, candidate)
            left = [dc for dc in offered or () if dc not in avoid and ANY_DATA_CENTER not in avoid]
            if left:
                self._data_centers[(candidate.gpu_id, candidate.cloud)] = left
                kept.append(candidate)
                continue
            self.skipped["cooldown"] = self.skipped.get("cooldown", 0) + 1
            reasons = "; ".join(f"{dc}: {why}" for dc, why in sorted(avoid.items()))
            self.log(f"Skipping {candidate}: {reasons}")
        return kept

    def request_for(self, request: dict[str, Any], candidate: Candidate) -> dict[str, Any]:
        """The create body for `candidate`: what its health check expects, and the data centers left to it."""
        expect = Expectation(
            gpu_type=candidate.gpu_id,
            gpu_count=candidate.count,
            memory_gb=candidate.memory_gb,
            min_cuda=candidate.min_cuda_version or self.min_cuda,  # the floor RunPod was asked for, per GPU
            min_free_disk_gb=self.min_free_disk_gb,
        )
        body = {**request, "env": {**request.get("env", {}), **expect.to_env()}}
        if data_centers := self._data_centers.get((candidate.gpu_id, candidate.cloud)):
            body["dataCenterIds"] = data_centers
        return body

    async def failed(self, pod: Pod, gpu: str, cloud: str, reason: str, created_at: float) -> Attempt:
        """Count a pod that failed before its flow started, and cool its (type, data center, image) down."""
        gpu_type = pod.gpu.id if pod.gpu else gpu.split("x ", 1)[-1]
        attempt = Attempt(len(self.attempts) + 1, pod.id, gpu, gpu_type, cloud, pod.data_center_id or "", reason)
        self.attempts.append(attempt)
        if self.store is not None:
            try:
                state = await self.store.record_failure(
                    gpu_type, pod.data_center_id, self.image, reason=reason, pod=pod.id, pod_created_at=created_at
                )
                self.log(f"Cooldown: {state.describe(self.store.clock(), self.store.ladder)}")
            except Exception as exc:  # the Prefect API is busy: this run still avoids it (self.attempts)
                self.log(f"Could not record the cooldown of {gpu_type} ({exc}); this run avoids it anyway")
        return attempt

    async def started(self, pod: Pod, created_at: float) -> None:
        """A pod whose flow started: its (type, data center, image) works; clear its cooldown."""
        if self.store is None or pod.gpu is None:
            return
        try:
            if await self.store.record_success(pod.gpu.id, pod.data_center_id, self.image, created_at):
                self.log(f"Cooldown of {pod.gpu.id} in {pod.data_center_id} cleared: pod {pod.id} works")
        except Exception as exc:
            self.log(f"Could not clear the cooldown of {pod.gpu.id} ({exc})")

    def failures(self) -> str:
        """What a run that gives up says: every pod that failed before its flow started, and why."""
        listed = "; ".join(str(attempt) for attempt in self.attempts)
        return f"{len(self.attempts)} pod(s) failed before the flow started: {listed}."

    async def _blocked(self) -> dict[str, dict[str, str]]:
        """GPU type -> {data center: why}, from the shared cooldown and this run's own failures."""
        cooling: list[Cooldown] = []
        if self.store is not None:
            try:
                cooling = await self.store.active(self.image)
            except Exception as exc:
                self.log(f"Could not read the GPU cooldowns ({exc}); only this run's failures are avoided")
        blocked: dict[str, dict[str, str]] = {}
        now = self.store.clock() if self.store else 0.0
        for entry in cooling:
            blocked.setdefault(entry.gpu_type, {})[entry.data_center] = entry.state(now)
        for attempt in self.attempts:
            where = attempt.data_center or ANY_DATA_CENTER
            blocked.setdefault(attempt.gpu_type, {})[where] = f"failed in this run (pod {attempt.pod})"
        return blocked


async def _offered_data_centers(runpod: AsyncRunPodClient, candidate: Candidate) -> list[str] | None:
    """Where RunPod's catalog (cached by the client) offers the candidate now; None when it does not say."""
    for gpu in await runpod.gpu_types(count=candidate.count, cloud=candidate.cloud):
        if gpu.id == candidate.gpu_id and gpu.data_centers is not None:
            return [dc.id for dc in gpu.data_centers if dc.availability != "NONE"]
    return None


def gpu_lines(cooldowns: Sequence[Cooldown], now: float) -> list[str]:
    """`ow gpus`: one tab-separated line per GPU type (verified ones, and any with a cooldown) and per cooled-down
    (data center, image): the type, `verified <date>` or `-`, and its state."""
    verified = verified_gpu_types()
    by_type: dict[str, list[Cooldown]] = {}
    for entry in cooldowns:
        by_type.setdefault(entry.gpu_type, []).append(entry)
    lines = []
    for gpu_type in sorted(set(verified) | set(by_type)):
        mark = f"verified {verified[gpu_type]['date']}" if gpu_type in verified else "-"
        for entry in by_type.get(gpu_type) or [None]:
            if entry is None:
                state = "ok"
            else:
                where = "any data center" if entry.data_center == ANY_DATA_CENTER else entry.data_center
                state = f"{where}, {entry.image}: {entry.state(now)} ({entry.failures} failure(s))"
            lines.append(f"{gpu_type}\t{mark}\t{state}")
    return lines
