"""Quickstart: upload a dataset and a script, run them as a job, read the outputs, download the results.

With no Prefect server configured this runs on the embedded default (Prefect's ephemeral API, local storage
under ~/.ow_prefect). Point PREFECT_API_URL at a server with a worker and the same code runs there.
"""

from pathlib import Path

from ow_prefect import OpenWeights

HERE = Path(__file__).parent

ow = OpenWeights()
print(ow)
data = ow.files.upload(HERE / "conversations.jsonl", purpose="conversations")
script = ow.files.upload(HERE / "job.py", purpose="custom_job_file")
print(f"uploaded {data.id} and {script.id}")

job = ow.custom.create(
    entrypoint="python job.py",
    mounts={"job.py": script.id, "data/conversations.jsonl": data.id},
)
job = job.wait(timeout=600)
print(f"{job.id}: {job.status}, outputs {job.outputs}")
print("downloaded to", job.download(Path.home() / ".ow_prefect" / "quickstart" / job.id))

again = ow.custom.create(entrypoint="python job.py", mounts={"data/conversations.jsonl": data.id, "job.py": script.id})
print(f"submitted again: same job {again.id == job.id}, same flow run {again.flow_run_id == job.flow_run_id}")
