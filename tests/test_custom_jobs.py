"""Custom job types (`ow_prefect.CustomJob`) and local mounts of the built-in `custom` type: parameters,
mounts, identity and uploads without a server; then end to end on a real server with a `process` worker."""

import hashlib
import importlib.util
import os
import re
import shutil
import sys
from pathlib import Path

import pytest
from pydantic import BaseModel, ConfigDict

from ow_prefect import CustomJob, OpenWeights, ParameterError, register
from ow_prefect.jobs.submit import job_tag, type_tag
from ow_prefect.storage import LocalBackend, Storage
from tests.conftest import ROOT
from tests.helpers import eventually
from tests.test_server import count_runs

EXAMPLE = ROOT / "examples" / "custom_job"

REPORT = """
import json, os, pathlib
params = json.loads(pathlib.Path(os.environ["OW_PARAMS"]).read_text())
words = sum(len(p.read_text().split()) for p in sorted(pathlib.Path("corpus").rglob("*.txt")))
print("counted", words, "words for", params["label"])
pathlib.Path("uploads/nested").mkdir(parents=True)
pathlib.Path("uploads/nested/count.txt").write_text(str(words))
json.dump({"words": words, "label": params["label"]}, open(os.environ["OW_OUTPUTS"], "w"))
"""


class CountingBackend(LocalBackend):
    """Local storage that remembers every key it wrote."""

    def __init__(self, root: Path):
        super().__init__(root)
        self.written: list[str] = []

    def put_bytes(self, key: str, data: bytes) -> None:
        self.written.append(key)
        super().put_bytes(key, data)

    def put_file(self, key: str, path: Path) -> None:
        self.written.append(key)
        super().put_file(key, path)


class WordsParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    label: str
    requires_vram_gb: int | None = None


def words_job_type(src: Path, mount_target: str = "corpus"):
    """A job type mounting `src/report.py` and the directory `src/corpus` (absolute paths, as OpenWeights does)."""

    @register("count_words")
    class CountWords(CustomJob):
        mount = {str(src / "report.py"): "report.py", str(src / "corpus"): mount_target}
        params = WordsParams
        requires_vram_gb = 8

        def get_entrypoint(self, validated_params: WordsParams) -> str:
            return f"python report.py  # {validated_params.label}"

    return CountWords


@pytest.fixture
def src(tmp_path) -> Path:
    folder = tmp_path / "src"
    (folder / "corpus" / "more").mkdir(parents=True)
    (folder / "report.py").write_text(REPORT)
    (folder / "corpus" / "a.txt").write_text("one two three")
    (folder / "corpus" / "more" / "b.txt").write_text("four five")
    return folder


@pytest.fixture
def counting(tmp_path) -> OpenWeights:
    return OpenWeights(storage=Storage(CountingBackend(tmp_path / "store")))


def test_params_are_validated_before_anything_is_uploaded(src, counting):
    words_job_type(src)
    with pytest.raises(ParameterError, match=r"'count_words':\n  - lable: Extra inputs are not permitted"):
        counting.count_words.create(label="x", lable="typo")
    with pytest.raises(ParameterError, match=r"label: Field required"):
        counting.count_words.validate()
    assert counting.storage.backend.written == []


@pytest.mark.parametrize("target", ["../outside", "/etc", "a/../../b", ""])
def test_mount_targets_that_escape_the_work_dir_are_rejected(src, counting, target):
    words_job_type(src, mount_target=target)
    with pytest.raises(ParameterError, match=r"mount\['.*corpus'\]: mount target .* escapes the work dir"):
        counting.count_words.validate(label="x")
    assert counting.storage.backend.written == []


def test_a_missing_mounted_file_is_named(src, counting):
    words_job_type(src)
    (src / "report.py").unlink()
    with pytest.raises(ParameterError, match=r"report.py'\]: '.*report.py' does not exist"):
        counting.count_words.validate(label="x")


def test_job_id_follows_the_mounted_content_not_its_location(src, counting, tmp_path):
    words_job_type(src)
    first = counting.count_words.validate(label="a")
    written = list(counting.storage.backend.written)
    assert first.startswith("count_words-") and written
    assert counting.count_words.validate(label="a") == first
    assert counting.storage.backend.written == written, "unchanged files are not uploaded again"

    copy = shutil.copytree(src, tmp_path / "elsewhere")
    words_job_type(copy)
    assert counting.count_words.validate(label="a") == first
    assert counting.storage.backend.written == written

    (copy / "corpus" / "more" / "b.txt").write_text("four five six")
    changed = counting.count_words.validate(label="a")
    assert changed != first
    new = counting.storage.backend.written[len(written) :]
    assert [key.split("/")[0] for key in new] == ["blobs", "files"], "only the changed file and the dir record"
    assert counting.count_words.validate(label="b") != changed, "the params are part of the id"


