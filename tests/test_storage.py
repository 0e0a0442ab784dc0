"""Content-addressed storage on local disk and on S3 (a real moto server on loopback)."""

import uuid
from pathlib import Path

import boto3
import pytest

from ow_prefect.errors import NotFoundError, StorageError
from ow_prefect.storage import LocalBackend, Storage, backend_for_block


@pytest.fixture(params=["local", "s3"])
def storage(request, tmp_path) -> Storage:
    if request.param == "local":
        return Storage(LocalBackend(tmp_path / "store"))
    endpoint = request.getfixturevalue("s3_endpoint")
    from prefect_aws import AwsCredentials, S3Bucket
    from prefect_aws.client_parameters import AwsClientParameters

    bucket = f"ow-{uuid.uuid4().hex[:8]}"
    credentials = AwsCredentials(
        aws_access_key_id="test",
        aws_secret_access_key="test",
        region_name="us-east-1",
        aws_client_parameters=AwsClientParameters(endpoint_url=endpoint),
    )
    credentials.get_s3_client().create_bucket(Bucket=bucket)
    return Storage(backend_for_block(S3Bucket(bucket_name=bucket, bucket_folder="ow", credentials=credentials)))


def test_bytes_round_trip_and_dedupe(storage):
    first = storage.put_bytes(b"hello", "custom_job_file", filename="a.txt")
    again = storage.put_bytes(b"hello", "custom_job_file", filename="b.txt")
    assert first.id == again.id and first.id.startswith("custom_job_file:file-")
    assert again.filename == "a.txt", "the first record is kept"
    assert storage.get_bytes(first.id) == b"hello"
    other = storage.put_bytes(b"hello", "result")
    assert other.id != first.id and other.sha256 == first.sha256


def test_file_and_directory_round_trip(storage, tmp_path: Path):
    src = tmp_path / "adapter"
    (src / "sub").mkdir(parents=True)
    (src / "adapter_config.json").write_text('{"r": 8}')
    (src / "sub" / "weights.bin").write_bytes(bytes(range(256)) * 100)
    record = storage.put_path(src, "adapter")
    assert record.kind == "directory" and record.id.startswith("adapter:dir-")
    assert [e.path for e in record.entries] == ["adapter_config.json", "sub/weights.bin"]
    assert storage.put_path(src, "adapter").id == record.id
    out = storage.download(record.id, tmp_path / "out")
    assert (out / "sub" / "weights.bin").read_bytes() == (src / "sub" / "weights.bin").read_bytes()
    (src / "adapter_config.json").write_text('{"r": 16}')
    assert storage.put_path(src, "adapter").id != record.id

    single = storage.put_path(src / "adapter_config.json", "result")
    (tmp_path / "dl").mkdir()
    assert storage.download(single.id, tmp_path / "dl").read_text() == '{"r": 16}'
    assert storage.download(single.id, tmp_path / "dl" / "renamed.json").read_text() == '{"r": 16}'
    with pytest.raises(StorageError, match="is a directory"):
        storage.get_bytes(record.id)


def test_missing_and_malformed_ids(storage):
    with pytest.raises(NotFoundError, match="not in"):
        storage.info("result:file-000000000000")
    with pytest.raises(NotFoundError, match="is not a file id"):
        storage.info("file-abc")
    assert not storage.exists("result:file-000000000000")


def test_json_documents(storage):
    storage.put_json("outputs/x.json", {"a": 1})
    storage.put_json("outputs/x.json", {"a": 2})
    assert storage.get_json("outputs/x.json") == {"a": 2}


def test_s3_layout_uses_the_bucket_folder(s3_endpoint):
    from prefect_aws import AwsCredentials, S3Bucket
    from prefect_aws.client_parameters import AwsClientParameters

    credentials = AwsCredentials(
        aws_access_key_id="test",
        aws_secret_access_key="test",
        region_name="us-east-1",
        aws_client_parameters=AwsClientParameters(endpoint_url=s3_endpoint),
    )
    credentials.get_s3_client().create_bucket(Bucket="layout")
    storage = Storage(
        backend_for_block(S3Bucket(bucket_name="layout", bucket_folder="team/ow", credentials=credentials))
    )
    record = storage.put_bytes(b"x", "result")
    keys = {
        o["Key"]
        for o in boto3.client(
            "s3",
            endpoint_url=s3_endpoint,
            aws_access_key_id="test",
            aws_secret_access_key="test",
            region_name="us-east-1",
        ).list_objects_v2(Bucket="layout")["Contents"]
    }
    assert keys == {f"team/ow/blobs/{record.sha256}", f"team/ow/files/result/file-{record.sha256[:12]}.json"}


def test_storage_block_setting_loads_a_saved_s3_block(s3_endpoint, monkeypatch):
    """OW_STORAGE_BLOCK names a saved block (here in Prefect's ephemeral API)."""
    from blocks.storage import save_s3_storage

    boto3.client(
        "s3", endpoint_url=s3_endpoint, aws_access_key_id="test", aws_secret_access_key="test", region_name="us-east-1"
    ).create_bucket(Bucket="from-block")
    slug = save_s3_storage(
        "ow-test-storage",
        "from-block",
        endpoint_url=s3_endpoint,
        access_key_id="test",
        secret_access_key="test",
        region="us-east-1",
    )
    monkeypatch.setenv("OW_STORAGE_BLOCK", slug)
    storage = Storage.from_settings()
    assert "from-block" in repr(storage)
    assert storage.get_bytes(storage.put_bytes(b"via block", "result").id) == b"via block"


def test_unknown_storage_block_is_a_clear_error(monkeypatch):
    from ow_prefect.errors import ConfigurationError

    monkeypatch.setenv("OW_STORAGE_BLOCK", "s3-bucket/does-not-exist")
    with pytest.raises(ConfigurationError, match="cannot be loaded"):
        Storage.from_settings()
