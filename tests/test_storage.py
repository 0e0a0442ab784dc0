"""Content-addressed storage on local disk and on S3 (a real moto server on loopback)."""

import json
import uuid
from pathlib import Path

import boto3
import pytest

from ow_prefect.errors import NotFoundError, StorageError
from ow_prefect.hashing import canonical_json, sha256_bytes
from ow_prefect.storage import LocalBackend, Storage, backend_for_block, record_key


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


# ---- Records are data: a tampered bucket cannot make storage read or write outside its place -----------------


def write_record(storage: Storage, file_id: str, record: dict) -> None:
    """What someone with write access to the bucket can do: put any JSON at a record's key."""
    storage.backend.put_bytes(record_key(file_id), json.dumps(record).encode())


def consistent_directory(purpose: str, entries: list[dict]) -> tuple[str, dict]:
    """A directory record whose id and sha256 match its (tampered) entries: only the paths can give it away."""
    manifest = sha256_bytes(canonical_json(entries).encode())
    file_id = f"{purpose}:dir-{manifest[:12]}"
    record = {"id": file_id, "purpose": purpose, "kind": "directory", "bytes": 7, "sha256": manifest}
    return file_id, {**record, "filename": "d", "created_at": 0, "entries": entries}


@pytest.mark.parametrize(
    ("field", "value", "problem"),
    [
        ("sha256", "../../secret.txt", "sha256"),
        ("sha256", "A" * 64, "sha256"),
        ("filename", "../escaped.txt", "filename"),
        ("filename", "/tmp/escaped.txt", "filename"),
        ("filename", "sub/escaped.txt", "filename"),
        ("id", "result:file-000000000000", "does not match sha256"),
        ("purpose", "custom", "purpose"),
        ("bytes", -1, "bytes"),
        ("kind", "directory", "does not name a directory"),
    ],
)
def test_a_tampered_file_record_is_refused_and_nothing_is_read_or_written_outside(tmp_path, field, value, problem):
    outside = tmp_path / "secret.txt"
    outside.write_text("not for you")
    storage = Storage(LocalBackend(tmp_path / "store"))
    good = storage.put_bytes(b"weights", "result", filename="w.bin")
    write_record(storage, good.id, {**good.model_dump(), field: value})
    (tmp_path / "out").mkdir()
    for attempt in (
        lambda: storage.get_bytes(good.id),
        lambda: storage.download(good.id, tmp_path / "out"),
        lambda: storage.download(good.id, tmp_path / "out" / "named.bin"),
    ):
        with pytest.raises(StorageError, match=f"record of {good.id}.*(is invalid|{problem})") as error:
            attempt()
        assert problem in str(error.value)
    assert list((tmp_path / "out").iterdir()) == [] and sorted(p.name for p in tmp_path.iterdir()) == [
        "out",
        "secret.txt",
        "store",
    ]


def test_a_record_moved_to_another_id_is_refused(tmp_path):
    storage = Storage(LocalBackend(tmp_path / "store"))
    wanted, other = storage.put_bytes(b"the data", "result"), storage.put_bytes(b"other data", "result")
    write_record(storage, wanted.id, other.model_dump())
    with pytest.raises(StorageError, match=f"says it is {other.id}, not {wanted.id}"):
        storage.get_bytes(wanted.id)


@pytest.mark.parametrize(
    "path", ["../escaped.txt", "/tmp/ow-escaped.txt", "a/../../escaped.txt", "./x", "a//b", "a\\..\\b", ""]
)
def test_a_directory_entry_outside_the_destination_is_refused_before_anything_is_written(tmp_path, path):
    storage = Storage(LocalBackend(tmp_path / "store"))
    sha = storage.put_bytes(b"weights", "adapter").sha256
    file_id, record = consistent_directory(
        "adapter", [{"path": "ok.txt", "sha256": sha, "bytes": 7}, {"path": path, "sha256": sha, "bytes": 7}]
    )
    write_record(storage, file_id, record)
    dest = tmp_path / "out" / "adapter"
    with pytest.raises(StorageError, match=r"entries\.1\.path"):
        storage.download(file_id, dest)
    assert not (tmp_path / "out").exists() and not Path("/tmp/ow-escaped.txt").exists()
    assert not (tmp_path / "escaped.txt").exists()


def test_a_link_in_the_destination_cannot_lead_a_directory_outside(tmp_path):
    storage = Storage(LocalBackend(tmp_path / "store"))
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / "sub" / "w.bin").write_bytes(b"weights")
    record = storage.put_path(src, "adapter")
    dest = tmp_path / "out"
    dest.mkdir()
    (dest / "sub").symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    with pytest.raises(StorageError, match="points outside the directory; nothing written"):
        storage.download(record.id, dest)
    assert not (tmp_path / "elsewhere").exists()


def test_a_corrupted_blob_fails_its_hash_check_and_nothing_lands(storage, tmp_path):
    single = storage.put_bytes(b"the real weights", "result", filename="w.bin")
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.txt").write_bytes(b"intact")
    (src / "b.bin").write_bytes(b"the real weights")  # the same blob as `single`
    folder = storage.put_path(src, "adapter")
    storage.backend.put_bytes(f"blobs/{single.sha256}", b"backdoored weights")
    with pytest.raises(StorageError, match="corrupted or was replaced"):
        storage.get_bytes(single.id)
    with pytest.raises(StorageError, match=f"{single.id}: the stored content is corrupted"):
        storage.download(single.id, tmp_path / "file.bin")
    with pytest.raises(StorageError, match=f"{folder.id} entry 'b.bin': the stored content is corrupted"):
        storage.download(folder.id, tmp_path / "dir")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"] + (["store"] if (tmp_path / "store").exists() else [])


