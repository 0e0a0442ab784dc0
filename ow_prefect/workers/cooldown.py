"""The cooldown ladder: a (GPU type, data center, image) whose pod failed before its flow started is skipped for
a while, longer each time it fails again, by every worker — until a pod on it works.

A failure puts the key on the first step of `LADDER_SECONDS` (10 min, 1 h, 6 h, 24 h); a failure of a pod
rented after that cooldown began (so after it ran out: workers skip keys while they cool down) climbs one step,
up to the last, which repeats; a pod rented after the cooldown began that starts its flow clears the key. A key
that has not failed for `FORGET_AFTER_SECONDS` starts from the first step again.

The state lives in Prefect, one Variable per key (`ow-gpu-cooldown-<hash>`, tagged `ow-gpu-cooldown`), so every
worker of every pool on the workspace shares it and `ow gpus` shows and clears it. Workers update it without a
lock, and need none: a failure only climbs for a pod rented after the current cooldown began, so two workers
whose pods failed in the same incident (both rented before either failure was recorded) write the same step in
either order, and keys never share a Variable, so no update can wipe out another key's.

`CooldownStore(client, clock=...)` takes an async Prefect client and a clock (epoch seconds), for tests.
"""

from __future__ import annotations

import contextlib
import hashlib
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from datetime import UTC, datetime
from typing import Any

TAG = "ow-gpu-cooldown"
NAME_PREFIX = "ow-gpu-cooldown-"
LADDER_SECONDS = (600, 3600, 6 * 3600, 24 * 3600)
FORGET_AFTER_SECONDS = 7 * 86400
MAX_REASON = 300
ANY_DATA_CENTER = "*"  # a pod whose data center RunPod did not say: the whole type is skipped


@dataclass(frozen=True)
class Cooldown:
    """One key's state: on step `level` of the ladder since `since`, skipped until `until` (epoch seconds)."""

    gpu_type: str
    data_center: str
    image: str
    level: int
    since: float
    until: float
    failures: int
    reason: str
    pod: str = ""

    @property
    def key(self) -> tuple[str, str, str]:
        return (self.gpu_type, self.data_center, self.image)

    def active(self, now: float) -> bool:
        return now < self.until

    def step(self, ladder: Sequence[int] = LADDER_SECONDS) -> str:
        return f"{self.level + 1}/{len(ladder)} ({_duration(ladder[min(self.level, len(ladder) - 1)])})"

    def describe(self, now: float, ladder: Sequence[int] = LADDER_SECONDS) -> str:
        """'... in US-TX-3 for <image>: cooling down until ... (52 min more, step 2/4 (1 h)); ...', for `ow gpus`."""
        where = "any data center" if self.data_center == ANY_DATA_CENTER else self.data_center
        return f"{self.gpu_type} in {where} for {self.image}: {self.state(now, ladder)}; {self.failures} failure(s)"

    def state(self, now: float, ladder: Sequence[int] = LADDER_SECONDS) -> str:
        if self.active(now):
            left = _duration(self.until - now)
            return f"cooling down until {_clock(self.until)} ({left} more, step {self.step(ladder)}): {self.reason}"
        following = _duration(ladder[min(self.level + 1, len(ladder) - 1)])
        return f"cooldown over since {_clock(self.until)} (a new failure: {following}): {self.reason}"


def variable_name(gpu_type: str, data_center: str, image: str) -> str:
    digest = hashlib.sha256("\0".join((gpu_type, data_center, image)).encode()).hexdigest()[:20]
    return NAME_PREFIX + digest


def escalate(
    previous: Cooldown | None,
    key: tuple[str, str, str],
    *,
    reason: str,
    pod: str,
    pod_created_at: float,
    now: float,
    ladder: Sequence[int] = LADDER_SECONDS,
) -> Cooldown:
    """The state after a pod on `key` failed: the first step, the next one, or (a pod rented before the current
    cooldown began: the same incident) the current one with the failure counted."""
    if previous is not None and now - previous.until > FORGET_AFTER_SECONDS:
        previous = None
    if previous is not None and pod_created_at < previous.since:
        return replace(previous, failures=previous.failures + 1)
    level = min(previous.level + 1, len(ladder) - 1) if previous else 0
    return Cooldown(
        *key,
        level=level,
        since=now,
        until=now + ladder[level],
        failures=(previous.failures if previous else 0) + 1,
        reason=reason[:MAX_REASON],
        pod=pod,
    )


