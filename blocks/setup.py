"""Register ow_prefect's block types and create or update its block documents from the environment or `.env`.

    python -m blocks [--env-file .env] [--pool gpu] [--local-pool local]      (or: ow setup)

- `RUNPOD_API_KEY` (+ `RUNPOD_API_URL`) → `runpod-credentials/runpod` (`OW_RUNPOD_BLOCK` renames it); `--pool`
  makes it the default credentials of that `runpod` work pool (created if missing; without a key the pool is
  created without credentials, so that `prefect --no-prompt deploy --all` can register every deployment);
- `HF_TOKEN` → `secret/hf-token` (`OW_HF_TOKEN_SECRET` renames it): fine-tuned models are pushed with it;
- `OPENAI_API_KEY` → `secret/openai-api-key` (`OW_OPENAI_KEY_SECRET` renames it): the chat client's OpenAI key;
- the `process` work pool `local` (`--local-pool`), for runs on this machine;
- `OW_S3_BUCKET` (+ `OW_S3_FOLDER`, `AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, `AWS_ENDPOINT_URL` for R2 or
  MinIO, `AWS_DEFAULT_REGION`) → `s3-bucket/ow-storage` + `aws-credentials/ow-storage-credentials` (named after
  `OW_STORAGE_BLOCK=s3-bucket/NAME` when set).

The environment wins over the file. A variable that is not set leaves its document alone. Running it again changes
only what changed (each line says `created`, `updated` or `unchanged`); secrets are stored encrypted by Prefect and
never printed.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from blocks.documents import Outcome, upsert
from blocks.runpod import ensure_runpod_pool, upsert_runpod_credentials
from blocks.storage import upsert_s3_storage


def read_values(env_file: str | os.PathLike[str] | None = ".env", environ: Mapping[str, str] | None = None) -> dict:
    """The `.env` file's values (if the file exists) overridden by the environment's; empty values dropped."""
    from dotenv import dotenv_values

    values: dict[str, Any] = {}
    if env_file and Path(env_file).is_file():
        values.update(dotenv_values(env_file))
    values.update(os.environ if environ is None else environ)
    return {key: value for key, value in values.items() if value}


def register_block_types() -> list[str]:
    """Register the block types ow_prefect uses, so they show in the UI's catalog before any document exists."""
    from prefect.blocks.system import Secret
    from prefect_aws import AwsCredentials, S3Bucket

    from ow_prefect.runpod.credentials import RunPodCredentials

    types = [RunPodCredentials, Secret, AwsCredentials, S3Bucket]
    for block_type in types:
        block_type.register_type_and_schema(_sync=True)
    return [block_type.get_block_type_slug() for block_type in types]


def storage_block_name(values: Mapping[str, str]) -> str:
    slug = values.get("OW_STORAGE_BLOCK", "")
    block_type, _, name = slug.partition("/")
    if slug and block_type != "s3-bucket":
        raise SystemExit(f"OW_STORAGE_BLOCK={slug!r} is not an s3-bucket block; unset it or use s3-bucket/NAME")
    return name or "ow-storage"


