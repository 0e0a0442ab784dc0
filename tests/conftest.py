"""Shared fixtures: isolated homes, a real Prefect server and process worker, moto's S3.

Prefect's home is set before Prefect is imported, so the embedded (ephemeral) tests never touch the
developer's own ~/.prefect.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

_SESSION_DIR = Path(tempfile.mkdtemp(prefix="ow-tests-"))
os.environ["PREFECT_HOME"] = str(_SESSION_DIR / "prefect-embedded")
os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
os.environ["PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"] = "120"
os.environ.pop("PREFECT_API_URL", None)
os.environ.pop("OW_STORAGE_BLOCK", None)
# The vLLM environment is found the way users find it (OW_VLLM_PYTHON, else under the real OW_HOME), before
# OW_HOME moves to a throwaway directory for everything else.
from ow_prefect.settings import get_settings  # noqa: E402

os.environ["OW_VLLM_PYTHON"] = str(get_settings().vllm_interpreter)
os.environ["OW_HOME"] = str(_SESSION_DIR / "ow-home")
# Nothing can reach the Hub here: fail fast instead of waiting on connection time-outs.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TOKENIZERS_PARALLELISM"] = "false"

import pytest  # noqa: E402

from ow_prefect.testing.servers import moto_s3, prefect_server, prefect_worker  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
POOL = "ow-test-local"
# Fixtures of the RunPod worker tests (FakeRunPod, a `runpod` pool and worker per module).
pytest_plugins = ["tests.runpod_support"]


@pytest.fixture(scope="session")
def session_dir() -> Path:
    return _SESSION_DIR


@pytest.fixture(scope="session")
def prefect_api(session_dir: Path):
    """A real Prefect server (SQLite, loopback) for the whole session."""
    with prefect_server(session_dir / "prefect-server") as url:
        yield url


@pytest.fixture
def use_server(prefect_api):
    """Point this test's Prefect client at the session server (server mode of the SDK)."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings(updates={PREFECT_API_URL: prefect_api}):
        yield prefect_api


@pytest.fixture(scope="session")
def deployed(prefect_api):
    """prefect.yaml's deployments on a process pool, registered through deployments.register."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from deployments.register import register

    with temporary_settings(updates={PREFECT_API_URL: prefect_api}):
        return register(pool=POOL, create_pool="process")


# Credentials in the process worker's environment, as an operator's machine has them: the flows it runs inherit
# them (Prefect's process worker passes on its whole environment); the commands of custom jobs must not.
WORKER_SECRETS = {
    "RUNPOD_API_KEY": "rpa_WORKER_SECRET_5e4d3c2b1a",
    "AWS_SECRET_ACCESS_KEY": "aws_WORKER_SECRET_9a8b7c6d5e",
    "HF_TOKEN": "hf_WORKER_SECRET_1f2e3d4c5b",
    "PREFECT_API_KEY": "pnu_WORKER_SECRET_6a5b4c3d2e",
}


@pytest.fixture(scope="session")
def worker(prefect_api, deployed, session_dir: Path):
    """A real `process` worker polling the test pool every second (with `WORKER_SECRETS` in its environment)."""
    env = {"OW_HOME": os.environ["OW_HOME"], "PREFECT_HOME": str(session_dir / "prefect-worker"), **WORKER_SECRETS}
    with prefect_worker(prefect_api, POOL, "process", env, session_dir / "worker.log") as proc:
        yield proc


@pytest.fixture(scope="session")
def s3_endpoint():
    with moto_s3() as url:
        yield url


@pytest.fixture(scope="session", autouse=True)
def _stop_ephemeral_server():
    """Stop Prefect's ephemeral server while pytest still owns the log streams (quiet exit)."""
    yield
    import sys

    if "prefect.server.api.server" in sys.modules:
        from prefect._internal.concurrency.services import QueueService
        from prefect.server.api.server import SubprocessASGIServer

        QueueService.drain_all(timeout=10)

        for server in list(SubprocessASGIServer._instances.values()):
            server.stop()


@pytest.fixture
def script_file():
    """Upload a Python script as a custom-job file; returns its id."""
    from ow_prefect import OpenWeights

    def upload(source: str) -> str:
        return OpenWeights().files.create(source.encode(), purpose="custom_job_file").id

    return upload


@pytest.fixture(scope="session")
def tiny_model(session_dir: Path) -> Path:
    """A tiny Qwen2-style model and tokenizer built locally (no hub), shared by the session."""
    from ow_prefect.testing.tiny_model import build_tiny_model

    return build_tiny_model(session_dir / "tiny-model")


@pytest.fixture(scope="session")
def datasets_dir(session_dir: Path) -> Path:
    from ow_prefect.testing.tiny_model import sample_conversations, sample_preferences, write_jsonl

    folder = session_dir / "datasets"
    folder.mkdir(exist_ok=True)
    write_jsonl(sample_conversations(), folder / "conversations.jsonl")
    write_jsonl(sample_preferences(), folder / "preference.jsonl")
    return folder


@pytest.fixture(scope="session")
def trained_adapter(tiny_model, datasets_dir):
    """A fine-tuning job (embedded) whose LoRA adapter learned the arithmetic answers: greedy decoding says
    "The answer is ..." and ends its turn. Shared by the inference and serving tests."""
    from ow_prefect import OpenWeights
    from ow_prefect.testing.tiny_model import sample_conversations, write_jsonl

    previous = os.environ.get("OW_TRAIN_BACKEND")
    os.environ["OW_TRAIN_BACKEND"] = "transformers"
    try:
        ow = OpenWeights()
        data = ow.files.upload(write_jsonl(sample_conversations(256), datasets_dir / "answers.jsonl"), "conversations")
        job = ow.fine_tuning.create(
            model=str(tiny_model),
            training_file=data.id,
            max_steps=120,
            r=16,
            lora_alpha=32,
            learning_rate=4e-3,
            per_device_train_batch_size=16,
            gradient_accumulation_steps=1,
            merge_before_push=False,
            save_steps=60,  # checkpoints at 60 and 120: inference loads one
        )
    finally:
        if previous is None:
            os.environ.pop("OW_TRAIN_BACKEND", None)
        else:
            os.environ["OW_TRAIN_BACKEND"] = previous
    assert job.status == "completed", job.error
    return job
