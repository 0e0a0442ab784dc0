"""The `ow` command line, through its installed entry point in subprocesses: against the session's real Prefect
server and `process` worker, Prefect's embedded mode, moto's S3 and FakeRunPod."""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from ow_prefect.testing.fake_runpod import FakeRunPod
from tests.helpers import eventually

OW = shutil.which("ow", path=str(Path(sys.executable).parent)) or "ow"

JOB = """
import json, os, pathlib
print("working in", os.path.basename(os.getcwd()), "with", sorted(os.listdir("data")))
pathlib.Path("uploads/answer.txt").write_text("42")
json.dump({"score": 0.5, "saw_dot_env": os.path.exists(".env")}, open(os.environ["OW_OUTPUTS"], "w"))
"""


def ow(*args: str, env: dict[str, str] | None = None, cwd: Path | None = None, stdin: str | None = None):
    return subprocess.run(
        [OW, *args], env=env or os.environ.copy(), cwd=cwd, input=stdin, capture_output=True, text=True, timeout=300
    )


@pytest.fixture
def server_env(prefect_api) -> dict[str, str]:
    return {**os.environ, "PREFECT_API_URL": prefect_api}


@pytest.fixture
def project(tmp_path) -> Path:
    """A directory like a user's project: a script, data, a secret in .env, and a cache."""
    folder = tmp_path / "project"
    (folder / "data").mkdir(parents=True)
    (folder / "job.py").write_text(JOB)
    (folder / "data" / "train.jsonl").write_text('{"text": "hi"}\n')
    (folder / ".env").write_text("SOME_TOKEN=not-for-the-job\n")
    (folder / "__pycache__").mkdir()
    return folder


def test_every_command_has_help(tmp_path):
    for command in ([], ["ls"], ["show"], ["cancel"], ["logs"], ["fetch"], ["files", "upload"], ["exec"], ["gpus"]):
        result = ow(*command, "--help")
        assert result.returncode == 0 and result.stdout.startswith("usage: ow"), (command, result.stderr)
    assert "--min-vram-gb" in ow("dev-pod", "--help").stdout
    setup_help = ow("setup", "--help")
    assert setup_help.stdout.startswith("usage: ow setup") and "RUNPOD_API_KEY" in setup_help.stdout


def test_help_does_not_import_prefect():
    code = "import sys\nfrom ow_prefect.cli import main\ntry:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
    code += "print('prefect' in sys.modules, 'torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip().endswith("False False")


def test_usage_errors_exit_2():
    assert ow().returncode == 2
    assert ow("nope").returncode == 2
    assert ow("ls", "--status", "sleeping").returncode == 2
    assert ow("cancel").returncode == 2


@pytest.mark.usefixtures("worker")
def test_exec_mounts_the_directory_waits_and_the_results_can_be_fetched(server_env, project, tmp_path):
    result = ow("exec", "python job.py", "--mount", ".", "--wait", env=server_env, cwd=project)
    assert result.returncode == 0, result.stderr
    outputs = json.loads(result.stdout)
    assert outputs["score"] == 0.5 and outputs["saw_dot_env"] is False
    job_id = re.search(r"customjob-[0-9a-f]{12}", result.stderr)[0]
    assert "working in" in result.stderr and "['train.jsonl']" in result.stderr, "the job's logs are streamed"

    assert job_id in ow("ls", env=server_env).stdout.split()
    assert job_id in ow("ls", "--status", "completed", "--type", "custom", env=server_env).stdout.split()
    assert job_id not in ow("ls", "--status", "failed", env=server_env).stdout.split()
    long = [line.split("\t") for line in ow("ls", "-l", env=server_env).stdout.splitlines()]
    assert [job_id, "completed", "custom"] in [row[:3] for row in long]
    assert "['train.jsonl']" in ow("logs", job_id, env=server_env).stdout

    fetched = ow("fetch", job_id, "-o", str(tmp_path / "results"), env=server_env)
    assert fetched.returncode == 0 and (tmp_path / "results" / "answer.txt").read_text() == "42"
    file_id = outputs["files"]["answer.txt"]
    assert ow("fetch", file_id, "-o", "-", env=server_env).stdout == "42"
    assert ow("fetch", file_id, env=server_env, cwd=tmp_path).stdout.strip() == "answer.txt"

    again = ow("exec", "python job.py", "--mount", ".", env=server_env, cwd=project)
    assert again.stdout.strip() == job_id, "the same directory and command are the same job"


