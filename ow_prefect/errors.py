"""The SDK's error hierarchy: one base, one subclass per thing a user can act on."""

from __future__ import annotations


class OWError(Exception):
    """Base class of every error ow_prefect raises on purpose."""


class ConfigurationError(OWError):
    """A setting, block or environment is missing or wrong; the message says which and how to fix it."""


class DatasetValidationError(OWError, ValueError):
    """A dataset file failed validation. `problems` lists every problem as `line N: field: what is wrong`."""

    max_shown = 50

    def __init__(self, source: str, purpose: str, problems: list[str]):
        self.source = source
        self.purpose = purpose
        self.problems = problems
        shown = "\n".join(f"  - {p}" for p in problems[: self.max_shown])
        more = len(problems) - self.max_shown
        extra = f"\n  ... and {more} more (all of them are in .problems)" if more > 0 else ""
        super().__init__(
            f"{source} is not a valid '{purpose}' file ({len(problems)} problem(s)); nothing was stored:\n"
            f"{shown}{extra}"
        )


class ParameterError(OWError, ValueError):
    """Job parameters did not validate; raised before anything is submitted."""


class NotFoundError(OWError, LookupError):
    """A file, job or deployment does not exist."""


class PrefectUnavailableError(OWError, ConnectionError):
    """The Prefect API could not be reached, or answered with a server error (5xx): nothing says the job, run
    or deployment asked about is missing. The message names the API and what went wrong."""


class StorageError(OWError):
    """The storage block could not be read or written."""


class JobFailedError(OWError):
    """Raised by `wait()` when a job ends failed or canceled (pass `raise_on_failure=False` to get it back)."""

    def __init__(self, job, when: str = ""):
        self.job = job
        super().__init__(
            f"job {job.id} ended {job.status}{when} (flow run {job.flow_run_id}): {job.error or 'no message'}"
        )


class CodeMismatchError(OWError):
    """The flow's code differs from the code the client hashed into the job id."""
