"""Deploy flow.py on a `runpod` work pool with GPU job variables, the Prefect way.

    python examples/byo_flow/deploy.py --pool gpu --source https://github.com/me/my-flows.git \
        --entrypoint examples/byo_flow/flow.py:word_count --image ghcr.io/me/ow-train:0.1

`--source` is where the pod gets the code: a git repository (cloned in the pod), or a directory the pod has
(baked into its image, or this directory for a `process` pool on this machine). The image needs Prefect and
ow_prefect (ow_prefect's images have both). Then: `prefect deployment run word-count/gpu -p input_file=...`.
"""

import argparse
from pathlib import Path

from prefect import flow

from ow_prefect.workers.runpod import runpod_job_variables


def deploy(pool: str, source: str, entrypoint: str, name: str = "gpu", **gpu: object) -> str:
    # runpod_job_variables checks the names and values: Prefect itself would accept `min_vram=24` and ignore it.
    job_variables = runpod_job_variables(**gpu)
    deployment_id = flow.from_source(source=source, entrypoint=entrypoint).deploy(
        name=name, work_pool_name=pool, job_variables=job_variables, print_next_steps=False
    )
    return str(deployment_id)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pool", default="gpu")
    parser.add_argument("--source", default=str(Path(__file__).parent))
    parser.add_argument("--entrypoint", default="flow.py:word_count")
    parser.add_argument("--image", help="the pod's image (default: the pool's)")
    parser.add_argument("--min-vram-gb", type=float, default=24)
    parser.add_argument("--gpu", action="append", default=[], dest="gpu_types", help="preferred GPU type id")
    args = parser.parse_args()
    gpu = {"min_vram_gb": args.min_vram_gb, "gpu_types": args.gpu_types} | ({"image": args.image} if args.image else {})
    print(deploy(args.pool, args.source, args.entrypoint, **gpu))
