"""A custom job type, as in OpenWeights: mounted files, validated params, a command built from them.

    python examples/custom_job/dataset_stats.py

`ow.dataset_stats.create(min_messages=2)` uploads job.py and data/ (content-addressed: unchanged files are not
uploaded again), and submits a run of the `custom/run` deployment. The job id is a hash of the command, the
mounted files' content, the params, the image and the flow's code: the same call returns the same job, a
changed data file makes a new one. With no Prefect server configured it runs right here (embedded); with
PREFECT_API_URL set, a worker of the deployment's pool runs it (`requires_vram_gb` sizes the GPU on RunPod).
"""

from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

from ow_prefect import CustomJob, OpenWeights, register


class StatsParams(BaseModel):
    model_config = ConfigDict(extra="forbid")  # a misspelled parameter is an error, not a silent default

    min_messages: int = Field(default=1, ge=0, description="Count only conversations with this many messages.")


@register("dataset_stats")
class DatasetStats(CustomJob):
    mount = {"job.py": "job.py", "data": "data"}  # local path (relative to this file) -> path in the job
    params = StatsParams
    requires_vram_gb = 0  # CPU is enough

    def get_entrypoint(self, validated_params: StatsParams) -> str:
        return f"python job.py --min-messages {validated_params.min_messages}"


if __name__ == "__main__":
    ow = OpenWeights()
    job = ow.dataset_stats.create(min_messages=2)
    print(f"submitted {job.id} ({job.status})")
    job = job.wait(timeout=600)
    print(f"{job.id}: {job.status}, outputs {job.outputs}")
    print("results in", job.download(Path.home() / ".ow_prefect" / "examples" / job.id))
    again = ow.dataset_stats.create(min_messages=2)
    print(f"submitted again: same job {again.id == job.id}, same flow run {again.flow_run_id == job.flow_run_id}")
