"""A local fake of RunPod's REST API v2 (pods and the GPU catalog), for tests and for trying the RunPod worker
without an account or a GPU.

    import httpx
    from ow_prefect.testing.fake_runpod import FakeRunPod

    with FakeRunPod(api_key="test-key") as fake:
        api = httpx.Client(base_url=fake.url, headers={"Authorization": "Bearer test-key"})
        pod = api.post("/pods", json={"name": "job-1", "image": "any", "gpu": {"id": "NVIDIA RTX A6000"},
                                      "args": "python -m my_job"}).json()
        fake.preempt(pod["id"])          # or fake.inject("POST", r"/pods$", status=429, retry_after=3)

The server answers the way `runpod-openapi-v2.json` (RunPod's spec, shipped next to this module) and RunPod's
observed behaviour say: bearer auth, problem+json errors, strict bodies (unknown fields are a 422 naming them),
HTTP 400 with RunPod's own sentence when no GPU is left, `RUNNING` with `runtime: null` right after a create.

A pod is a local process. Its `args` run under `bash -c` in a scratch directory (also its `HOME`), with what a
container of the image would have and nothing more: the image's environment (`image_env`; by default the few
variables in `IMAGE_VARIABLES` that this machine, playing the image, has set — the interpreter's `PATH`,
ow_prefect's home and vLLM environment, the Hugging Face cache and offline switches), the env the client sent
and RunPod's injected `RUNPOD_*` variables. The test's own environment (its keys included) is not inherited,
so a test passes only when the worker really sends a pod what it needs. As on RunPod, a command that exits is
restarted and the pod keeps billing until it is deleted or terminated; without `args` (the image's default
command) nothing runs and the pod just stays up. Each exposed port is mapped to a free loopback port, shown in
the pod's `runtime.ports` and published as `RUNPOD_TCP_PORT_<private port>` — for http ports too, because
locally the process has to bind the public port itself.

Where the fake departs from the spec, and why:
- Right after a create a pod is `RUNNING` with `runtime: null`, as observed live, not `PROVISIONING`.
- `preempt()` ends a pod as a spot interruption would, although v2 cannot rent spot pods yet: a worker must
  cope with a pod that ends under it anyway.
- `GET /v2/pods` pages with `?cursor=` and `pagination.nextCursor` only when built with `page_size`: the spec
  has no pagination yet, RunPod's notes say to follow `nextCursor` when present.
- There are no templates or clusters: a `templateId` is a 404, other spec routes are a 501. Network volumes are
  read-only (`add_network_volume()` makes one; GET lists and reads them) and a pod mounting one is placed in its
  data center. A mount path does not exist on this machine: the pod's env values that start with it point into the
  volume's local folder instead, which every pod mounting the volume shares.
- Every host reports CUDA 12.8; the catalog's `countryCodes` filter is a 501.
- A PATCH of container settings takes effect at the container's next start (restart action or exit).

The package's rooms: `spec` (the shipped spec, request validation, problem+json errors), `catalog` (GPU types,
stock, prices, data centers), `pods` (the pod record and the process supervisor), `logs` (pod logs and their
server-sent events), `volumes` (network volumes), `app` (the ASGI app: routes, auth, injected faults) and `fake`
(`FakeRunPod`: the server a test enters, its test controls and the pod handlers). Everything importable from the
old module is importable from here.
"""

from ow_prefect.testing.fake_runpod.catalog import (
    AVAILABILITY_LEVELS,
    CAPACITY_DETAIL,
    CLOUDS,
    CPU_PRICE_PER_VCPU,
    DATA_CENTER_NAMES,
    DEFAULT_DATA_CENTER,
    DEFAULT_STOCK,
    GPU_TYPES,
    HOST_CUDA_VERSION,
    MAX_GPUS_PER_POD,
    AvailabilityFilters,
    StockEntry,
)
from ow_prefect.testing.fake_runpod.fake import PATCHABLE_FIELDS, FakeRunPod, Fault, fake_runpod, main
from ow_prefect.testing.fake_runpod.logs import LOG_LINES_KEPT, LogLine
from ow_prefect.testing.fake_runpod.pods import IMAGE_VARIABLES, VCPUS_PER_GPU, FakePod, default_image_env
from ow_prefect.testing.fake_runpod.spec import PORT_PATTERN, SPEC_FILE, SPEC_URI, Problem, SpecSchemas, spec_schemas
from ow_prefect.testing.fake_runpod.volumes import FakeVolume

__all__ = [
    "AVAILABILITY_LEVELS",
    "CAPACITY_DETAIL",
    "CLOUDS",
    "CPU_PRICE_PER_VCPU",
    "DATA_CENTER_NAMES",
    "DEFAULT_DATA_CENTER",
    "DEFAULT_STOCK",
    "GPU_TYPES",
    "HOST_CUDA_VERSION",
    "IMAGE_VARIABLES",
    "default_image_env",
    "LOG_LINES_KEPT",
    "MAX_GPUS_PER_POD",
    "PATCHABLE_FIELDS",
    "PORT_PATTERN",
    "SPEC_FILE",
    "SPEC_URI",
    "VCPUS_PER_GPU",
    "AvailabilityFilters",
    "FakePod",
    "FakeRunPod",
    "FakeVolume",
    "Fault",
    "LogLine",
    "Problem",
    "SpecSchemas",
    "StockEntry",
    "fake_runpod",
    "main",
    "spec_schemas",
]