def test_the_image_is_part_of_the_id(src, counting):
    job_cls = words_job_type(src)
    before = counting.count_words.validate(label="a")
    job_cls.base_image = "ghcr.io/me/other:1"
    assert counting.count_words.validate(label="a") != before


def test_mounted_directories_leave_out_caches_and_dot_env(src, counting):
    (src / "corpus" / ".env").write_text("RUNPOD_API_KEY=secret")
    (src / "corpus" / "__pycache__").mkdir()
    (src / "corpus" / "__pycache__" / "x.pyc").write_bytes(b"\0")
    (src / "corpus" / ".git").mkdir()
    (src / "corpus" / ".git" / "HEAD").write_text("ref")
    job_cls = words_job_type(src)
    params = job_cls.prepare_params({"label": "a"}, counting.storage)
    record = counting.storage.info(params["mounts"]["corpus"])
    assert [e.path for e in record.entries] == ["a.txt", "more/b.txt"]


def test_the_flow_parameters_and_gpu_memory(src, counting):
    job_cls = words_job_type(src)
    sub = counting.jobs._prepare(job_cls, {"label": "a"})
    assert sub.parameters["entrypoint"] == "python report.py  # a"
    assert sub.parameters["params"] == {"label": "a", "requires_vram_gb": None}
    assert set(sub.parameters["mounts"]) == {"report.py", "corpus"}
    assert sub.parameters["mounts"]["corpus"].startswith("custom:dir-")
    assert sub.parameters["ow_job"]["type"] == "count_words"
    assert job_cls.job_variables(sub.validated) == {"min_vram_gb": 8}
    wants_more = counting.jobs._prepare(job_cls, {"label": "a", "requires_vram_gb": 40})
    assert job_cls.job_variables(wants_more.validated) == {"min_vram_gb": 40}


def test_get_entrypoint_must_return_a_command(counting):
    @register("no_command")
    class NoCommand(CustomJob):
        def get_entrypoint(self, validated_params):
            return ""

    with pytest.raises(ParameterError, match="get_entrypoint returned ''"):
        counting.no_command.validate()


def test_builtin_custom_mounts_local_paths_like_uploaded_files(src, counting):
    uploaded = counting.storage.put_path(src / "report.py", "custom").id
    by_id = counting.custom.validate(entrypoint="python report.py", mounts={"report.py": uploaded})
    by_path = counting.custom.validate(entrypoint="python report.py", mounts={"report.py": src / "report.py"})
    assert by_id == by_path
    with pytest.raises(ParameterError, match=r"mounts\['\.\./x'\]: mount target '\.\./x' escapes"):
        counting.custom.validate(entrypoint="true", mounts={"../x": str(src / "report.py")})
    with pytest.raises(ParameterError, match=r"mounts\['a'\]: 'nope' does not exist"):
        counting.custom.validate(entrypoint="true", mounts={"a": "nope"})


# ---- end to end: a real Prefect server and a `process` worker ----------------------------------------------


def _load_example():
    spec = importlib.util.spec_from_file_location("dataset_stats_example", EXAMPLE / "dataset_stats.py")
    module = sys.modules[spec.name] = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.usefixtures("worker", "use_server")
def test_the_example_job_type_end_to_end(tmp_path):
    _load_example()
    ow = OpenWeights()
    job = ow.dataset_stats.create(min_messages=2)
    assert job.type == "dataset_stats" and job.id.startswith("dataset_stats-")
    job = job.wait(timeout=120, poll_interval=0.5)
    assert {k: job.outputs[k] for k in ("rows", "conversations", "messages")} == {
        "rows": 3,
        "conversations": 2,
        "messages": 5,
    }
    assert (job.download(tmp_path / "out") / "report.md").read_text().startswith("# Report\n\n2 of 3 conversations")
    assert job.params["params"] == {"min_messages": 2}
    assert eventually(lambda: "read 3 rows; 2 have at least 2 messages" in job.logs())

    again = ow.dataset_stats.create(min_messages=2)
    assert (again.id, again.flow_run_id) == (job.id, job.flow_run_id)
    assert count_runs(job.id) == 1
    with ow.prefect_client() as client:
        tags = client.read_flow_run(job.flow_run_id).tags
    assert job_tag(job.id) in tags and type_tag("dataset_stats") in tags and type_tag("custom") not in tags
    assert [j.id for j in ow.jobs.list(type="dataset_stats")] == [job.id]


