"""What a job would cost, asked before it is submitted (`ow.<job>.estimate(...)`, `ow exec --dry-run`): the run's
configuration resolved as the RunPod worker will resolve it, and the estimate on it (`plan.estimate_configuration`)."""

from __future__ import annotations

from typing import Any

from ow_prefect.costs.estimate import Estimate
from ow_prefect.costs.plan import estimate_configuration
from ow_prefect.costs.work import Work


async def estimate_on_pool(
    client: Any, base_job_template: dict[str, Any], values: dict[str, Any], work: Work, **fields: Any
) -> Estimate:
    """The pool's template, then the deployment's and the run's job variables (`values`), with blocks and secrets
    resolved through `client` (Prefect's async client), as the worker builds a run's configuration; then the
    estimate on the offers that configuration ranks now."""
    from ow_prefect.workers.runpod import RunPodJobConfiguration

    configuration = await RunPodJobConfiguration.from_template_and_values(base_job_template, values, client=client)
    async with configuration.runpod_credentials().get_client() as runpod:
        return await estimate_configuration(configuration, work, runpod, pool_type="runpod", **fields)
