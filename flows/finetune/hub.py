"""Pushing a fine-tuned model to the Hugging Face Hub, with the token from a Prefect Secret block
(`flows._runtime.hf_token`)."""

from __future__ import annotations

from pathlib import Path

from ow_prefect.settings import get_settings


def repo_id(template: str, *, job_id: str, model: str, org: str) -> str:
    """The repository `template` names once the job id and the organization are known (validation filled in
    the rest; {model_name} too, unless the template came from elsewhere)."""
    from ow_prefect.jobs.finetune import ORG_FIELDS, fill_model_id

    values = {"job_id": job_id, "model_name": Path(model.rstrip("/")).name, **dict.fromkeys(ORG_FIELDS, org)}
    return fill_model_id(template, values)


def push(folder: Path, template: str, *, job_id: str, model: str, private: bool, token: str) -> str:
    """Create (or reuse) the repository and upload `folder`; return the repository id."""
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    org = get_settings().hf_org or api.whoami()["name"]
    target = repo_id(template, job_id=job_id, model=model, org=org)
    api.create_repo(target, private=private, exist_ok=True, repo_type="model")
    api.upload_folder(repo_id=target, folder_path=str(folder), commit_message=f"ow_prefect job {job_id}")
    return target
