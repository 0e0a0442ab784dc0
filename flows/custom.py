"""`custom/run`: download mounted files, run a shell command, upload what it wrote under uploads/.

It runs the built-in `custom` type and every custom job type a client defines (`ow_prefect.CustomJob`). The
command sees ``OW_JOB_ID``, ``OW_FLOW_RUN_ID``, ``OW_WORK_DIR``, ``OW_PARAMS`` (a path: the job type's params
as JSON), ``OW_OUTPUTS`` (a path: JSON written there is merged into ``job.outputs``) and ``OW_RUN_LOG`` (a path:
``ow.run.log({...})`` appends a line there; each becomes an ``ow.run.log`` event while the command runs, and the
logged values — the latest per key, as in OpenWeights — are merged into ``job.outputs``; a file it attaches is
left next to the log and stored here, with the flow's storage, since the command has none). Its output streams
into the flow run's logs.

The command gets an environment of its own (`command_env`), not the one of the process that runs the flow: on a
process pool that one is the worker's (its RunPod key, storage keys, ...), in a pod it holds the Prefect API
key. What the command sees is the machine's plain settings (`PLAIN_VARIABLES`: paths, locale, GPU and Hugging
Face cache settings, ow_prefect's home and vLLM interpreter, the pod's RunPod facts), the job's own variables,
its `env` and its `secrets` (values loaded here from the Secret blocks it names) — and nothing else.
"""

from __future__ import annotations

import contextvars
import json
import os
import re
import stat
import tempfile
import threading
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger
from prefect.events import emit_event

from flows._runtime import (
    FORCE_RERUN_HELP,
    OW_JOB_DESCRIPTION,
    RESULT_PURPOSE,
    JobRun,
    OwJobEnvelope,
    flow_run_related,
    job_resource,
    run_job,
    stream_command,
)
from ow_prefect.errors import ConfigurationError
from ow_prefect.jobs.custom import CommandJob, CustomJob
from ow_prefect.run_log import EVENT_PURPOSE, RUN_LOG_EVENT, latest_values, run_files_dir
from ow_prefect.settings import get_settings

# Variables of the flow's environment a command may see: none of them holds a credential.
PLAIN_VARIABLES = frozenset(
    {
        "PATH",
        "HOME",
        "USER",
        "LOGNAME",
        "SHELL",
        "TERM",
        "LANG",
        "LANGUAGE",
        "TZ",
        "TMPDIR",
        "HOSTNAME",
        "PYTHONPATH",
        "PYTHONUNBUFFERED",
        "VIRTUAL_ENV",
        "CONDA_PREFIX",
        "CONDA_DEFAULT_ENV",
        "LD_LIBRARY_PATH",
        "SSL_CERT_FILE",
        "SSL_CERT_DIR",
        "REQUESTS_CA_BUNDLE",
        "OMP_NUM_THREADS",
        "MKL_NUM_THREADS",
        "TOKENIZERS_PARALLELISM",
        "PIP_NO_CACHE_DIR",
        "PIP_DISABLE_PIP_VERSION_CHECK",
        "HF_HOME",
        "HF_HUB_CACHE",
        "HF_DATASETS_CACHE",
        "HF_ENDPOINT",
        "HF_HUB_OFFLINE",
        "HF_DATASETS_OFFLINE",
        "TRANSFORMERS_OFFLINE",
        "HF_HUB_ENABLE_HF_TRANSFER",
        "OW_HOME",  # where ow_prefect keeps its state on this machine, and its vLLM environment
        "OW_VLLM_PYTHON",
        "RUNPOD_POD_ID",
        "RUNPOD_DC_ID",
        "RUNPOD_POD_HOSTNAME",
        "RUNPOD_GPU_COUNT",
        "RUNPOD_CPU_COUNT",
        "RUNPOD_PUBLIC_IP",
        "RUNPOD_VOLUME_ID",
    }
)
PLAIN_PREFIXES = ("LC_", "CUDA_", "NVIDIA_", "RUNPOD_TCP_PORT_")


