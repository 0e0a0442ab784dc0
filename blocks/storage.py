"""Create the S3-compatible storage block ow_prefect reads and writes (S3, Cloudflare R2, MinIO).

    python -m blocks.storage --name ow-storage --bucket my-bucket [--folder ow] [--endpoint-url URL]
    export OW_STORAGE_BLOCK=s3-bucket/ow-storage

Credentials come from AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY and are stored in an `AwsCredentials`
block (its secret field is a SecretStr: never printed). Running it again updates the documents.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

from blocks.documents import Outcome, upsert


def save_s3_storage(name: str, bucket: str, **options: Any) -> str:
    """Save `AwsCredentials` and `S3Bucket` documents named `name`; return the slug for OW_STORAGE_BLOCK."""
    upsert_s3_storage(name, bucket, **options)
    return f"s3-bucket/{name}"


def upsert_s3_storage(
    name: str,
    bucket: str,
    *,
    folder: str = "",
    endpoint_url: str | None = None,
    access_key_id: str | None = None,
    secret_access_key: str | None = None,
    region: str | None = None,
) -> dict[str, Outcome]:
    """Create or update the `{name}-credentials` AwsCredentials and `{name}` S3Bucket documents; return each
    document's slug with what happened to it."""
    from prefect_aws import AwsCredentials, S3Bucket
    from prefect_aws.client_parameters import AwsClientParameters

    credentials = AwsCredentials(
        aws_access_key_id=access_key_id,
        aws_secret_access_key=secret_access_key,
        region_name=region,
        aws_client_parameters=AwsClientParameters(endpoint_url=endpoint_url),
    )
    credentials_outcome, credentials = upsert(credentials, f"{name}-credentials")
    bucket_outcome, _ = upsert(S3Bucket(bucket_name=bucket, bucket_folder=folder, credentials=credentials), name)
    return {f"aws-credentials/{name}-credentials": credentials_outcome, f"s3-bucket/{name}": bucket_outcome}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m blocks.storage", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--name", default="ow-storage")
    parser.add_argument("--bucket", required=True)
    parser.add_argument("--folder", default="")
    parser.add_argument("--endpoint-url", default=os.environ.get("AWS_ENDPOINT_URL"))
    parser.add_argument("--region", default=os.environ.get("AWS_DEFAULT_REGION"))
    args = parser.parse_args(argv)
    slug = save_s3_storage(
        args.name,
        args.bucket,
        folder=args.folder,
        endpoint_url=args.endpoint_url,
        access_key_id=os.environ.get("AWS_ACCESS_KEY_ID"),
        secret_access_key=os.environ.get("AWS_SECRET_ACCESS_KEY"),
        region=args.region,
    )
    print(f"saved {slug} (bucket {args.bucket!r}, folder {args.folder!r}); set OW_STORAGE_BLOCK={slug}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
