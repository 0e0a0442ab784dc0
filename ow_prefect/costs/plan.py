"""Where the estimate meets a pool: the RunPod worker's configuration of a run, the offers it would try now, and the
estimate on them — the same for the SDK (`ow.<job>.estimate`), `ow exec --dry-run` and the worker itself."""

from __future__ import annotations

import asyncio
import contextvars
from collections.abc import Coroutine
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any, TypeVar

from ow_prefect.costs.estimate import Estimate, estimate_candidates
from ow_prefect.costs.work import Work

if TYPE_CHECKING:
    from ow_prefect.runpod.client import AsyncRunPodClient
    from ow_prefect.workers.runpod import RunPodJobConfiguration

T = TypeVar("T")


async def estimate_configuration(
    configuration: RunPodJobConfiguration, work: Work, runpod: AsyncRunPodClient, **fields: Any
) -> Estimate:
    """The estimate on the offers this run's configuration ranks now, first the one the worker would take."""
    candidates = (await configuration.find_offers(runpod)).candidates
    return estimate_candidates(
        work,
        candidates,
        max_runtime=configuration.max_runtime,
        max_cost=configuration.max_cost,
        cached_model=bool(configuration.cache_volume_ids),
        **fields,
    )


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


def work_of_run(parameters: dict[str, Any], entrypoint: str | None, storage: Any) -> tuple[str, str | None, Work]:
    """(job type, job id, work) of a flow run, identified as its flow would (the SDK's envelope, else the first job
    type of the deployment's entrypoint that accepts the parameters). A flow of no job type does unknown work."""
    from ow_prefect.jobs.submit import accepting

    envelope = parameters.get("ow_job") or {}
    _, found = accepting(parameters, entrypoint)
    if found is None:
        why = f"{entrypoint or 'this flow'} is not an ow_prefect job type: its work is unknown"
        return envelope.get("type") or "flow", envelope.get("id"), Work(open_ended=why)
    job_cls, validated = found
    return envelope.get("type") or job_cls.name, envelope.get("id"), job_cls.work(validated, storage)


async def estimate_flow_run(
    client: Any, flow_run: Any, configuration: RunPodJobConfiguration, runpod: AsyncRunPodClient, pool: str
) -> Estimate:
    """The worker's estimate of a run it picked up, on the offers it is about to try."""
    import anyio.to_thread

    from ow_prefect.storage import Storage

    deployment = await client.read_deployment(flow_run.deployment_id) if flow_run.deployment_id else None
    entrypoint = deployment.entrypoint if deployment else None
    job_type, job_id, work = await anyio.to_thread.run_sync(
        work_of_run, dict(flow_run.parameters or {}), entrypoint, Storage.from_settings()
    )
    name = f"{deployment.name}" if deployment else None
    fields = {"job_type": job_type, "job_id": job_id, "deployment": name, "pool": pool, "pool_type": "runpod"}
    return await estimate_configuration(configuration, work, runpod, **fields)


def run_sync(coroutine: Coroutine[Any, Any, T]) -> T:
    """Run `coroutine` to its end from synchronous code, in a thread of its own with this context (Prefect's
    settings): the RunPod client is async only, and the caller may already run an event loop (a notebook)."""
    context = contextvars.copy_context()
    with ThreadPoolExecutor(1, thread_name_prefix="ow-estimate") as pool:
        return pool.submit(context.run, asyncio.run, coroutine).result()