@pytest.mark.usefixtures("worker", "use_server")
def test_params_mounted_directory_and_uploads_on_the_worker(src, tmp_path):
    words_job_type(src)
    ow = OpenWeights()
    job = ow.count_words.create(label="e2e").wait(timeout=120, poll_interval=0.5)
    assert job.outputs["words"] == 5 and job.outputs["label"] == "e2e"
    assert set(job.outputs["files"]) == {"nested/count.txt"}
    assert (job.download(tmp_path / "out") / "nested" / "count.txt").read_text() == "5"

    (src / "corpus" / "a.txt").write_text("one two three four")
    changed = ow.count_words.create(label="e2e")
    assert changed.id != job.id and changed.flow_run_id != job.flow_run_id
    assert changed.wait(timeout=120, poll_interval=0.5).outputs["words"] == 6
    assert changed.params["mounts"]["corpus"] != job.params["mounts"]["corpus"]


@pytest.mark.usefixtures("worker", "use_server")
def test_a_command_gets_its_env_and_secrets_and_none_of_the_workers_credentials():
    """On a process pool the flow's process has the worker's whole environment (tests/conftest.WORKER_SECRETS);
    the command it runs has the machine's plain settings, its own variables, `env` and `secrets`, and no more."""
    from prefect.blocks.system import Secret

    from tests.conftest import WORKER_SECRETS

    Secret(value="hf_JOB_SECRET_0a1b2c3d4e").save("ow-test-custom-hf", overwrite=True, _sync=True)
    ow = OpenWeights()
    command = 'env | sort | sed "s/^HF_TOKEN=.*/HF_TOKEN=(set)/"; printf %s "$HF_TOKEN" | sha256sum'
    job = ow.custom.create(entrypoint=command, env={"MY_SETTING": "plain"}, secrets={"HF_TOKEN": "ow-test-custom-hf"})
    job = job.wait(timeout=120, poll_interval=0.5)
    digest = hashlib.sha256(b"hf_JOB_SECRET_0a1b2c3d4e").hexdigest()
    printed = eventually(lambda: digest in (logs := job.logs()) and logs, timeout=30)  # logs arrive in batches
    variables = dict(re.findall(r"^\S+ ([A-Za-z_][A-Za-z0-9_]*)=(.*)$", printed, re.MULTILINE))  # time NAME=value
    assert variables["MY_SETTING"] == "plain" and variables["OW_JOB_ID"] == job.id and "PATH" in variables
    assert variables["HF_TOKEN"] == "(set)", "the job's secret, from its Secret block"
    assert not set(variables) & {"RUNPOD_API_KEY", "AWS_SECRET_ACCESS_KEY", "PREFECT_API_KEY", "PREFECT_API_URL"}
    assert not any(secret in printed for secret in WORKER_SECRETS.values()), printed


def test_env_and_secrets_names_are_checked(counting):
    with pytest.raises(ParameterError, match=r"env: .*'OW_JOB_ID' is not a variable the command can be given"):
        counting.custom.validate(entrypoint="true", env={"OW_JOB_ID": "x"})
    with pytest.raises(ParameterError, match=r"secrets: .*'1X' is not a variable"):
        counting.custom.validate(entrypoint="true", secrets={"1X": "block"})
    with pytest.raises(ParameterError, match=r"\['A'\] set in both env and secrets"):
        counting.custom.validate(entrypoint="true", env={"A": "1"}, secrets={"A": "block"})
    plain = counting.custom.validate(entrypoint="true")
    assert counting.custom.validate(entrypoint="true", secrets={"HF_TOKEN": "hf-token"}) != plain


def test_the_command_environment_is_an_allow_list(monkeypatch, use_server):
    from flows.custom import command_env
    from ow_prefect.errors import ConfigurationError

    for name, value in {"PATH": "/bin", "LC_ALL": "C", "CUDA_VISIBLE_DEVICES": "0", "RUNPOD_POD_ID": "p1"}.items():
        monkeypatch.setenv(name, value)
    for name in ("RUNPOD_API_KEY", "PREFECT_API_AUTH_STRING", "AWS_ACCESS_KEY_ID", "HF_TOKEN", "OPENAI_API_KEY"):
        monkeypatch.setenv(name, "secret")
    env = command_env({"env": {"A": "1"}, "secrets": {}}, {"OW_JOB_ID": "customjob-0123456789ab"})
    assert {"PATH", "LC_ALL", "CUDA_VISIBLE_DEVICES", "RUNPOD_POD_ID", "A", "OW_JOB_ID"} <= set(env)
    assert "secret" not in env.values()
    with pytest.raises(ConfigurationError, match=r"secrets\['X'\]: Secret block 'ow-no-such-block' cannot be loaded"):
        command_env({"env": {}, "secrets": {"X": "ow-no-such-block"}}, {})