class CooldownStore:
    """The ladder's state in Prefect Variables, shared by every worker."""

    def __init__(
        self, client: Any, *, clock: Callable[[], float] = time.time, ladder: Sequence[int] = LADDER_SECONDS
    ) -> None:
        self.client = client
        self.clock = clock
        self.ladder = tuple(ladder)

    async def entries(self) -> list[Cooldown]:
        """Every key with a state (cooling down or not), by GPU type, data center and image."""
        response = await self.client.request(
            "POST", "/variables/filter", json={"variables": {"tags": {"all_": [TAG]}}, "limit": 200}
        )
        found = [_cooldown(variable.get("value")) for variable in response.json()]
        return sorted((entry for entry in found if entry is not None), key=lambda entry: entry.key)

    async def active(self, image: str) -> list[Cooldown]:
        """The keys of `image` that workers skip now."""
        now = self.clock()
        return [entry for entry in await self.entries() if entry.image == image and entry.active(now)]

    async def record_failure(
        self, gpu_type: str, data_center: str | None, image: str, *, reason: str, pod: str, pod_created_at: float
    ) -> Cooldown:
        key = (gpu_type, data_center or ANY_DATA_CENTER, image)
        previous = await self._read(key)
        state = escalate(
            previous, key, reason=reason, pod=pod, pod_created_at=pod_created_at, now=self.clock(), ladder=self.ladder
        )
        if state != previous:
            await self._write(state)
        return state

    async def record_success(self, gpu_type: str, data_center: str | None, image: str, pod_created_at: float) -> bool:
        """Clear the key when this pod was rented after its cooldown began; True when it was cleared."""
        key = (gpu_type, data_center or ANY_DATA_CENTER, image)
        previous = await self._read(key)
        if previous is None or pod_created_at < previous.since:
            return False
        await self._delete(variable_name(*key))
        return True

    async def clear(self, gpu_type: str | None = None) -> list[Cooldown]:
        """Forget every key (of `gpu_type`, when given); the ones cleared."""
        cleared = [entry for entry in await self.entries() if gpu_type in (None, entry.gpu_type)]
        for entry in cleared:
            await self._delete(variable_name(*entry.key))
        return cleared

    async def _read(self, key: tuple[str, str, str]) -> Cooldown | None:
        variable = await self.client.read_variable_by_name(variable_name(*key))
        return _cooldown(variable.value) if variable is not None else None

    async def _write(self, state: Cooldown) -> None:
        """Update the key's Variable, or create it; a concurrent create or delete is met by the other call."""
        from prefect.client.schemas.actions import VariableCreate, VariableUpdate
        from prefect.exceptions import ObjectAlreadyExists

        name, value = variable_name(*state.key), asdict(state)
        for _ in range(3):
            if await self.client.read_variable_by_name(name) is not None:
                try:
                    await self.client.update_variable(VariableUpdate(name=name, value=value, tags=[TAG]))
                    return
                except Exception as exc:
                    if _status(exc) != 404:
                        raise
            try:
                await self.client.create_variable(VariableCreate(name=name, value=value, tags=[TAG]))
                return
            except ObjectAlreadyExists:
                continue
        raise RuntimeError(f"could not write the cooldown of {state.key}: it kept changing under us")

    async def _delete(self, name: str) -> None:
        from prefect.exceptions import ObjectNotFound

        with contextlib.suppress(ObjectNotFound):  # cleared by someone else meanwhile
            await self.client.delete_variable_by_name(name)


def _cooldown(value: Any) -> Cooldown | None:
    """A Variable's value as a Cooldown; None for anything else (a Variable is editable by hand in the UI)."""
    if not isinstance(value, dict):
        return None
    types = {"level": int, "since": (int, float), "until": (int, float), "failures": int}
    fields = {name: value.get(name) for name in Cooldown.__dataclass_fields__}
    fields["pod"] = fields["pod"] or ""
    for name, field_value in fields.items():
        if not isinstance(field_value, types.get(name, str)) or isinstance(field_value, bool):
            return None
    return Cooldown(**fields)


def _status(exc: Exception) -> int | None:
    response = getattr(exc, "response", None)
    return getattr(response, "status_code", None)


def _duration(seconds: float) -> str:
    seconds = max(0, round(seconds))
    if seconds < 3600:
        return f"{max(1, round(seconds / 60))} min"
    return f"{seconds / 3600:.0f} h" if seconds % 3600 == 0 or seconds >= 36000 else f"{seconds / 3600:.1f} h"


def _clock(epoch: float) -> str:
    return datetime.fromtimestamp(epoch, UTC).strftime("%Y-%m-%d %H:%M UTC")
