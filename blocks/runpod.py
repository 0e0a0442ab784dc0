"""Save the RunPod API key in a block and make it the default of a `runpod` work pool.

    RUNPOD_API_KEY=rpa_... python -m blocks.runpod --name runpod --pool gpu

Saves a `RunPodCredentials` block (the key is a SecretStr: stored encrypted, never printed), then creates the
work pool `--pool` (type `runpod`) with that block as its `credentials` default, or updates an existing pool's
default and leaves its other settings alone. Running it again updates both. `--api-url` points at a proxy or
at ow_prefect's FakeRunPod (`RUNPOD_API_URL`).
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

from blocks.documents import Outcome, upsert


def save_runpod_credentials(name: str, api_key: str, api_url: str | None = None) -> Any:
    """Save (or update) the block; return its document id."""
    return upsert_runpod_credentials(name, api_key, api_url)[1]._block_document_id


def upsert_runpod_credentials(name: str, api_key: str, api_url: str | None = None) -> tuple[Outcome, Any]:
    """Create or update the `RunPodCredentials` document `name`; return what happened and the saved block."""
    from ow_prefect.runpod.client import DEFAULT_BASE_URL
    from ow_prefect.runpod.credentials import RunPodCredentials

    return upsert(RunPodCredentials(api_key=api_key, api_url=api_url or DEFAULT_BASE_URL), name)


def ensure_runpod_pool(pool: str, block_id: Any = None, **defaults: Any) -> str:
    """Create the pool with the block as default credentials, or point an existing pool's default at it and add the
    job variables this version has that the pool's template lacks (Prefect ignores a variable the template does not
    have, e.g. `max_cost` on a pool made before it existed; the pool's own values are kept).

    Without a block (no RunPod key yet) the pool is created without credentials, so that deployments can be
    registered on it (`prefect --no-prompt deploy --all`); an existing pool is then left as it is."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate, WorkPoolUpdate
    from prefect.exceptions import ObjectNotFound

    from ow_prefect.workers.runpod import RunPodWorker

    with get_client(sync_client=True) as client:
        try:
            existing = client.read_work_pool(pool)
        except ObjectNotFound:
            template = RunPodWorker.base_job_template(block_id, **defaults)
            client.create_work_pool(WorkPoolCreate(name=pool, type="runpod", base_job_template=template))
            return "created"
        if existing.type != "runpod":
            raise SystemExit(f"work pool {pool!r} has type {existing.type!r}, not 'runpod'; pick another name")
        if block_id is None:
            return "unchanged"
        template = existing.base_job_template
        current = RunPodWorker.base_job_template()
        for name, spec in current["variables"]["properties"].items():
            template["variables"]["properties"].setdefault(name, spec)
        for name, value in current["job_configuration"].items():
            template["job_configuration"].setdefault(name, value)
        properties = template["variables"]["properties"]
        properties["credentials"]["default"] = {"$ref": {"block_document_id": str(block_id)}}
        for name, value in defaults.items():
            properties[name]["default"] = value
        client.update_work_pool(pool, WorkPoolUpdate(base_job_template=template))
        return "updated"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m blocks.runpod", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--name", default="runpod", help="block name (default: runpod)")
    parser.add_argument("--pool", help="also create or update this `runpod` work pool to use the block")
    parser.add_argument("--api-url", default=os.environ.get("RUNPOD_API_URL"))
    args = parser.parse_args(argv)
    api_key = os.environ.get("RUNPOD_API_KEY")
    if not api_key:
        print("error: set RUNPOD_API_KEY (RunPod → Settings → API Keys) in the environment", file=sys.stderr)
        return 1
    block_id = save_runpod_credentials(args.name, api_key, args.api_url)
    print(f"saved runpod-credentials/{args.name}")
    if args.pool:
        print(f"work pool {args.pool!r} {ensure_runpod_pool(args.pool, block_id)} with it as default credentials")
    return 0


if __name__ == "__main__":
    sys.exit(main())