@pytest.mark.usefixtures("worker")
def test_exec_exits_with_the_commands_code(server_env, tmp_path):
    result = ow("exec", "echo going down; exit 3", "--wait", env=server_env, cwd=tmp_path)
    assert result.returncode == 3, result.stderr
    summary = result.stderr[result.stderr.rindex("customjob-") :]
    assert re.match(r"customjob-\w+ failed: .*command exited with code 3; its last output:\ngoing down\n$", summary)


def test_exec_in_embedded_mode(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    (tmp_path / "hello.py").write_text("print('hello embedded')")
    result = ow("exec", "--mount", "hello.py", "--wait", "--", "python", "hello.py", env=env, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["files"] == {} and "hello embedded" in result.stderr
    assert ow("exec", "exit 4", "--wait", env=env, cwd=tmp_path).returncode == 4


def statuses(job_ids) -> set[str]:
    """The jobs' statuses, read in this process (the SDK): waiting on them through `ow ls` in a loop would start
    a Python process that imports Prefect every half second."""
    from ow_prefect import OpenWeights

    jobs = OpenWeights().jobs
    return {jobs.retrieve(job_id).status for job_id in job_ids}


@pytest.mark.usefixtures("worker", "use_server")
def test_ls_pipes_into_cancel(server_env, tmp_path):
    ids = [ow("exec", f"sleep 300 # {n} {os.getpid()}", env=server_env).stdout.strip() for n in (1, 2)]
    assert all(ids) and len(set(ids)) == 2

    # Running, not pending: a run a worker is starting can only be set to cancelling (see docs/cli.md).
    assert eventually(lambda: statuses(ids) == {"in_progress"}, timeout=120)
    assert set(ids) <= set(ow("ls", "--status", "in_progress", env=server_env).stdout.split())
    pipeline = f"{OW} ls --status in_progress | grep -F -e {ids[0]} -e {ids[1]} | {OW} cancel -"
    piped = subprocess.run(["bash", "-c", pipeline], env=server_env, capture_output=True, text=True, timeout=120)
    assert piped.returncode == 0, piped.stderr
    assert sorted(line.split("\t")[0] for line in piped.stdout.splitlines()) == sorted(ids)

    assert eventually(lambda: statuses(ids) == {"canceled"}, timeout=90)
    assert set(ids) <= set(ow("ls", "--status", "canceled", env=server_env).stdout.split())
    assert ow("cancel", "-", env=server_env, stdin="").returncode == 0
    unknown = ow("cancel", ids[0], "customjob-000000000000", env=server_env)
    assert unknown.returncode == 1 and "no job customjob-000000000000" in unknown.stderr
    assert unknown.stdout.startswith(f"{ids[0]}\tcanceled")


def test_logs_of_an_unknown_job_is_an_error_without_traceback(server_env):
    result = ow("logs", "customjob-000000000000", env=server_env)
    assert result.returncode == 1
    assert result.stderr.startswith("error: no job customjob-000000000000") and "Traceback" not in result.stderr
    assert "Traceback" in ow("--debug", "logs", "customjob-000000000000", env=server_env).stderr


LINES = "python -c \"for i in range({}, {}): print('line', i)\""


@pytest.mark.usefixtures("worker")
def test_logs_prints_every_line_and_follow_keeps_printing_until_the_job_ends(server_env, tmp_path):
    """1,100 lines are six of Prefect's pages of logs (200 each); -f prints lines that come later, each once."""
    command = f"{LINES.format(0, 1000)}; sleep 5; {LINES.format(1000, 1100)} # {os.getpid()}"
    job_id = ow("exec", command, env=server_env, cwd=tmp_path).stdout.strip()
    followed = ow("logs", "-f", job_id, env=server_env)
    assert followed.returncode == 0, followed.stderr
    numbers = [int(n) for n in re.findall(r" line (\d+)$", followed.stdout, re.MULTILINE)]
    assert sorted(numbers) == list(range(1100)), f"{len(numbers)} lines, {len(set(numbers))} different"
    printed = ow("logs", job_id, env=server_env).stdout
    assert [int(n) for n in re.findall(r" line (\d+)$", printed, re.MULTILINE)] == list(range(1100))


def test_an_unreachable_prefect_api_is_named_not_a_missing_job(tmp_path):
    from ow_prefect.testing.servers import free_port

    env = {**os.environ, "PREFECT_API_URL": f"http://127.0.0.1:{free_port()}/api"}
    for command in (["ls"], ["logs", "customjob-000000000000"], ["exec", "true"]):
        result = ow(*command, env=env, cwd=tmp_path)
        assert result.returncode == 1
        assert result.stderr.startswith(f"error: the Prefect API at {env['PREFECT_API_URL']} cannot be reached")
        assert "prefect server start" in result.stderr and "Traceback" not in result.stderr, result.stderr


def test_files_upload_names_every_bad_line(tmp_path):
    bad = tmp_path / "train.jsonl"
    bad.write_text('{"messages": [{"role": "user", "content": "hi"}]}\n{"messages": [{"role": "bot"}]}\nnot json\n')
    result = ow("files", "upload", str(bad), "--purpose", "conversations")
    assert result.returncode == 1 and result.stdout == ""
    assert "line 2: messages[0].role" in result.stderr and "line 3: invalid JSON" in result.stderr
    assert "Traceback" not in result.stderr

    bad.write_text('{"messages": [{"role": "user", "content": "hi"}]}\n')
    good = ow("files", "upload", str(bad), "--purpose", "conversations")
    assert good.returncode == 0 and good.stdout.strip().startswith("conversations:file-")
    (tmp_path / "folder").mkdir()
    (tmp_path / "folder" / "a.bin").write_bytes(b"\0\1")
    assert ow("files", "upload", str(tmp_path / "folder"), "--purpose", "adapter").stdout.startswith("adapter:dir-")


def test_setup_creates_blocks_and_pools_once_and_prints_no_secret(server_env, s3_endpoint, tmp_path):
    import boto3

    secrets = {"RUNPOD_API_KEY": "rpa_setup_secret_1234", "HF_TOKEN": "hf_setup_secret_5678"}
    secrets["AWS_SECRET_ACCESS_KEY"] = "aws-setup-secret-9012"
    boto3.client(
        "s3", endpoint_url=s3_endpoint, aws_access_key_id="k", aws_secret_access_key="s", region_name="us-east-1"
    ).create_bucket(Bucket="ow-setup")
    settings = {
        **secrets,
        "AWS_ACCESS_KEY_ID": "setup-key-id",
        "AWS_ENDPOINT_URL": s3_endpoint,
        "AWS_DEFAULT_REGION": "us-east-1",
        "OW_S3_BUCKET": "ow-setup",
        "OW_HF_TOKEN_SECRET": "cli-setup-hf-token",
        "OW_RUNPOD_BLOCK": "cli-setup-runpod",
        "OW_STORAGE_BLOCK": "s3-bucket/cli-setup-storage",
        "RUNPOD_API_URL": "http://127.0.0.1:9/v2",
    }
    (tmp_path / ".env").write_text("".join(f"{k}={v}\n" for k, v in settings.items()))
    env = {k: v for k, v in server_env.items() if k not in settings}
    args = ("setup", "--local-pool", "setup-local", "--pool", "setup-gpu")
    first = ow(*args, env=env, cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    assert "work pool 'setup-local' (type process): created" in first.stdout
    assert "work pool 'setup-gpu' (type runpod): created" in first.stdout
    assert (
        "runpod-credentials/cli-setup-runpod: created" in first.stdout
        and "s3-bucket/cli-setup-storage: created" in first.stdout
    )
    assert "warning" not in first.stdout
    second = ow(*args, env=env, cwd=tmp_path)
    assert second.returncode == 0, second.stderr
    assert "(type process): unchanged" in second.stdout and "(type runpod): updated" in second.stdout
    assert "runpod-credentials/cli-setup-runpod: unchanged" in second.stdout
    for secret in secrets.values():
        assert secret not in first.stdout + first.stderr + second.stdout + second.stderr

    from prefect.blocks.system import Secret
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings
    from prefect_aws import S3Bucket

    from ow_prefect.runpod.credentials import RunPodCredentials

    with temporary_settings(updates={PREFECT_API_URL: server_env["PREFECT_API_URL"]}):
        assert Secret.load("cli-setup-hf-token", _sync=True).get() == secrets["HF_TOKEN"]
        credentials = RunPodCredentials.load("cli-setup-runpod", _sync=True)
        assert credentials.api_key.get_secret_value() == secrets["RUNPOD_API_KEY"]
        assert S3Bucket.load("cli-setup-storage", _sync=True).bucket_name == "ow-setup"
        with get_client(sync_client=True) as client:
            assert client.read_work_pool("setup-gpu").type == "runpod"
            assert client.read_work_pool("setup-local").type == "process"


def test_setup_without_a_reachable_bucket_warns(server_env, s3_endpoint, tmp_path):
    settings = {
        "AWS_ACCESS_KEY_ID": "k",
        "AWS_SECRET_ACCESS_KEY": "s",
        "AWS_ENDPOINT_URL": s3_endpoint,
        "OW_S3_BUCKET": "no-such-bucket",
    }
    (tmp_path / ".env").write_text("".join(f"{k}={v}\n" for k, v in settings.items()))
    env = {k: v for k, v in server_env.items() if k not in ("RUNPOD_API_KEY", "HF_TOKEN", "OPENAI_API_KEY")}
    (tmp_path / ".env").write_text((tmp_path / ".env").read_text() + "OW_STORAGE_BLOCK=s3-bucket/setup-missing\n")
    result = ow("setup", "--local-pool", "setup-local", env=env, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "warning: bucket 'no-such-bucket' is not reachable" in result.stdout
    assert "no credentials: its deployments register" in result.stdout  # the `gpu` pool exists for deploy --all


def test_dev_pod_runs_through_ow():
    with FakeRunPod(api_key="cli-dev-key", boot_seconds=0.3) as fake:
        env = {**os.environ, "RUNPOD_API_KEY": "cli-dev-key", "RUNPOD_API_URL": fake.url}
        result = ow("dev-pod", "--image", "ghcr.io/me/dev:1", "--hours", "0.001", env=env)
        assert result.returncode == 0, result.stdout + result.stderr
        (pod,) = fake.pods.values()
        assert pod.deleted_at is not None and "deleted after" in result.stdout
        assert "cli-dev-key" not in result.stdout + result.stderr


def test_show_prints_the_cost_of_a_job_a_runpod_pod_ran(server_env, prefect_client, runpod_pool, runpod_worker, fake):
    """`ow exec` on a `runpod` pool (FakeRunPod): `ow show` prints the worker's cost artifact of the run."""
    from tests.runpod_support import deploy

    deploy(prefect_client, runpod_pool, "run-cli-cost", entrypoint="flows/custom.py:custom_run")
    env = {**server_env, "OW_DEPLOYMENT_SUFFIX": "-cli-cost"}
    result = ow("exec", f"echo on a pod {os.getpid()}", "--wait", env=env)
    assert result.returncode == 0, result.stderr
    job_id = re.search(r"customjob-[0-9a-f]{12}", result.stderr)[0]

    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    flow_run_id = json.loads(ow("show", job_id, "--json", env=env).stdout)["flow_run_id"]
    cost_key = ArtifactFilter(key=ArtifactFilterKey(any_=[f"runpod-cost-{flow_run_id}"]))
    assert eventually(lambda: prefect_client.read_artifacts(artifact_filter=cost_key), timeout=60)  # in this process
    out = ow("show", job_id, env=env).stdout
    assert "cost:" in out, out
    assert re.search(r"\$\d+\.\d{4} on RunPod: 1 pod\(s\), 1x NVIDIA RTX A6000 \(SECURE\), \d+ s billed", out), out
    as_json = json.loads(ow("show", job_id, "--json", env=env).stdout)
    (row,) = as_json["cost"]
    assert row["pod"] in fake.pods and row["cost_usd"] > 0 and as_json["status"] == "completed"
