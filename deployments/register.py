"""Register every deployment of prefect.yaml on a work pool, through the Prefect API.

    python -m deployments.register --pool local [--create-pool process]

Equivalent to `prefect --no-prompt deploy --all` from the repository root, but usable from Python (tests,
notebooks, the SDK's own set-up) and for any pool name. The pull step points flow runs at this checkout.
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


def ensure_pool(client: Any, pool: str, pool_type: str) -> str:
    """Create the work pool unless it exists; say which."""
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectNotFound

    try:
        client.read_work_pool(pool)
    except ObjectNotFound:
        client.create_work_pool(WorkPoolCreate(name=pool, type=pool_type))
        return "created"
    return "exists"


def register(pool: str | None = None, create_pool: str | None = None, root: Path = ROOT) -> dict[str, str]:
    """Create or update every deployment; return {"flow/deployment": deployment id}."""
    from prefect.client.orchestration import get_client

    registered = {}
    with get_client(sync_client=True) as client:
        for spec in load_deployments(root):
            pool_name = pool or spec["work_pool"]["name"]
            if create_pool:
                ensure_pool(client, pool_name, create_pool)
            flow = load_flow(spec["entrypoint"], root)
            name = flow.name
            flow_id = client.create_flow_from_name(name)
            deployment_id = client.create_deployment(
                flow_id=flow_id,
                name=spec["name"],
                entrypoint=spec["entrypoint"],
                work_pool_name=pool_name,
                job_variables=spec["work_pool"].get("job_variables") or {},
                parameters=spec.get("parameters") or {},
                parameter_openapi_schema=flow.parameters.model_dump(mode="json"),
                description=spec.get("description"),
                tags=spec.get("tags") or [],
                pull_steps=[{"prefect.deployments.steps.set_working_directory": {"directory": str(root)}}],
            )
            registered[f"{name}/{spec['name']}"] = str(deployment_id)
    return registered


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m deployments.register", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--pool", help="work pool for every deployment (default: the one in prefect.yaml)")
    parser.add_argument("--create-pool", metavar="TYPE", help="create the pool with this type if it is missing")
    args = parser.parse_args(argv)
    for name, deployment_id in register(args.pool, args.create_pool).items():
        print(f"{name}\t{deployment_id}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
