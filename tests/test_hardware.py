"""OpenWeights' `allowed_hardware` and other submission keywords as the RunPod worker's job variables."""

import pytest

from ow_prefect import ParameterError
from ow_prefect.jobs.hardware import OPENWEIGHTS_GPUS, cloud_variable, hardware_variables
from ow_prefect.jobs.submit import submission_options
from ow_prefect.testing.fake_runpod import GPU_TYPES
from ow_prefect.workers.runpod import RunPodVariables


def test_every_openweights_gpu_name_is_a_runpod_gpu_type():
    """The names map onto ids of RunPod's GPU types page (which FakeRunPod's catalog copies)."""
    assert set(OPENWEIGHTS_GPUS.values()) <= set(GPU_TYPES)


def test_allowed_hardware_becomes_gpu_types_count_and_no_memory_floor():
    variables = hardware_variables(["1x L40", "1x A100", "1x NVIDIA RTX A6000", "1x L40"], None)
    assert variables == {
        "gpu_types": ["NVIDIA L40", "NVIDIA A100 80GB PCIe", "NVIDIA RTX A6000"],
        "gpu_count": 1,
        "min_vram_gb": 0,
    }
    assert hardware_variables(["2x H200"], 160)["min_vram_gb"] == 160  # asked for memory: kept
    RunPodVariables(**variables)  # what the worker's pool form accepts


@pytest.mark.parametrize(
    "given,message",
    [
        (["1x L40", "2x H200"], r"keep one count, e.g. \['1x L40'\]"),
        (["L40"], "is not '<count>x <GPU>'"),
        (["1x Potato"], "unknown GPU 'Potato'; use an OpenWeights name"),
        ("1x L40", "give a non-empty list"),
        ([], "give a non-empty list"),
    ],
)
def test_what_cannot_be_mapped_says_what_to_write(given, message):
    with pytest.raises(ParameterError, match=message):
        hardware_variables(given, None)


def test_submission_keywords_leave_the_parameters_and_the_job_id_alone():
    params = {"model": "m", "requires_vram_gb": "guess"}
    with pytest.warns(UserWarning, match="base_image='nielsrolf/ow-default' ignored"):
        kwargs, options = submission_options(
            {
                **params,
                "allowed_hardware": ["2x A100S"],
                "cloud_type": "ALL",
                "worker_max_uptime": 1.5,
                "create_on_failed_status": False,
                "base_image": "nielsrolf/ow-default",
            }
        )
    assert kwargs == {"model": "m", "requires_vram_gb": None}
    assert options.job_variables == {
        "gpu_types": ["NVIDIA A100-SXM4-80GB"],
        "gpu_count": 2,
        "min_vram_gb": 0,
        "cloud": "ANY",
        "max_runtime": 5400,
    }
    assert options.rerun == frozenset({"canceled"})
    with pytest.raises(ParameterError, match="use 'SECURE', 'COMMUNITY' or 'ALL'"):
        cloud_variable("cheap")
