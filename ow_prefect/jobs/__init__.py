"""Job types, their identity and their submission (see docs/architecture.md, "Jobs")."""

from ow_prefect.jobs.base import Job, JobStatus, project_root
from ow_prefect.jobs.registry import get_job_type, job_types, register

__all__ = ["Job", "JobStatus", "get_job_type", "job_types", "project_root", "register"]
