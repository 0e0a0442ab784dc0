"""The GPU verification kit's parts that run without a GPU: the wheel list (the train image's pins), the download
and the command `scripts/gpu-check` prints, the training driver's defaults (equal to FineTuningParams'), and the
driver itself on CPU with the transformers backend. The CUDA checks themselves are tests/gpu (marker `gpu`); the
whole kit script runs on CPU in CI as `scripts/gpu-check --dry-run` (.ci/run)."""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def wheel_list() -> dict[str, str]:
    pins = {}
    for line in (ROOT / "scripts" / "gpu-wheels.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, _, version = line.partition("==")
            assert version, f"{line!r}: pin an exact version, so one version of each travels"
            pins[re.sub(r"[-_.]+", "_", name).lower()] = version
    return pins


def test_the_wheel_list_carries_the_train_images_versions_of_what_the_gpu_machine_lacks():
    from tests.test_docker import pins as image_pins

    pins = wheel_list()
    image = {
        name.replace("-", "_"): version
        for name, version in image_pins(ROOT / "docker" / "requirements-train.txt").items()
    }
    for name in ("unsloth", "unsloth_zoo", "trl", "peft", "datasets"):
        assert pins[name] == image[name], f"{name}: the kit carries {pins[name]}, the train image pins {image[name]}"
    # what the GPU machine has of its own (docs/gpu-verification.md): the image pins the same
    assert (image["torch"], image["transformers"], image["accelerate"]) == ("2.11.0", "5.17.0", "1.15.0")
    assert "bitsandbytes" not in pins  # does not fit one call: 4-bit stays unverified, and the docs say so
    assert "4-bit" in (ROOT / "docs" / "gpu-verification.md").read_text()
    kit = (ROOT / "scripts" / "gpu-kit").read_text()
    assert all(name in kit for name in ("torch", "transformers", "trl", "peft", "docker/requirements-train.txt"))


def test_the_driver_defaults_are_fine_tuning_defaults():
    sys.path.insert(0, str(ROOT / "tests" / "gpu"))
    try:
        from train_one import DEFAULTS
    finally:
        sys.path.pop(0)
    from ow_prefect.jobs.finetune import FineTuningParams

    fields = FineTuningParams.model_fields
    assert {k: fields[k].get_default(call_default_factory=True) for k in DEFAULTS} == DEFAULTS
    # every field the training code reads is in the driver's config (a new FineTuningParams field read by
    # train.py or backends.py must be added to DEFAULTS, or the GPU kit fails only on the lent GPU)
    read = set()
    for name in ("train.py", "backends.py"):
        source = (ROOT / "flows" / "finetune" / name).read_text()
        code = "\n".join(line for line in source.splitlines() if not line.lstrip().startswith(("#", "python ")))
        read |= set(re.findall(r"\bcfg\.([a-z_0-9]+)\b", code))
    driver_sets = {"loss", "model"}  # from its command line
    read -= {"json", "training_file", "test_file"}  # the module's CLI entry (__main__), not train.main
    assert read <= set(DEFAULTS) | driver_sets, sorted(read - set(DEFAULTS) - driver_sets)


@pytest.mark.slow
def test_gpu_check_downloads_the_wheels_and_prints_the_command(tmp_path):
    dest = tmp_path / "wheels"
    done = subprocess.run(
        [str(ROOT / "scripts" / "gpu-check"), "--dest", str(dest)], capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stdout + done.stderr
    names = {re.sub(r"[-_.]+", "_", w.name.split("-")[0]).lower(): w.name.split("-")[1] for w in dest.glob("*.whl")}
    assert names == wheel_list()
    assert sum(w.stat().st_size for w in dest.glob("*.whl")) < 56 * 2**20  # leaves room for the work tree
    assert f'carry: ["{dest}"]' in done.stdout
    command = done.stdout.split("command:\n", 1)[1].splitlines()[0]
    assert command == f"scripts/gpu-kit {dest}"  # the kit's steps are in the script, checked on CPU by --dry-run


@pytest.mark.slow
def test_the_driver_trains_and_reports_on_cpu(tiny_model, datasets_dir, tmp_path):
    args = [sys.executable, str(ROOT / "tests" / "gpu" / "train_one.py"), "--loss", "sft", "--model", str(tiny_model)]
    args += ["--data", str(datasets_dir / "conversations.jsonl"), "--out", str(tmp_path), "--steps", "4"]
    env = {**os.environ, "OW_TRAIN_BACKEND": "transformers"}
    done = subprocess.run(args, capture_output=True, text=True, timeout=600, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    (line,) = [x for x in done.stdout.splitlines() if x.startswith("RESULT ")]
    report = json.loads(line.removeprefix("RESULT "))
    assert report["backend"] == "transformers" and report["steps"] == 4 and len(report["losses"]) == 4
    assert all(math.isfinite(x) for x in report["losses"]) and report["tokens_per_s"] > 0
    assert report["logit_delta"] > 0 and (tmp_path / "adapter" / "adapter_config.json").exists()