def command_env(params: dict[str, Any], job_variables: dict[str, str]) -> dict[str, str]:
    """The whole environment of the command: plain settings, the job's `env`, its `secrets`, its own variables."""
    plain = {
        name: value for name, value in os.environ.items() if name in PLAIN_VARIABLES or name.startswith(PLAIN_PREFIXES)
    }
    return {**plain, **params.get("env", {}), **_load_secrets(params.get("secrets", {})), **job_variables}


def _load_secrets(secrets: dict[str, str]) -> dict[str, str]:
    from prefect.blocks.system import Secret

    values = {}
    for variable, block in secrets.items():
        try:
            values[variable] = str(Secret.load(block, _sync=True).get())
        except ValueError as exc:
            raise ConfigurationError(
                f"secrets[{variable!r}]: Secret block {block!r} cannot be loaded ({exc}); create it in the UI or "
                f"with `prefect block create secret`, or drop it from the job's secrets"
            ) from None
    return values


def _run_command(job: JobRun) -> dict[str, Any]:
    params = job.parameters
    with tempfile.TemporaryDirectory(prefix=f"{job.id}-") as tmp:
        work = Path(tmp)
        for target, file_id in params["mounts"].items():
            job.storage.download(file_id, work / target)
        (work / "uploads").mkdir(exist_ok=True)
        outputs_file = work / ".ow_outputs.json"
        params_file = work / ".ow_params.json"
        params_file.write_text(json.dumps(params["params"]))
        run_log = RunLogForwarder(job, work / ".ow_run_log.jsonl")
        own = {
            "OW_JOB_ID": job.id,
            "OW_FLOW_RUN_ID": str(job.flow_run.id) if job.flow_run else "",
            "OW_WORK_DIR": str(work),
            "OW_PARAMS": str(params_file),
            "OW_OUTPUTS": str(outputs_file),
            "OW_RUN_LOG": str(run_log.path),
        }
        with run_log:
            stream_command(params["entrypoint"], cwd=str(work), env=command_env(params, own), inherit=False)
        files = {
            path.relative_to(work / "uploads").as_posix(): job.storage.put_path(path, RESULT_PURPOSE).id
            for path in sorted((work / "uploads").rglob("*"))
            if path.is_file()
        }
        extra = _read_outputs(outputs_file)
    return {**latest_values(run_log.logged), **extra, "files": files}


