"""The RunPod worker's cost checks around one run, before any pod exists: the pool's daily budget, the run's estimate
(published as the `runpod-estimate-<flow run id>` artifact) and its `max_cost`, once before the run's first pod; the
budget again before each further pod of the run (a retry elsewhere, ow_prefect/workers/placement.py). What the
worker does with a refusal stays in the worker (ow_prefect/workers/runpod.py); how it stops a running pod is in
ow_prefect/workers/costs.py and ow_prefect/workers/stopping.py."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import anyio
from prefect.states import Failed

from ow_prefect.costs.budget import daily_budget, refusal, spent_today
from ow_prefect.costs.estimate import Estimate, estimate_on
from ow_prefect.costs.plan import estimate_flow_run
from ow_prefect.runpod.errors import RunPodAuthError

ESTIMATE_ARTIFACT = "runpod-estimate-{flow_run_id}"
LivePods = Callable[[], Awaitable[list[tuple[float, float]]]]


class RunCosts:
    """Cost checks of one flow run: `refusal()` before the create, `publish()` once the pod exists."""

    def __init__(self, client: Any, work_pool: Any, flow_run: Any, configuration: Any, logger: Any):
        self.client = client
        self.work_pool = work_pool
        self.flow_run = flow_run
        self.configuration = configuration
        self.logger = logger
        self.estimate: Estimate | None = None

    async def refusal(self, runpod: Any, timeout: float, live_pods: LivePods) -> Any:
        """Before the run's first pod: the Failed state to end the run with instead of creating one, or None: the
        pool's daily budget is spent, or the run's expected cost is above its max_cost. The estimate is made (and
        published when the run is refused) either way; an estimate that fails is logged and refuses nothing."""
        if (spent := await self.budget_refusal(live_pods)) is not None:
            return spent
        try:
            with anyio.fail_after(timeout):
                pool = self.work_pool.name if self.work_pool is not None else None
                self.estimate = await estimate_flow_run(self.client, self.flow_run, self.configuration, runpod, pool)
        except RunPodAuthError:  # the create would be refused the same way: the run ends on it, without asking again
            raise
        except Exception as exc:  # noqa: BLE001 - an estimate must never stop a run by failing
            self.logger.warning(f"No cost estimate for this run ({type(exc).__name__}: {exc})")
            return None
        self.logger.info("Estimate:\n" + str(self.estimate))
        if not self.estimate.over_cap:
            return None
        await self._write(self.estimate)
        message = (
            f"Estimated cost {self.estimate.cost_text()} on {self.estimate.gpu} is above max_cost "
            f"${self.configuration.max_cost:g}; no pod was created. Raise max_cost, or make the job smaller "
            f"(the estimate: artifact {ESTIMATE_ARTIFACT.format(flow_run_id=self.flow_run.id)})."
        )
        return Failed(name="CostCapped", message=message)

    async def budget_refusal(self, live_pods: LivePods) -> Any:
        """Before each pod: BudgetReached when the pool's daily budget is spent (or cannot be read), else None.
        `live_pods()`: (price per hour, creation time) of the pool's pods that run now."""
        budget = daily_budget(self.work_pool) if self.work_pool is not None else None
        if budget is None:
            return None
        try:
            spend = await spent_today(self.client, self.work_pool.id, await live_pods())
        except Exception as exc:  # noqa: BLE001 - a budget that cannot be checked holds: no pod
            message = (
                f"Work pool {self.work_pool.name!r} has a daily budget, and what it spent today could not be read "
                f"({type(exc).__name__}: {exc}); no pod was created. Retry the run."
            )
            return Failed(name="BudgetReached", message=message)
        if spend.total >= budget:
            return Failed(name="BudgetReached", message=refusal(budget, spend, self.work_pool.name))
        return None

    async def publish(self, candidate: Any, cached_model: bool) -> None:
        """The estimate on the offer the pod was created on (it may not be the first), as the run's artifact."""
        if self.estimate is None:
            return
        found = self.estimate
        if candidate.gpu_id != found.gpu_id or candidate.cloud != found.cloud:
            fields = {"job_id": found.job_id, "deployment": found.deployment, "pool": found.pool}
            found = estimate_on(
                found.work,
                candidate,
                job_type=found.job_type,
                max_runtime=self.configuration.max_runtime,
                max_cost=self.configuration.max_cost,
                cached_model=cached_model,
                **fields,
            )
        try:
            await self._write(found)
        except Exception:  # noqa: BLE001
            self.logger.warning("Could not write the estimate artifact", exc_info=True)

    async def _write(self, found: Estimate) -> None:
        from prefect.client.schemas.actions import ArtifactCreate

        await self.client.create_artifact(
            ArtifactCreate(
                key=ESTIMATE_ARTIFACT.format(flow_run_id=self.flow_run.id),
                type="markdown",
                data=found.markdown(),
                description=f"Estimated cost {found.cost_text()} (before the pod was created)",
                flow_run_id=self.flow_run.id,
            )
        )
