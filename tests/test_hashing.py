from pathlib import Path

import pytest

from ow_prefect.hashing import canonical_json, code_hash, file_id, job_id
from ow_prefect.jobs.custom import CommandJob

PARAMS = {
    "entrypoint": "python x.py",
    "mounts": {"a.py": "custom_job_file:file-0123456789ab"},
    "requires_vram_gb": 0,
    "nested": {"b": 1, "a": [1, 2]},
}


def test_canonical_json_ignores_key_order():
    reordered = {
        "nested": {"a": [1, 2], "b": 1},
        "requires_vram_gb": 0,
        "mounts": {"a.py": "custom_job_file:file-0123456789ab"},
        "entrypoint": "python x.py",
    }
    assert canonical_json(PARAMS) == canonical_json(reordered)
    assert job_id("x", PARAMS, "c", "img") == job_id("x", reordered, "c", "img")


def test_job_id_format():
    jid = job_id("ftjob", PARAMS, "c", "img")
    prefix, digest = jid.split("-")
    assert prefix == "ftjob" and len(digest) == 12 and int(digest, 16) >= 0


@pytest.mark.parametrize(
    "change",
    [
        lambda p, c, i: ({**p, "entrypoint": "python y.py"}, c, i),
        lambda p, c, i: ({**p, "nested": {"b": 1, "a": [2, 1]}}, c, i),
        lambda p, c, i: ({**p, "requires_vram_gb": 1}, c, i),
        lambda p, c, i: (p, c + "0", i),
        lambda p, c, i: (p, c, i + ":2"),
    ],
    ids=["param", "list-order", "int", "code", "image"],
)
def test_any_change_changes_the_id(change):
    assert job_id("x", *change(PARAMS, "c", "img")) != job_id("x", PARAMS, "c", "img")


def test_code_hash_follows_file_bytes_and_names(tmp_path: Path):
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "a.py").write_text("x = 1\n")
    (tmp_path / "b.py").write_text("y = 2\n")
    first = code_hash(tmp_path, ["pkg", "b.py"])
    assert code_hash(tmp_path, ["b.py", "pkg"]) == first
    (tmp_path / "pkg" / "a.py").write_text("x = 2\n")
    second = code_hash(tmp_path, ["pkg", "b.py"])
    assert second != first
    (tmp_path / "pkg" / "a.py").rename(tmp_path / "pkg" / "c.py")
    assert code_hash(tmp_path, ["pkg", "b.py"]) != second
    with pytest.raises(FileNotFoundError):
        code_hash(tmp_path, ["missing.py"])


def test_job_code_change_changes_job_id(tmp_path, monkeypatch):
    params = CommandJob.flow_parameters(CommandJob.validate_params(entrypoint="true"))
    before = CommandJob.compute_id(params)
    (tmp_path / "flows").mkdir()
    for rel in CommandJob.code:
        (tmp_path / rel).write_text("changed\n")
    monkeypatch.setattr("ow_prefect.jobs.base.project_root", lambda: tmp_path)
    assert CommandJob.compute_id(params) != before


def test_file_id_format():
    assert file_id("conversations", "ab" * 32) == "conversations:file-abababababab"
