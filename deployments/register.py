"""Register the deployments of prefect.yaml through the Prefect API.

    python -m deployments.register                          # all, each on its own pool (gpu or local)
    python -m deployments.register --variant local          # only those prefect.yaml puts on `local`
    python -m deployments.register --pool mine --create-pool process   # all, on any one pool

Equivalent to `prefect --no-prompt deploy --all` from the repository root, but usable from Python (tests,
notebooks, `ow setup`) and for any pool. Where flow runs start follows the pool's type: on a `runpod` pool where
`ow_prefect.workers.pull.code_directory` says (the image's copy, /opt/ow_prefect, or `OW_POD_CODE_DIR`), in this
checkout on any other. Job variables the
pool does not know (a RunPod preset on a process pool) are left out.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parent.parent


def load_deployments(root: Path = ROOT) -> list[dict[str, Any]]:
    return yaml.safe_load((root / "prefect.yaml").read_text())["deployments"]


def load_flow(entrypoint: str, root: Path = ROOT) -> Any:
    from prefect.flows import load_flow_from_entrypoint

    return load_flow_from_entrypoint(str(root / entrypoint))


def ensure_pool(client: Any, pool: str, pool_type: str | None) -> Any:
    """Read the pool; create it with `pool_type` when missing (or fail naming the way to create it)."""
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectNotFound

    try:
        return client.read_work_pool(pool)
    except ObjectNotFound:
        if not pool_type:
            raise SystemExit(
                f"work pool {pool!r} does not exist: create it (`prefect work-pool create {pool} --type process`, "
                "or `python -m blocks --pool NAME` for RunPod), or pass --create-pool TYPE"
            ) from None
        from prefect.workers.base import BaseWorker

        worker = BaseWorker.get_worker_class_from_type(pool_type)  # its form, as `prefect work-pool create` does
        template = worker.get_default_base_job_template() if worker else {}
        client.create_work_pool(WorkPoolCreate(name=pool, type=pool_type, base_job_template=template))
        return client.read_work_pool(pool)


def pull_steps(pool_type: str, root: Path) -> list[dict[str, Any]]:
    if pool_type == "runpod":  # the image's copy, or OW_POD_CODE_DIR (as prefect.yaml's `pull_in_image`)
        return [{"ow_prefect.workers.pull.code_directory": {}}]
    return [{"prefect.deployments.steps.set_working_directory": {"directory": str(root)}}]


def known_job_variables(job_variables: dict[str, Any], work_pool: Any) -> dict[str, Any]:
    known = (work_pool.base_job_template.get("variables") or {}).get("properties") or {}
    return {name: value for name, value in job_variables.items() if name in known}


def schedules(spec: dict[str, Any]) -> list[Any]:
    """prefect.yaml's `schedules` of a deployment (cron, interval or rrule, with `active` and `slug`): slugged,
    so that registering again updates them instead of adding copies (Prefect's CLI insists on slugs too)."""
    from prefect.client.schemas.actions import DeploymentScheduleCreate
    from prefect.client.schemas.schedules import construct_schedule

    made = []
    for index, item in enumerate(spec.get("schedules") or []):
        item = dict(item)
        active = item.pop("active", True)
        timezone = item.pop("timezone", None)
        slug = item.pop("slug", f"{spec['name']}-{index}")
        schedule = construct_schedule(**item, timezone=timezone)
        made.append(DeploymentScheduleCreate(schedule=schedule, active=active, slug=slug))
    return made


def register(
    pool: str | None = None, create_pool: str | None = None, root: Path = ROOT, variant: str | None = None
) -> dict[str, str]:
    """Create or update the deployments (those prefect.yaml puts on pool `variant`, or all), each on `pool` or
    its own; return {"flow/deployment": deployment id}."""
    from prefect.client.orchestration import get_client

    registered = {}
    flows: dict[str, Any] = {}
    pools: dict[str, Any] = {}
    with get_client(sync_client=True) as client:
        for spec in load_deployments(root):
            if variant and spec["work_pool"]["name"] != variant:
                continue
            pool_name = pool or spec["work_pool"]["name"]
            if pool_name not in pools:
                pools[pool_name] = ensure_pool(client, pool_name, create_pool)
            work_pool = pools[pool_name]
            if spec["entrypoint"] not in flows:
                flows[spec["entrypoint"]] = load_flow(spec["entrypoint"], root)
            flow = flows[spec["entrypoint"]]
            deployment_id = client.create_deployment(
                flow_id=client.create_flow_from_name(flow.name),
                name=spec["name"],
                entrypoint=spec["entrypoint"],
                work_pool_name=pool_name,
                job_variables=known_job_variables(spec["work_pool"].get("job_variables") or {}, work_pool),
                parameters=spec.get("parameters") or {},
                schedules=schedules(spec),
                parameter_openapi_schema=flow.parameters.model_dump(mode="json"),
                description=spec.get("description"),
                tags=spec.get("tags") or [],
                pull_steps=pull_steps(work_pool.type, root),
            )
            registered[f"{flow.name}/{spec['name']}"] = str(deployment_id)
    return registered


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m deployments.register", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--pool", help="work pool for every deployment (default: the one in prefect.yaml)")
    parser.add_argument("--create-pool", metavar="TYPE", help="create the pool with this type if it is missing")
    parser.add_argument("--variant", metavar="POOL", help="only the deployments prefect.yaml puts on POOL (gpu, local)")
    args = parser.parse_args(argv)
    for name, deployment_id in register(args.pool, args.create_pool, variant=args.variant).items():
        print(f"{name}\t{deployment_id}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