class RunLogForwarder:
    """Turns the lines `ow.run.log` appends to `path` into `ow.run.log` events as they come (a thread polls
    the file; a last read after the command ends), and keeps the logged values for the job's outputs. A file a
    line attaches is stored here, with the job's storage (the command has no credentials for it), and the event
    carries its id. A line that cannot be forwarded (storage or the API failing) is tried again at the next
    poll, and fails the run if it still fails after the command ended."""

    POLL_SECONDS = 0.5
    SPOOLED = re.compile(r"[0-9a-f]{32}")  # the names `CurrentRun._spool` gives

    def __init__(self, job: JobRun, path: Path):
        self.job, self.path = job, path
        self.files = run_files_dir(path)
        self.logged: list[dict[str, Any]] = []
        self._offset = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._last_problem = ""
        self._stored: dict[str, str] = {}  # spooled name -> file id

    def __enter__(self) -> RunLogForwarder:
        self.path.touch()
        context = contextvars.copy_context()  # Prefect's settings and run context, for emit_event
        self._thread = threading.Thread(target=context.run, args=(self._poll,), name="ow-run-log", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join()
        self._forward()

    def _poll(self) -> None:
        while not self._stop.wait(self.POLL_SECONDS):
            try:
                self._forward()
            except Exception as exc:  # noqa: BLE001 - said once, tried again next poll (and raised at the end)
                if str(exc) != self._last_problem:
                    get_run_logger().warning("ow.run.log: %s; trying again", exc)
                self._last_problem = str(exc)

    def _forward(self) -> None:
        with open(self.path, "rb") as handle:
            handle.seek(self._offset)
            chunk = handle.read()
        for line in chunk.splitlines(keepends=True):
            if not line.endswith(b"\n"):  # still being written: the next read gets it whole
                break
            if line.strip():
                self._emit(line.decode("utf-8", errors="replace"))
            self._offset += len(line)

    def _emit(self, line: str) -> None:
        try:
            entry = json.loads(line)
        except json.JSONDecodeError:
            get_run_logger().warning("ow.run.log: skipped a line that is not JSON: %.200s", line)
            return
        payload = {"data": entry["data"], "file": self._store(entry)}
        flow_run_id = str(self.job.flow_run.id) if self.job.flow_run else None
        emit_event(
            event=RUN_LOG_EVENT,
            resource=job_resource(self.job.id),
            related=flow_run_related(flow_run_id),
            payload=payload,
        )
        self.logged.append(entry["data"])

    def _store(self, entry: dict[str, Any]) -> str | None:
        """The id of the file the line attaches, stored now (the spooled copy is removed); None without one."""
        name = entry.get("spooled")
        if name is None:
            return None
        if name in self._stored:  # stored at an earlier try of this line
            return self._stored[name]
        path = self.files / str(name)
        # Written by the command: a name of ours, a plain file (not a link to elsewhere), within the size limit.
        info = os.lstat(path) if self.SPOOLED.fullmatch(str(name)) and path.exists() else None
        limit = get_settings().max_file_bytes
        if info is None or not stat.S_ISREG(info.st_mode) or info.st_size > limit:
            get_run_logger().warning("ow.run.log: the attached file %.100r is not one it left; logged without it", name)
            return None
        filename = entry.get("filename") if isinstance(entry.get("filename"), str) else None
        self._stored[name] = self.job.storage.put_bytes(path.read_bytes(), EVENT_PURPOSE, filename=filename).id
        path.unlink()
        return self._stored[name]


def _read_outputs(path: Path) -> dict[str, Any]:
    if not path.exists():
        return {}
    try:
        extra = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"the command wrote invalid JSON to $OW_OUTPUTS ({exc}); write one JSON object") from None
    if not isinstance(extra, dict):
        raise ValueError(f"$OW_OUTPUTS must hold a JSON object, not {type(extra).__name__}")
    return extra


def _job_type(ow_job: dict[str, Any] | None) -> type[CustomJob]:
    """The job type the client submitted. A type defined in the client's code is not importable here, and
    need not be: it only names the job and its id prefix; the id itself is checked against this code."""
    name = (ow_job or {}).get("type")
    if not name or name == CommandJob.name:
        return CommandJob
    return CommandJob.for_type(name, ow_job["id"].rpartition("-")[0])


def custom_run(
    entrypoint: str,
    mounts: dict[str, str] | None = None,
    requires_vram_gb: int = 0,
    params: dict[str, Any] | None = None,
    env: dict[str, str] | None = None,
    secrets: dict[str, str] | None = None,
    force_rerun: bool = False,
    ow_job: OwJobEnvelope = None,
) -> dict[str, Any]:
    """Run `entrypoint` in a work dir holding `mounts`; files under uploads/ become result files. The command
    gets `env`, and `secrets` loaded from their blocks, but no credential of the machine that runs it.

    Args:
        entrypoint: The shell command, run with bash in the work dir.
        mounts: Work-dir path -> stored file or directory id, downloaded there before the command runs.
        requires_vram_gb: GPU memory the command needs; 0 runs it without a GPU.
        params: The job type's parameters, as JSON in the file named by $OW_PARAMS.
        env: Environment variables of the command (plain values; part of the job id).
        secrets: Environment variable -> name of a Prefect Secret block whose value the command gets.
        force_rerun: {force_rerun}
        ow_job: {ow_job}
    """
    parameters = {"entrypoint": entrypoint, "mounts": mounts or {}, "requires_vram_gb": requires_vram_gb}
    parameters |= {"params": params or {}, "env": env or {}, "secrets": secrets or {}}
    parameters |= {"force_rerun": force_rerun, "ow_job": ow_job}
    return run_job(_job_type(ow_job), parameters, _run_command)


custom_run.__doc__ = custom_run.__doc__.format(force_rerun=FORCE_RERUN_HELP, ow_job=OW_JOB_DESCRIPTION)
custom_run = flow(name="custom", log_prints=True)(custom_run)
