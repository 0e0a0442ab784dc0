"""Quickstart: run a script on a dataset as a job, read the outputs, download the results.

With no Prefect server configured this runs on the embedded default (Prefect's ephemeral API, local storage
under ~/.ow_prefect). Point PREFECT_API_URL at a server with a worker and the same code runs there.
dataset_stats.py is the same job as a job type of its own (mounts and params declared once).
"""

from pathlib import Path

from ow_prefect import OpenWeights

HERE = Path(__file__).parent

ow = OpenWeights()
print(ow)
# A mount is a local file or directory (uploaded, content-addressed) or the id of a file uploaded before.
mounts = {"job.py": HERE / "job.py", "data": HERE / "data"}
job = ow.custom.create(entrypoint="python job.py --min-messages 2", mounts=mounts)
job = job.wait(timeout=600)
print(f"{job.id}: {job.status}, outputs {job.outputs}")
print("downloaded to", job.download(Path.home() / ".ow_prefect" / "quickstart" / job.id))

again = ow.custom.create(entrypoint="python job.py --min-messages 2", mounts=mounts)
print(f"submitted again: same job {again.id == job.id}, same flow run {again.flow_run_id == job.flow_run_id}")
