"""What a job would cost, asked before it is submitted: `ow.<job>.estimate(...)` and `ow exec --dry-run` resolve the
run's configuration as the RunPod worker will and estimate on it (`plan.estimate_configuration`)."""

from __future__ import annotations

import asyncio
import contextvars
from collections.abc import Coroutine
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from ow_prefect.costs.estimate import Estimate
from ow_prefect.costs.plan import estimate_configuration
from ow_prefect.costs.work import Work

T = TypeVar("T")


async def estimate_on_pool(
    base_job_template: dict[str, Any], values: dict[str, Any], work: Work, **fields: Any
) -> Estimate:
    """Resolve the run's configuration as the worker will (the pool's template, then the deployment's and the run's
    job variables, blocks and secrets resolved through the Prefect API) and estimate on it."""
    from prefect.client.orchestration import get_client

    from ow_prefect.workers.runpod import RunPodJobConfiguration

    async with get_client() as client:
        configuration = await RunPodJobConfiguration.from_template_and_values(base_job_template, values, client=client)
    async with configuration.runpod_credentials().get_client() as runpod:
        return await estimate_configuration(configuration, work, runpod, **fields)


def run_sync(coroutine: Coroutine[Any, Any, T]) -> T:
    """Run `coroutine` to its end from synchronous code, in a thread of its own with this context (Prefect's
    settings): the RunPod client is async only, and the caller may already run an event loop (a notebook)."""
    context = contextvars.copy_context()
    with ThreadPoolExecutor(1, thread_name_prefix="ow-estimate") as pool:
        return pool.submit(context.run, asyncio.run, coroutine).result()
