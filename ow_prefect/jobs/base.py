"""`Job`: a job type (its class attributes) and a submitted job (an instance).

A job type names the deployment that runs it, the pydantic model of its parameters, the source files the
flow runs (hashed into the job id) and its image. ``@register("name")`` (`ow_prefect.jobs.registry`) makes
``ow.<name>`` available on every client; built-in types register themselves the same way user types do.
"""

from __future__ import annotations

import inspect
import re
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal

from pydantic import AfterValidator, BaseModel
from pydantic import ValidationError as PydanticValidationError

from ow_prefect.errors import JobFailedError, ParameterError
from ow_prefect.hashing import code_hash, job_id

JobStatus = Literal["pending", "in_progress", "completed", "failed", "canceled"]
TERMINAL_STATUSES: frozenset[str] = frozenset({"completed", "failed", "canceled"})

SUFFIX_RE = re.compile(r"^[a-z0-9][a-z0-9_\-]{0,31}$")


def _check_suffix(value: str | None) -> str | None:
    if value is not None and not SUFFIX_RE.match(value):
        raise ValueError("use up to 32 lowercase letters, digits, '-' or '_'")
    return value


# `job_id_suffix`: appended to the job id as `-<suffix>` (`Job.compute_id`)
JobIdSuffix = Annotated[str | None, AfterValidator(_check_suffix)]


class _ReadThrough(dict):
    """A dict whose `__missing__` answers other names for its keys; `get` goes through it too."""

    def get(self, key: str, default: Any = None) -> Any:
        try:
            return self[key]
        except KeyError:
            return default


class JobParams(_ReadThrough):
    """``job.params``: the flow run's parameters, also readable the ways OpenWeights nests them:
    ``params["validated_params"]`` is the validated parameters (a custom job type's own ones) and
    ``params["mounted_files"]`` a custom job's mounts."""

    def __missing__(self, key: str) -> Any:
        if key == "validated_params":
            return self["params"] if "entrypoint" in self and "params" in self else self
        if key == "mounted_files":
            return dict.get(self, "mounts", {})
        raise KeyError(key)


OUTPUT_ALIASES = {"file": "result_file"}  # OpenWeights' name -> ours (inference: outputs["file"])


class JobOutputs(_ReadThrough):
    """``job.outputs``, where OpenWeights' names read through to ours (``outputs["file"]`` is the result file)."""

    def __missing__(self, key: str) -> Any:
        if key in OUTPUT_ALIASES and OUTPUT_ALIASES[key] in self:
            return self[OUTPUT_ALIASES[key]]
        raise KeyError(key)


def project_root() -> Path:
    """The directory holding `ow_prefect/` and `flows/` (the repository, or site-packages for a wheel)."""
    return Path(__file__).resolve().parents[2]


