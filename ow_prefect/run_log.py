"""``ow.run``: the run of the job this code runs in, as OpenWeights' custom jobs use it.

Inside a job's command (``custom/run``), ``ow.run.log({"accuracy": 0.9})`` appends one JSON line to the file
``$OW_RUN_LOG``; the flow turns each line into an ``ow.run.log`` Prefect event while the command runs, and merges
the logged values into ``job.outputs`` when it ends (the latest value of each key, as OpenWeights' outputs are).
A file passed with ``file=`` is left next to the run log (`run_files_dir`) and named in the line; the flow stores
it (purpose ``event``) and its id travels with the event. The command has no storage credentials (its
environment is its own, see flows/custom.py), so it never stores anything itself. Nothing here imports
Prefect: the command's environment may not have it.

``$OW_RUN_LOG``, ``$OW_FLOW_RUN_ID`` and ``$OW_JOB_ID`` are read from the environment, not from `OWSettings`, on
purpose: they are not settings but this process's run context, set by the flow (flows/custom.py) for the one
command it starts. A setting can come from a ``.env`` file, and a ``.env`` in the command's working directory
(a mounted project may carry one) must never make a process claim to be another run, or a job's command.
"""

from __future__ import annotations

import json
import os
import threading
import uuid
from pathlib import Path
from typing import IO, Any

from ow_prefect.errors import OWError

RUN_LOG_EVENT = "ow.run.log"
RUN_LOG_ENV = "OW_RUN_LOG"
EVENT_PURPOSE = "event"  # files attached to logged events
_WRITE_LOCK = threading.Lock()


def run_files_dir(run_log: str | os.PathLike[str]) -> Path:
    """Where ``ow.run.log(..., file=...)`` leaves files for the flow to store: next to the run log."""
    return Path(run_log).parent / ".ow_run_log_files"


def latest_values(logged: list[dict[str, Any]]) -> dict[str, Any]:
    """The latest value of every key over the logged dicts, in order (OpenWeights' ``events.latest('*')``; a
    None value does not replace an earlier one)."""
    latest: dict[str, Any] = {}
    for data in logged:
        latest.update({key: value for key, value in data.items() if value is not None})
    return latest


class CurrentRun:
    """``ow.run`` inside a job: ``id`` (the flow run), ``job_id`` and ``log``."""

    def __init__(self, client: Any):
        path = os.environ.get(RUN_LOG_ENV)
        if not path:
            raise OWError(
                "ow.run is the run of the job this code runs in, and this process is not a job's command "
                f"(${RUN_LOG_ENV} is not set). Run the script as a job — `ow exec 'python script.py' --mount .` or "
                "ow.custom.create(entrypoint='python script.py', mounts={'script.py': 'script.py'}) — and call "
                "ow.run.log there; from outside a job, read a job's logged values with ow.events.list(job_id=...)."
            )
        self._client = client
        self.path = path
        self.id = os.environ.get("OW_FLOW_RUN_ID") or None
        self.job_id = os.environ.get("OW_JOB_ID") or None

    def __repr__(self) -> str:
        return f"CurrentRun(id={self.id!r}, job_id={self.job_id!r})"

    def __getitem__(self, key: str) -> Any:
        return getattr(self, key)

    def log(self, event_data: dict[str, Any], file: IO[bytes] | None = None) -> None:
        """Record `event_data` (a JSON object) as an event of this run; with `file` (a binary file object, bytes or
        a path), attach it: the job's flow stores it and the event's ``file`` is its id (``ow.files.content``)."""
        if not isinstance(event_data, dict):
            raise TypeError(f"ow.run.log takes a dict, not {type(event_data).__name__}")
        try:
            json.dumps(event_data, allow_nan=False)
        except (TypeError, ValueError) as exc:
            raise TypeError(f"ow.run.log: {exc}; log JSON values (str, numbers, bools, lists, dicts)") from None
        entry: dict[str, Any] = {"data": event_data}
        if file is not None:
            from ow_prefect.client.files import read_input

            data, name = read_input(file, self._client.settings.max_file_bytes)
            entry |= {"spooled": self._spool(data), "filename": name}
        line = json.dumps(entry, allow_nan=False)
        with _WRITE_LOCK, open(self.path, "a", encoding="utf-8") as handle:
            handle.write(line + "\n")

    def _spool(self, data: bytes) -> str:
        """Leave `data` for the flow (whole before the line naming it is written); return its name."""
        folder = run_files_dir(self.path)
        folder.mkdir(exist_ok=True)
        name = uuid.uuid4().hex
        (folder / name).write_bytes(data)
        return name