def register_blocks(
    values: Mapping[str, str], runpod_pool: str | None = None, say: Callable[[str], Any] = print
) -> dict[str, Outcome]:
    """Create or update every document that `values` (see `read_values`) has what it needs for; return each
    document's slug with what happened to it. `say` gets one line per document, never a secret."""
    from prefect.blocks.system import Secret

    done: dict[str, Outcome] = {}
    say(f"block types registered: {', '.join(register_block_types())}")
    if values.get("RUNPOD_API_KEY"):
        name = values.get("OW_RUNPOD_BLOCK", "runpod")
        outcome, block = upsert_runpod_credentials(name, values["RUNPOD_API_KEY"], values.get("RUNPOD_API_URL"))
        done[f"runpod-credentials/{name}"] = outcome
        if runpod_pool:
            pool_outcome = ensure_runpod_pool(runpod_pool, block._block_document_id)
            say(f"work pool {runpod_pool!r} (type runpod): {pool_outcome}, default credentials {name!r}")
    elif runpod_pool:
        outcome = ensure_runpod_pool(runpod_pool)
        say(
            f"work pool {runpod_pool!r} (type runpod): {outcome}, no credentials: its deployments register, but its "
            "worker runs nothing until RUNPOD_API_KEY is set (RunPod → Settings → API Keys) and `ow setup` runs again"
        )
    for variable, name_variable, default in (
        ("HF_TOKEN", "OW_HF_TOKEN_SECRET", "hf-token"),
        ("OPENAI_API_KEY", "OW_OPENAI_KEY_SECRET", "openai-api-key"),
    ):
        if values.get(variable):
            name = values.get(name_variable, default)
            done[f"secret/{name}"] = upsert(Secret(value=values[variable]), name)[0]
    if values.get("OW_S3_BUCKET"):
        name = storage_block_name(values)
        done |= upsert_s3_storage(
            name,
            values["OW_S3_BUCKET"],
            folder=values.get("OW_S3_FOLDER", ""),
            endpoint_url=values.get("AWS_ENDPOINT_URL"),
            access_key_id=values.get("AWS_ACCESS_KEY_ID"),
            secret_access_key=values.get("AWS_SECRET_ACCESS_KEY"),
            region=values.get("AWS_DEFAULT_REGION"),
        )
        if values.get("OW_STORAGE_BLOCK") != f"s3-bucket/{name}":
            say(f"storage: set OW_STORAGE_BLOCK=s3-bucket/{name} where the SDK and the workers run")
    for slug, outcome in done.items():
        say(f"{slug}: {outcome}")
    if not done:
        say("no documents: set RUNPOD_API_KEY, HF_TOKEN or OW_S3_BUCKET (in the environment or .env)")
    return done


def ensure_process_pool(name: str) -> str:
    """The `process` work pool for runs on this machine (its GPU, if any): created unless it exists."""
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound

    from deployments.register import ensure_pool

    with get_client(sync_client=True) as client:
        try:
            client.read_work_pool(name)
            return "unchanged"
        except ObjectNotFound:
            ensure_pool(client, name, "process")
            return "created"


def bucket_problem(slug: str) -> str | None:
    """Why the saved S3 block cannot reach its bucket (None when it can): caught here, not in a job's upload."""
    from prefect.blocks.core import Block

    bucket = Block.load(slug, _sync=True)
    try:
        bucket.credentials.get_s3_client().head_bucket(Bucket=bucket.bucket_name)
    except Exception as exc:
        return type(exc).__name__ + (f" ({exc.response['Error'].get('Code')})" if hasattr(exc, "response") else "")
    return None


def main(argv: list[str] | None = None, prog: str = "python -m blocks") -> int:
    parser = argparse.ArgumentParser(
        prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--env-file", default=".env", help="read values from this file too (default: .env)")
    parser.add_argument("--pool", default="gpu", help="the `runpod` work pool using the RunPod block (default: gpu)")
    parser.add_argument("--local-pool", default="local", help="the `process` work pool (default: local; '' for none)")
    args = parser.parse_args(argv)
    values = read_values(args.env_file)
    # Prefect reads .env from the current directory only; the Prefect settings of another file apply too.
    os.environ.update({k: v for k, v in values.items() if k.startswith("PREFECT_")})
    if args.local_pool:
        print(f"work pool {args.local_pool!r} (type process): {ensure_process_pool(args.local_pool)}")
    register_blocks(values, runpod_pool=args.pool or None)
    problem = bucket_problem(f"s3-bucket/{storage_block_name(values)}") if values.get("OW_S3_BUCKET") else None
    if problem:
        print(f"warning: bucket {values['OW_S3_BUCKET']!r} is not reachable with these credentials: {problem}")
    print(
        "next: register the deployments (`prefect --no-prompt deploy --all`, or `python -m deployments.register "
        "--variant gpu|local`), then start a worker (`prefect worker start --pool gpu`)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