class Job:
    """Base class of every job type, and the handle of a submitted job.

    Class attributes (override in a subclass):
        deployment: ``flow/deployment`` that runs the job.
        entrypoint: ``path.py:flow`` of that flow, relative to the project root (must match prefect.yaml).
        params: pydantic model of the parameters (``extra="forbid"``: unknown keys are rejected).
        code: source files and directories the flow runs, relative to the project root.
        id_prefix: first part of the job id (defaults to the registered name).
        base_image: image the job runs in (defaults to the ``OW_TRAIN_IMAGE`` setting).
        image_setting: which setting gives the default image: ``train_image`` or ``serve_image`` (vLLM jobs).
    """

    name: ClassVar[str] = ""
    deployment: ClassVar[str]
    entrypoint: ClassVar[str]
    params: ClassVar[type[BaseModel]]
    code: ClassVar[tuple[str, ...]] = ()
    id_prefix: ClassVar[str | None] = None
    base_image: ClassVar[str | None] = None
    image_setting: ClassVar[str] = "train_image"  # the OW_* setting naming the default image (or "serve_image")
    # Its flow saves a checkpoint and stops when asked (ow_prefect/costs/stop.py), so that a rerun resumes: the
    # RunPod worker asks before it stops a run for max_cost or max_runtime.
    stops_at_checkpoint: ClassVar[bool] = False

    # ---- the job type -------------------------------------------------------------------------------

    @classmethod
    def validate_params(cls, **kwargs: Any) -> BaseModel:
        return validate_for(cls, cls.params, kwargs)

    @classmethod
    def prepare_params(cls, params: dict[str, Any], storage: Any) -> dict[str, Any]:
        """Client side, before validation: turn what only exists on the user's machine (local files to mount)
        into what a flow can fetch (file ids in `storage`). The default returns `params` unchanged."""
        return params

    @classmethod
    def flow_parameters(cls, validated: BaseModel) -> dict[str, Any]:
        """The flow-run parameters for validated params (JSON-ready); also what is hashed into the id."""
        return validated.model_dump(mode="json")

    @classmethod
    def deployment_for(cls, validated: BaseModel) -> str:
        """The deployment that runs these parameters (one job type may have several, e.g. one per loss)."""
        return cls.deployment

    @classmethod
    def job_variables(cls, validated: BaseModel) -> dict[str, Any]:
        """Job variables for the worker (e.g. ``min_vram_gb``); computed only when a run is created."""
        return {}

    @classmethod
    def work(cls, validated: BaseModel, storage: Any) -> Any:
        """What a run computes, in tokens (an `ow_prefect.costs.work.Work`): what its cost estimate is made of. The
        default knows nothing of the runtime (the estimate is then a price per hour, bounded by ``max_runtime``)."""
        from ow_prefect.costs.work import Work

        return Work(open_ended=f"{cls.name or cls.__name__} jobs do not say how much work they are")

    @classmethod
    def image(cls) -> str:
        from ow_prefect.settings import get_settings

        return cls.base_image or getattr(get_settings(), cls.image_setting)

    @classmethod
    def code_hash(cls) -> str:
        return code_hash(project_root(), cls.code)

    @classmethod
    def compute_id(cls, flow_parameters: dict[str, Any], image: str | None = None, code: str | None = None) -> str:
        """``{prefix}-{hash}``, plus ``-{job_id_suffix}`` when the parameters have one (as in OpenWeights)."""
        computed = job_id(cls.id_prefix or cls.name, flow_parameters, code or cls.code_hash(), image or cls.image())
        suffix = flow_parameters.get("job_id_suffix")
        return f"{computed}-{suffix}" if suffix else computed

    @classmethod
    def shown_params(cls, params: dict[str, Any], job_id: str) -> dict[str, Any]:
        """The parameters as ``job.params`` shows them (a job type may fill in what only the id tells)."""
        return params

    # ---- a submitted job ----------------------------------------------------------------------------

    def __init__(
        self,
        *,
        id: str,
        type: str,
        status: JobStatus,
        params: dict[str, Any],
        flow_run_id: str | None,
        created_at: float | None = None,
        updated_at: float | None = None,
        outputs: dict[str, Any] | None = None,
        error: str | None = None,
        run_count: int = 0,
        state_name: str | None = None,
        run_variables: dict[str, Any] | None = None,
        docker_image: str | None = None,
        worker_id: str | None = None,
        client: Any = None,
    ):
        self.id = id
        self.type = type
        self.status = status
        self.params = JobParams(params)
        self.flow_run_id = flow_run_id
        self.created_at = created_at
        self.updated_at = updated_at
        self.outputs = JobOutputs(outputs or {})
        self.error = error
        self.run_count = run_count
        self.state_name = state_name
        self._run_variables = dict(run_variables or {})  # the flow run's job variables (what the worker got)
        self.docker_image = docker_image
        self.worker_id = worker_id
        self._client = client

    def __repr__(self) -> str:
        return f"{type(self).__name__}(id={self.id!r}, status={self.status!r}, flow_run_id={self.flow_run_id!r})"

    def __getitem__(self, key: str) -> Any:
        return getattr(self, key)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Job) and (self.id, self.flow_run_id) == (other.id, other.flow_run_id)

    def __hash__(self) -> int:
        # Equal jobs share their id; the id never changes when a handle is refreshed (its flow run id can).
        return hash(self.id)

    @property
    def done(self) -> bool:
        return self.status in TERMINAL_STATUSES

    # OpenWeights' job fields, where ow_prefect has them

    @property
    def model(self) -> str | None:
        """The model the job trains, serves or evaluates (the base model when it is a reference)."""
        model = self.params.get("model")
        return model.get("base") if isinstance(model, dict) else model

    @property
    def script(self) -> str | None:
        """A custom job's command."""
        return self.params.get("entrypoint")

    @property
    def requires_vram_gb(self) -> float | None:
        """The GPU memory the run asked the worker for (the ``min_vram_gb`` job variable)."""
        return self._run_variables.get("min_vram_gb", self.params.get("requires_vram_gb"))

    @property
    def allowed_hardware(self) -> list[str] | None:
        """The GPU types the run may use, as OpenWeights writes them (``["1x NVIDIA L40"]``), when it was limited."""
        types = self._run_variables.get("gpu_types")
        if not isinstance(types, list):  # empty, or "verified" (a set of types the worker keeps, not a list here)
            return None
        return [f"{self._run_variables.get('gpu_count', 1)}x {gpu}" for gpu in types] or None

    def to_dict(self) -> dict[str, Any]:
        keys = (
            "id",
            "type",
            "status",
            "params",
            "outputs",
            "flow_run_id",
            "created_at",
            "updated_at",
            "error",
            "run_count",
            "state_name",
            "docker_image",
            "worker_id",
        )
        return {k: getattr(self, k) for k in keys}

    def _update(self, other: Job) -> Job:
        self.__dict__.update({k: v for k, v in other.__dict__.items() if k != "_client"})
        return self

    # Handle methods delegate to the client's `jobs` resource. With `AsyncOpenWeights` they return
    # awaitables (``await job.wait()``); with `OpenWeights` they run synchronously.

    def _jobs(self):
        if self._client is None:
            raise RuntimeError("this Job is not bound to a client; get it from ow.jobs.retrieve(id)")
        return self._client.jobs

    def _updated(self, result):
        """Update this handle from the client's answer (awaited first on the async client)."""
        if inspect.isawaitable(result):

            async def finish():
                return self._update(await result)

            return finish()
        return self._update(result)

    def refresh(self):
        return self._updated(self._jobs().retrieve(self.id))

    def cancel(self):
        return self._updated(self._jobs().cancel(self.id))

    def restart(self):
        return self._updated(self._jobs().restart(self.id))

    def wait(self, timeout: float | None = None, poll_interval: float = 2.0, raise_on_failure: bool = True):
        return self._updated(
            self._jobs().wait(self.id, timeout=timeout, poll_interval=poll_interval, raise_on_failure=raise_on_failure)
        )

    @property
    def runs(self):
        """The job's runs, oldest first (``job.runs[-1]`` is the latest); awaitable on the async client."""
        if self._client is None:
            raise RuntimeError("this Job is not bound to a client; get it from ow.jobs.retrieve(id)")
        return self._client.runs.list(job_id=self.id)

    def download(self, dest: str | Path, only_last_run: bool = True, weights: bool = False):
        """The result files into `dest`; with `weights`, also the model weights the job stored (`adapter/`,
        `merged/`); with ``only_last_run=False``, every run's logs, event files and results into
        ``dest/<run id>/`` (OpenWeights' layout)."""
        return self._jobs().download(self.id, dest, only_last_run=only_last_run, weights=weights)

    def history(self):
        return self._jobs().history(self.id)

    def logs(self):
        return self._jobs().logs(self.id)

    def events(self):
        return self._jobs().events(self.id)


def validate_for(job_cls: type[Job], model: type[BaseModel], values: dict[str, Any]) -> BaseModel:
    """`values` validated by `model`, or a ParameterError naming the job type and every bad field."""
    try:
        return model.model_validate(values)
    except PydanticValidationError as exc:
        raise parameter_error(job_cls, validation_problems(exc)) from None


def validation_problems(exc: PydanticValidationError) -> list[str]:
    """`field.path: what is wrong`, one per problem pydantic found."""
    return [f"{'.'.join(str(p) for p in err['loc']) or '(params)'}: {err['msg']}" for err in exc.errors()]


def parameter_error(job_cls: type[Job], problems: list[str]) -> ParameterError:
    listed = "\n".join(f"  - {problem}" for problem in problems)
    return ParameterError(f"invalid parameters for job type '{job_cls.name}':\n{listed}")


def raise_for_failure(job: Job) -> Job:
    if job.status in ("failed", "canceled"):
        raise JobFailedError(job)
    return job