def test_openweights_spelling_subclassing_job_makes_a_custom_job_type(src, counting):
    from ow_prefect import Job

    @register("count_words_ow")
    class CountWordsOW(Job):  # as OpenWeights users write it: no deployment of its own
        mount = {str(src / "report.py"): "report.py"}
        params = WordsParams

        def get_entrypoint(self, validated_params: WordsParams) -> str:
            return f"python report.py  # {validated_params.label}"

    assert issubclass(CountWordsOW, CustomJob) and CountWordsOW.deployment == "custom/run"
    assert CountWordsOW.__name__ == "CountWordsOW" and CountWordsOW.__module__ == __name__
    first = counting.count_words_ow.validate(label="a")
    assert first == counting.count_words_ow.validate(label="a") != counting.count_words_ow.validate(label="b")


LOGS_FILES = """
import os, pathlib, json
from ow_prefect import OpenWeights

ow = OpenWeights()
pathlib.Path("plot.txt").write_text("a plot, {marker}")
ow.run.log({{"step": 1}}, file=open("plot.txt", "rb"))
ow.run.log({{"step": 2}}, file=b"raw bytes, {marker}")
# Lines naming a file the command did not leave through ow.run.log: never stored.
spool = pathlib.Path(os.environ["OW_WORK_DIR"]) / ".ow_run_log_files"
spool.mkdir(exist_ok=True)
(spool / ("0" * 32)).symlink_to(pathlib.Path("plot.txt").resolve())
with open(os.environ["OW_RUN_LOG"], "a") as log:
    log.write(json.dumps({{"data": {{"step": 3}}, "spooled": "0" * 32}}) + "\\n")
    log.write(json.dumps({{"data": {{"step": 4}}, "spooled": "../plot.txt"}}) + "\\n")
"""


def test_files_the_command_logs_are_stored_by_the_flow_in_storage_the_command_cannot_reach(
    s3_endpoint, monkeypatch, tmp_path
):
    """The job's storage is S3 (OW_STORAGE_BLOCK, here in the process running the flow); the command gets neither
    OW_STORAGE_BLOCK nor AWS keys (flows/custom.py `command_env`), so `ow.run.log(file=...)` leaves its file for
    the flow, which stores it there: readable the upstream way, `ow.files.content(event["file"])`."""
    import uuid

    import boto3

    from blocks.storage import save_s3_storage
    from ow_prefect.errors import NotFoundError
    from ow_prefect.settings import get_settings

    bucket = f"ow-run-log-{uuid.uuid4().hex[:8]}"
    boto3.client(
        "s3", endpoint_url=s3_endpoint, aws_access_key_id="k", aws_secret_access_key="s", region_name="us-east-1"
    ).create_bucket(Bucket=bucket)
    slug = save_s3_storage(
        bucket, bucket, endpoint_url=s3_endpoint, access_key_id="k", secret_access_key="s", region="us-east-1"
    )
    monkeypatch.setenv("OW_STORAGE_BLOCK", slug)
    monkeypatch.setenv("PATH", f"{Path(sys.executable).parent}:{os.environ['PATH']}")  # a python with ow_prefect
    marker = uuid.uuid4().hex
    (tmp_path / "log_files.py").write_text(LOGS_FILES.format(marker=marker))
    ow = OpenWeights()
    job = ow.custom.create(entrypoint="python log_files.py", mounts={"log_files.py": str(tmp_path / "log_files.py")})
    assert job.status == "completed", job.error
    assert job.outputs["step"] == 4 and job.outputs["files"] == {}, "spooled files are not results"

    logged = eventually(
        lambda: len(events := [e for e in ow.events.list(job_id=job.id) if e["event"] == "ow.run.log"]) == 4 and events
    )
    assert [e["data"]["step"] for e in logged] == [1, 2, 3, 4]
    plot, raw, linked, escaping = (e["file"] for e in logged)
    assert ow.files.content(plot) == f"a plot, {marker}".encode() and ow.files.retrieve(plot).filename == "plot.txt"
    assert ow.files.content(raw) == f"raw bytes, {marker}".encode() and raw.startswith("event:")
    assert linked is None and escaping is None, "a link or a path the command made up is not stored"
    local = Storage(LocalBackend(get_settings().local_storage_dir))  # the store the command's own client has
    with pytest.raises(NotFoundError):
        local.get_bytes(plot)
