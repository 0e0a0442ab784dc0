"""`ow.files`: validation before storage, content-addressed ids, the async twin."""

import io
import json

import pytest

from ow_prefect import AsyncOpenWeights, DatasetValidationError, OpenWeights
from ow_prefect.settings import OWSettings
from ow_prefect.storage import LocalBackend, Storage

ROW = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}


@pytest.fixture
def ow(tmp_path):
    return OpenWeights(storage=Storage(LocalBackend(tmp_path / "store")))


def stored_files(tmp_path):
    return sorted(p.name for p in (tmp_path / "store").rglob("*") if p.is_file())


def test_create_from_bytes_path_and_file_object(ow, tmp_path):
    data = (json.dumps(ROW) + "\n").encode()
    path = tmp_path / "train.jsonl"
    path.write_bytes(data)
    a = ow.files.create(data, purpose="conversations")
    b = ow.files.create(path, purpose="conversations")
    with open(path, "rb") as f:
        c = ow.files.create(f, purpose="conversations")
    assert a.id == b.id == c.id and a["id"] == a.id
    assert ow.files.retrieve(a.id).bytes == len(data)
    assert ow.files.content(a.id) == data


def test_invalid_file_stores_nothing(ow, tmp_path):
    bad = b'{"messages": [{"role": "user", "content": "hi"}]}\n{"messages": 1}\n{broken\n'
    with pytest.raises(DatasetValidationError) as info:
        ow.files.create(io.BytesIO(bad), purpose="conversations")
    assert [p.split(":")[0] for p in info.value.problems] == ["line 2", "line 3"]
    assert not (tmp_path / "store").exists() or stored_files(tmp_path) == []


def test_validate_returns_rows_and_raises_with_all_problems(ow):
    assert ow.files.validate(((json.dumps(ROW) + "\n") * 3).encode(), "conversations") == 3
    with pytest.raises(DatasetValidationError):
        ow.files.validate(b"[]\n", "conversations")


def test_size_limit_is_a_setting(tmp_path):
    ow = OpenWeights(settings=OWSettings(max_file_mb=0.0001), storage=Storage(LocalBackend(tmp_path / "s")))
    with pytest.raises(DatasetValidationError, match="OW_MAX_FILE_MB"):
        ow.files.create(b"x" * 200, purpose="custom_job_file")


def test_upload_directory(ow, tmp_path):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "f.txt").write_text("x")
    record = ow.files.upload(tmp_path / "d", purpose="adapter")
    assert record.kind == "directory"
    assert (ow.files.download(record.id, tmp_path / "back") / "f.txt").read_text() == "x"


def test_bad_purpose(ow):
    with pytest.raises(ValueError, match="purpose"):
        ow.files.create(b"x", purpose="../etc")


async def test_async_twin(tmp_path):
    ow = AsyncOpenWeights(storage=Storage(LocalBackend(tmp_path / "store")))
    record = await ow.files.create((json.dumps(ROW) + "\n").encode(), purpose="conversations")
    assert (await ow.files.retrieve(record.id)).id == record.id
    with pytest.raises(DatasetValidationError):
        await ow.files.create(b"{}\n", purpose="conversations")
