"""Create the blocks and work pools ow_prefect uses, from `.env` and the environment; run it again after a
change: it updates what exists and creates what is missing.

    ow setup                       (the same as: python -m blocks.setup)

| variables                                               | what it makes                                     |
|---------------------------------------------------------|---------------------------------------------------|
| (none)                                                  | work pool `local` (type process)                  |
| RUNPOD_API_KEY [RUNPOD_API_URL]                          | RunPod Credentials block `runpod`, and work pool  |
|                                                         | `gpu` (type runpod) using it                      |
| AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, OW_S3_BUCKET   | S3 storage block `ow-storage` (S3, R2, MinIO);    |
| [OW_S3_FOLDER, AWS_ENDPOINT_URL, AWS_DEFAULT_REGION]     | then set OW_STORAGE_BLOCK=s3-bucket/ow-storage    |
| HF_TOKEN                                                | Secret block `hf-token` (OW_HF_TOKEN_SECRET)      |
| OPENAI_API_KEY                                          | Secret block `openai-api-key` (OW_OPENAI_KEY_SECRET) |

Variables of the environment win over the `.env` file. The blocks go to the Prefect API of PREFECT_API_URL
(Prefect reads `.env` too), or to Prefect's local database when none is set. Secrets are stored as Prefect
secrets and never printed.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Mapping
from pathlib import Path

S3_VARIABLES = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "OW_S3_BUCKET")


def read_env(env_file: Path) -> dict[str, str]:
    """The `.env` file's variables overridden by the environment's."""
    from dotenv import dotenv_values

    from_file = {k: v for k, v in dotenv_values(env_file).items() if v is not None} if env_file.exists() else {}
    return {**from_file, **os.environ}


def setup(
    env: Mapping[str, str],
    *,
    local_pool: str = "local",
    gpu_pool: str = "gpu",
    runpod_block: str = "runpod",
    storage_block: str = "ow-storage",
    report: Callable[[str], object] = print,
) -> None:
    """Create or update every block and pool `env` has what it takes for; `report` one line per step."""
    from prefect.client.orchestration import get_client

    from deployments.register import ensure_pool

    with get_client(sync_client=True) as client:
        report(f"work pool {local_pool!r} (process): {ensure_pool(client, local_pool, 'process')}")
    if env.get("RUNPOD_API_KEY"):
        from blocks.runpod import ensure_runpod_pool, save_runpod_credentials

        block_id = save_runpod_credentials(runpod_block, env["RUNPOD_API_KEY"], env.get("RUNPOD_API_URL"))
        report(f"block runpod-credentials/{runpod_block}: saved")
        report(f"work pool {gpu_pool!r} (runpod): {ensure_runpod_pool(gpu_pool, block_id)}")
    else:
        report(f"skipped RunPod: set RUNPOD_API_KEY for the {gpu_pool!r} work pool")
    _s3_storage(env, storage_block, report)
    for variable, name_variable, default in (
        ("HF_TOKEN", "OW_HF_TOKEN_SECRET", "hf-token"),
        ("OPENAI_API_KEY", "OW_OPENAI_KEY_SECRET", "openai-api-key"),
    ):
        if env.get(variable):
            from prefect.blocks.system import Secret

            name = env.get(name_variable) or default
            Secret(value=env[variable]).save(name, overwrite=True, _sync=True)
            report(f"block secret/{name}: saved from {variable}")


def _s3_storage(env: Mapping[str, str], name: str, report: Callable[[str], object]) -> None:
    missing = [v for v in S3_VARIABLES if not env.get(v)]
    if missing:
        report(f"skipped S3 storage: set {', '.join(missing)} (storage stays on local disk)")
        return
    from blocks.storage import save_s3_storage

    slug = save_s3_storage(
        name,
        env["OW_S3_BUCKET"],
        folder=env.get("OW_S3_FOLDER", ""),
        endpoint_url=env.get("AWS_ENDPOINT_URL"),
        access_key_id=env["AWS_ACCESS_KEY_ID"],
        secret_access_key=env["AWS_SECRET_ACCESS_KEY"],
        region=env.get("AWS_DEFAULT_REGION"),
    )
    report(f"block {slug}: saved (bucket {env['OW_S3_BUCKET']!r})")
    problem = _bucket_problem(slug)
    if problem:
        report(f"warning: bucket {env['OW_S3_BUCKET']!r} is not reachable with these credentials: {problem}")
    if env.get("OW_STORAGE_BLOCK") != slug:
        report(f"  use it: set OW_STORAGE_BLOCK={slug} (in .env and where workers run)")


def _bucket_problem(slug: str) -> str | None:
    from prefect.blocks.core import Block

    bucket = Block.load(slug, _sync=True)
    try:
        bucket.credentials.get_s3_client().head_bucket(Bucket=bucket.bucket_name)
    except Exception as exc:
        return type(exc).__name__ + (f" ({exc.response['Error'].get('Code')})" if hasattr(exc, "response") else "")
    return None


def main(argv: list[str] | None = None, prog: str = "python -m blocks.setup") -> int:
    parser = argparse.ArgumentParser(
        prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--env-file", type=Path, default=Path(".env"), help="default: .env in this directory")
    parser.add_argument("--local-pool", default="local", help="process work pool (default: local)")
    parser.add_argument("--gpu-pool", default="gpu", help="runpod work pool (default: gpu)")
    parser.add_argument("--runpod-block", default="runpod", help="RunPod Credentials block (default: runpod)")
    parser.add_argument("--storage-block", default="ow-storage", help="S3 bucket block (default: ow-storage)")
    args = parser.parse_args(argv)
    env = read_env(args.env_file)
    # Prefect reads .env from the current directory only; the Prefect settings of another file apply too.
    os.environ.update({k: v for k, v in env.items() if k.startswith("PREFECT_")})
    setup(
        env,
        local_pool=args.local_pool,
        gpu_pool=args.gpu_pool,
        runpod_block=args.runpod_block,
        storage_block=args.storage_block,
    )
    print(
        "next: register the deployments on a pool (`prefect --no-prompt deploy --all` for 'local', "
        f"`python -m deployments.register --pool {args.gpu_pool}` for RunPod), then start a worker "
        f"(`prefect worker start --pool {args.gpu_pool}`)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
