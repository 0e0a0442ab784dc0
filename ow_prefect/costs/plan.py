"""Where the estimate meets a run: the RunPod worker's configuration of it, the offers it would try now, and the
estimate on them — the same for the worker (this module) and for the SDK before submitting (`preview.py`)."""

from __future__ import annotations

from typing import Any

from ow_prefect.costs.estimate import Estimate, estimate_candidates
from ow_prefect.costs.work import Work


async def estimate_configuration(configuration: Any, work: Work, runpod: Any, **fields: Any) -> Estimate:
    """The estimate on the offers a run's configuration (`RunPodJobConfiguration`) ranks now, first the one the
    worker would take."""
    candidates = (await configuration.find_offers(runpod)).candidates
    return estimate_candidates(
        work,
        candidates,
        max_runtime=configuration.max_runtime,
        max_cost=configuration.max_cost,
        cached_model=bool(configuration.cache_volume_ids or configuration.network_volume_id),
        **fields,
    )


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


async def estimate_flow_run(client: Any, flow_run: Any, configuration: Any, runpod: Any, pool: str | None) -> Estimate:
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
