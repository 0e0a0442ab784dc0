"""docs/reference.md is generated from the pydantic models; a stale committed copy fails here."""

from ow_prefect import reference
from ow_prefect.jobs.registry import job_types


def test_committed_reference_is_up_to_date(monkeypatch):
    monkeypatch.setenv("OW_TRAIN_IMAGE", "somewhere/else:1")  # the environment must not leak into the file
    assert reference.main(["--check"]) == 0, "docs/reference.md is stale: run `python -m ow_prefect.reference`"


def test_reference_lists_every_field_of_every_job_type():
    from ow_prefect import CustomJob, register

    @register("not_in_the_reference")  # a user's type (tests register some too) stays out of the project's docs
    class UserJob(CustomJob):
        def get_entrypoint(self, validated_params) -> str:
            return "true"

    text = reference.render()
    assert "not_in_the_reference" not in text
    builtin = {name: cls for name, cls in job_types().items() if cls.__module__.startswith("ow_prefect.")}
    assert {"fine_tuning", "inference", "vllm_api", "custom", "inspect_ai", "mmlu_pro"} <= set(builtin)
    for name, job_cls in builtin.items():
        assert f"## `ow.{name}`" in text
        for field in job_cls.params.model_fields:
            assert f"| `{field}` |" in text, (name, field)


def test_check_fails_on_a_stale_file(tmp_path, monkeypatch):
    monkeypatch.setattr(reference, "project_root", lambda: tmp_path)
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "reference.md").write_text("old\n")
    assert reference.main(["--check"]) == 1
    assert reference.main([]) == 0 and reference.main(["--check"]) == 0