def test_keys_never_leave_the_store(tmp_path):
    (tmp_path / "secret.json").write_text('{"stolen": true}')
    storage = Storage(LocalBackend(tmp_path / "store"))
    for key in ("../secret.json", "/etc/passwd", "outputs/../../secret.json"):
        with pytest.raises(StorageError, match="would leave the store"):
            storage.get_json(key)
        with pytest.raises(StorageError, match="would leave the store"):
            storage.put_json(key, {})
    assert (tmp_path / "secret.json").read_text() == '{"stolen": true}'


@pytest.mark.parametrize("job_id", ["../../secret", "ftjob-0123456789ab/../../x", "ftjob-0123456789ab\n", "ftjob-xyz"])
def test_job_ids_that_become_storage_keys_must_look_like_job_ids(job_id):
    from ow_prefect.jobs.inference import resolve_model
    from ow_prefect.jobs.submit import outputs_key

    with pytest.raises(StorageError, match="is not a job id"):
        outputs_key(job_id)
    if job_id.startswith("ftjob-"):
        with pytest.raises(ValueError, match="is not a fine-tuning job id"):
            resolve_model(job_id)
    assert outputs_key("ftjob-0123456789ab-my_run") == "outputs/ftjob-0123456789ab-my_run.json"
    assert outputs_key("dataset_stats-0123456789ab") == "outputs/dataset_stats-0123456789ab.json"


def test_job_ids_and_result_paths_read_back_from_prefect_and_storage_are_checked(use_server, tmp_path):
    """Run tags and job outputs are records too: a run tagged with a path instead of a job id, and stored outputs
    naming a result file outside the download directory, are refused (with the run found through the SDK)."""
    from prefect import flow
    from prefect.client.orchestration import get_client
    from prefect.states import Completed

    from ow_prefect import OpenWeights
    from ow_prefect.jobs.submit import outputs_key

    @flow(name="ow-tampered")
    def tampered() -> None: ...

    ow = OpenWeights()
    result = ow.storage.put_bytes(b"result", "result")
    good_id = f"customjob-{uuid.uuid4().hex[:12]}"
    ow.storage.put_json(outputs_key(good_id), {"files": {"../escaped.txt": result.id, "ok.txt": result.id}})
    with get_client(sync_client=True) as client:
        for job_id in (good_id, "../../../secret"):
            client.create_flow_run(tampered, tags=["ow-job", f"ow-job:{job_id}", "ow-type:custom"], state=Completed())
    with pytest.raises(StorageError, match=r"'../../../secret' is not a job id"):
        ow.jobs.retrieve("../../../secret")
    with pytest.raises(StorageError, match=r"result file '../escaped.txt' is not a relative path.*nothing was written"):
        ow.jobs.download(good_id, tmp_path / "results")
    assert not (tmp_path / "escaped.txt").exists() and not (tmp_path / "results").exists()


def test_a_filesystem_block_tells_missing_from_unreachable():
    """Any other filesystem block (Prefect's RemoteFileSystem on fsspec: in memory, then over HTTP to a port where
    nothing listens): a missing path is NotFoundError, an outage a StorageError that names it, never "not in"."""
    from prefect.filesystems import RemoteFileSystem

    store = Storage(backend_for_block(RemoteFileSystem(basepath=f"memory://ow-{uuid.uuid4().hex[:8]}")))
    record = store.put_bytes(b"hello", "result")
    assert store.get_bytes(record.id) == b"hello" and store.exists(record.id)
    assert not store.exists("result:file-0123456789ab")
    with pytest.raises(NotFoundError):
        store.info("result:file-0123456789ab")

    down = Storage(backend_for_block(RemoteFileSystem(basepath="http://127.0.0.1:9/store")))
    with pytest.raises(StorageError, match="cannot read .*: ClientConnectorError: .*Connect call failed"):
        down.exists(record.id)
    with pytest.raises(StorageError, match="cannot read") as raised:
        down.info(record.id)
    assert not isinstance(raised.value, NotFoundError)


def test_s3_retries_are_botocores_own_sized_by_the_setting(s3_endpoint, monkeypatch):
    from prefect_aws import AwsCredentials, S3Bucket
    from prefect_aws.client_parameters import AwsClientParameters

    from ow_prefect.storage import attempts_for

    def backend(config=None):
        parameters = AwsClientParameters(endpoint_url=s3_endpoint, config=config)
        credentials = AwsCredentials(aws_access_key_id="t", aws_secret_access_key="t", aws_client_parameters=parameters)
        return backend_for_block(S3Bucket(bucket_name="ow-any", credentials=credentials))

    assert backend().client.meta.config.retries == {"mode": "standard", "total_max_attempts": 35}
    monkeypatch.setenv("OW_STORAGE_RETRY_SECONDS", "10")
    assert backend().client.meta.config.retries["total_max_attempts"] == attempts_for(10) == 6
    # a block that sets botocore's retries itself keeps them
    assert backend({"retries": {"mode": "adaptive", "total_max_attempts": 2}}).client.meta.config.retries == {
        "mode": "adaptive",
        "total_max_attempts": 2,
    }
