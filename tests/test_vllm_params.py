"""Parameters of the vLLM jobs without running vLLM: VRAM estimates, served names, job variables."""

from ow_prefect.jobs.api import ApiJob, ApiParams, adapter_name
from ow_prefect.jobs.inference import ModelRef
from ow_prefect.jobs.vram import estimate_serving_vram_gb


def test_serving_vram_grows_with_the_model_context_and_adapters(tiny_model):
    tiny = estimate_serving_vram_gb(str(tiny_model), max_model_len=256)
    assert tiny == 3  # weights are nothing; 2 GiB of context and activations round up
    eight_b = estimate_serving_vram_gb("meta-llama/Llama-3.1-8B-Instruct-does-not-exist-8B", max_model_len=8192)
    assert 18 <= eight_b <= 24  # 16 GB of bf16 weights + KV cache + context
    longer = estimate_serving_vram_gb("x/Model-8B", max_model_len=32768)
    with_loras = estimate_serving_vram_gb("x/Model-8B", max_model_len=8192, lora_rank=64, lora_adapters=4)
    assert longer > eight_b and with_loras > eight_b
    assert estimate_serving_vram_gb("x/Model-8B", max_model_len=8192, quantized=True) < eight_b


def test_api_job_asks_the_worker_for_memory_and_its_port(tiny_model):
    params = ApiParams(model=str(tiny_model), max_model_len=256)
    assert ApiJob.job_variables(params) == {"min_vram_gb": 3, "ports": ["8000/http"]}
    ref = ModelRef(base=str(tiny_model), adapter="adapter:dir-0123456789ab", job="ftjob-abc")
    served = ApiParams(
        model=ref.model_dump(), lora_adapters=[{"base": str(tiny_model), "adapter": "adapter:dir-ba9876543210"}]
    )
    assert served.served_names == [str(tiny_model), "ftjob-abc", "adapter-dir-ba9876543210"]
    assert adapter_name(ModelRef(base="b", adapter="adapter:dir-0123456789ab")) == "adapter-dir-0123456789ab"
