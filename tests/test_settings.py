"""Settings (ow_prefect/settings.py): every OW_* setting is a field of OWSettings, read once per process, `.env`
honoured for all of them."""

import os
import re
from pathlib import Path

import pytest

from ow_prefect.settings import OWSettings, get_settings, refresh_settings

ROOT = Path(__file__).resolve().parents[1]
# OW_* variables that are read from the environment on purpose, not settings (each place says why)
RUN_CONTEXT = {
    "ow_prefect/run_log.py": {"OW_RUN_LOG", "OW_FLOW_RUN_ID", "OW_JOB_ID"},  # set by the flow for its command
    "flows/finetune/backends.py": {"OW_TRAIN_BACKEND"},  # only where ow_prefect is not installed (the GPU kit)
    # the warm pod's agent: its pod's env as the worker wrote it (the pool marker; a job's `env` may set the poll);
    # it imports neither Prefect nor the settings
    "ow_prefect/runpod/agent.py": {"OW_WORK_POOL_ID", "OW_AGENT_POLL_SECONDS"},
}


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    """A working directory of its own (its `.env` is the one read), with no OW_* variable set."""
    for name in [n for n in os.environ if n.upper().startswith("OW_")]:
        monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_settings_are_read_once_and_dotenv_is_not_read_again(workdir):
    (workdir / ".env").write_text("OW_OPENAI_CONCURRENCY=7\n")
    first = get_settings()
    assert first.openai_concurrency == 7
    (workdir / ".env").write_text("OW_OPENAI_CONCURRENCY=9\n")
    assert get_settings() is first, "the poll loops call get_settings(): it must not read .env every time"
    assert refresh_settings().openai_concurrency == 9  # a long-running process that wants the edit asks for it


def test_a_variable_set_in_the_process_is_seen_at_once(workdir, monkeypatch):
    (workdir / ".env").write_text("OW_HF_ORG=from-dotenv\n")
    assert get_settings().hf_org == "from-dotenv"
    monkeypatch.setenv("OW_HF_ORG", "from-env")  # the environment wins over .env, and is not cached stale
    assert get_settings().hf_org == "from-env"


def test_settings_are_frozen(workdir):
    with pytest.raises(ValueError, match="frozen"):
        get_settings().openai_concurrency = 3


def test_dotenv_applies_to_the_settings_that_used_to_bypass_it(workdir):
    from flows._runtime import hf_token_secret
    from flows.finetune.backends import backend_setting
    from ow_prefect.jobs.finetune import client_hf_org

    (workdir / ".env").write_text(
        "OW_HF_ORG=lab\nOW_HF_TOKEN_SECRET=team-hf\nOW_OPENAI_KEY_SECRET=team-openai\nOW_OPENAI_CONCURRENCY=5\n"
        "OW_TRAIN_BACKEND=transformers\nOW_API_HEARTBEAT_SECONDS=0.5\nOW_API_STARTUP_TIMEOUT_SECONDS=60\n"
    )
    settings = refresh_settings()
    assert client_hf_org() == "lab" and hf_token_secret() == "team-hf" and backend_setting() == "transformers"
    assert (settings.openai_key_secret, settings.openai_concurrency) == ("team-openai", 5)
    assert (settings.api_heartbeat_seconds, settings.api_startup_timeout_seconds) == (0.5, 60)


def test_a_bad_value_names_the_setting(workdir, monkeypatch):
    monkeypatch.setenv("OW_TRAIN_BACKEND", "tensorflow")
    with pytest.raises(ValueError, match="train_backend"):
        get_settings()


def test_exported_passes_on_only_what_was_set(workdir, monkeypatch):
    (workdir / ".env").write_text("OW_HF_ORG=lab\n")
    monkeypatch.setenv("OW_STORAGE_RETRY_SECONDS", "30")
    names = ("OW_HF_TOKEN_SECRET", "OW_HF_ORG", "OW_STORAGE_RETRY_SECONDS")
    assert get_settings().exported(names) == {"OW_HF_ORG": "lab", "OW_STORAGE_RETRY_SECONDS": "30.0"}


def ow_variables_read_from_the_environment(path: Path) -> set[str]:
    source = path.read_text()
    pattern = r"""(?:environ\.get|environ\[|getenv)\(?\s*["'](OW_[A-Z0-9_]+)["']"""
    return set(re.findall(pattern, source))


def test_every_ow_variable_the_code_reads_is_a_setting_or_run_context():
    fields = {f"OW_{name.upper()}" for name in OWSettings.model_fields}
    stray = {}
    for path in [*ROOT.joinpath("ow_prefect").rglob("*.py"), *ROOT.joinpath("flows").rglob("*.py")]:
        relative = path.relative_to(ROOT).as_posix()
        read = ow_variables_read_from_the_environment(path) - RUN_CONTEXT.get(relative, set())
        if read:
            stray[relative] = sorted(read)
    assert stray == {}, f"read from os.environ instead of OWSettings: {stray} (fields: {sorted(fields)})"


def test_every_setting_is_described_in_the_one_table():
    reference = (ROOT / "docs" / "reference.md").read_text()
    table = reference.split("## Settings", 1)[1]
    for name, field in OWSettings.model_fields.items():
        assert field.description, f"OW_{name.upper()} has no description"
        assert f"`OW_{name.upper()}`" in table, f"OW_{name.upper()} is not in docs/reference.md (regenerate it)"


def test_training_reads_its_backend_where_ow_prefect_cannot_be_imported():
    """The GPU kit runs the training code with torch, transformers, trl and peft only: the setting is then the
    bare variable (here pydantic-settings is made unimportable)."""
    import subprocess
    import sys

    code = (
        "import sys; sys.modules['pydantic_settings'] = None; "
        "from flows.finetune.backends import backend_setting; print(backend_setting())"
    )
    env = {**os.environ, "OW_TRAIN_BACKEND": "transformers"}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=ROOT, check=True)
    assert done.stdout.split() == ["transformers"]


@pytest.mark.parametrize("cuda, chosen", [(False, "transformers"), (True, "unsloth")])
def test_auto_picks_unsloth_only_where_cuda_is(workdir, monkeypatch, cuda, chosen):
    """`auto` means unsloth where it is installed and CUDA is there (docs/local.md): on a CPU unsloth would only
    fall back to what transformers does. Both are stood in for here (this machine has no GPU, and unsloth may or
    may not be installed): find_spec and torch.cuda.is_available."""
    import importlib.util

    import torch

    from flows.finetune import backends

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: object() if name == "unsloth" else real_find_spec(name, *a)
    )
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.delenv("OW_TRAIN_BACKEND", raising=False)
    refresh_settings()
    assert backends.choose_backend() == chosen


EPHEMERAL_TIMEOUT = """
from ow_prefect import OpenWeights
from prefect.settings import PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS as timeout
ow = OpenWeights()
with ow.prefect_settings():
    print(timeout.value())
"""


@pytest.mark.parametrize(("given", "used"), [(None, "120"), ("45", "45")])
def test_embedded_mode_gives_the_ephemeral_server_two_minutes_to_start_unless_told(given, used):
    """Prefect waits 20 s for its ephemeral server, which took longer to start on 2 busy cores (embedded jobs and
    `ow` failed with "Timed out while attempting to connect"): the SDK allows 120 s, or what the user set."""
    import subprocess
    import sys

    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("PREFECT_API_URL", "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS")
    }
    if given:
        env["PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"] = given
    done = subprocess.run([sys.executable, "-c", EPHEMERAL_TIMEOUT], capture_output=True, text=True, env=env, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == [used]
