"""Print every route vLLM's OpenAI server registers, as JSON [[path, [methods]], ...] — run with the vLLM
environment's interpreter (`OW_VLLM_PYTHON`), which is the only one that can import vLLM.

    $OW_VLLM_PYTHON tests/vllm_routes.py --model MODEL_DIR

It builds the server's FastAPI app the way `vllm.entrypoints.openai.api_server` does (its own argument parser,
its own `build_app`) for every task vLLM knows, with its development routes switched on and the pooling routers
(which `build_app` adds only for a pooling model) included, so the list is a superset of what any served model
exposes and grows by itself when vLLM adds routes. tests/reliability/test_security.py probes each through the
gateway.
"""

import importlib
import importlib.util
import json
import os
import pkgutil
import sys

os.environ["VLLM_SERVER_DEV_MODE"] = "1"  # before vllm reads its environment: its dev routes count too

from vllm.entrypoints.launchers.app import build_app
from vllm.entrypoints.launchers.cli_args import make_arg_parser
from vllm.tasks import GENERATION_TASKS, POOLING_TASKS
from vllm.utils.argparse_utils import FlexibleArgumentParser


def main() -> None:
    args = make_arg_parser(FlexibleArgumentParser()).parse_args(sys.argv[1:])
    routes: dict[str, set[str]] = {}
    for tasks in (("generate", "render"), (*GENERATION_TASKS, *POOLING_TASKS)):
        try:
            app = build_app(args, supported_tasks=tasks)
        except Exception as exc:  # a task whose routers need a real model config: the other call covers the rest
            print(f"build_app({tasks}) failed: {exc!r}", file=sys.stderr)
            continue
        import vllm.entrypoints.pooling as pooling

        for module in pkgutil.iter_modules(pooling.__path__):
            if module.ispkg and importlib.util.find_spec(f"{pooling.__name__}.{module.name}.api_router"):
                app.include_router(importlib.import_module(f"{pooling.__name__}.{module.name}.api_router").router)
        for route in app.routes:
            routes.setdefault(route.path, set()).update(getattr(route, "methods", None) or {"GET"})
    if not routes:
        sys.exit("could not build vLLM's app")
    print(json.dumps(sorted([path, sorted(methods)] for path, methods in routes.items())))


if __name__ == "__main__":
    main()
