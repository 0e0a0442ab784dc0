"""Parameters of the vLLM jobs without running vLLM: VRAM estimates, served names, job variables."""

import re

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


def test_the_api_endpoint_locally_on_runpod_and_on_a_mapped_port(monkeypatch):
    from flows.vllm_api.flow import endpoint

    monkeypatch.delenv("RUNPOD_POD_ID", raising=False)
    monkeypatch.delenv("RUNPOD_TCP_PORT_8000", raising=False)
    # locally the gateway stays on loopback, on the port the system gives it when it binds (the URL follows)
    assert endpoint(8000) == ("127.0.0.1", 0, None)
    monkeypatch.setenv("RUNPOD_POD_ID", "abc123")
    assert endpoint(8000) == ("0.0.0.0", 8000, "https://abc123-8000.proxy.runpod.net/v1")  # RunPod's http proxy
    monkeypatch.setenv("RUNPOD_TCP_PORT_8000", "41234")
    monkeypatch.setenv("RUNPOD_PUBLIC_IP", "203.0.113.7")
    assert endpoint(8000) == ("0.0.0.0", 41234, "http://203.0.113.7:41234/v1")  # a mapped port (tcp, FakeRunPod)


def test_prompts_continue_a_prefill_and_take_a_chat_template(tiny_model):
    from transformers import AutoTokenizer

    from flows.inference.runner import render

    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    rows = [{"messages": [{"role": "user", "content": "What is two plus two?"}]}]
    (plain,) = render(tokenizer, rows, {})
    assert plain.endswith("<|im_start|>assistant\n")  # a generation prompt
    (prefilled,) = render(tokenizer, rows, {"prefill": "Two plus"})
    assert prefilled.endswith("<|im_start|>assistant\nTwo plus")  # continued, not closed
    template = (
        "{% for m in messages %}[{{ m.role }}] {{ m.content }}\n{% endfor %}"
        "{% if add_generation_prompt %}[assistant]{% endif %}"
    )
    (custom,) = render(tokenizer, rows, {"chat_template": template})
    assert custom == "[user] What is two plus two?\n[assistant]"

    # raw prompts, and alternatives: the first that leaves max_tokens in the context (MMLU-Pro's k-shot ... 0-shot)
    long, short = "word " * 300, "Question: two plus two?"
    rows = [{"prompt": "as is"}, {"prompts": [long, short]}, {"prompts": [short]}]
    assert render(tokenizer, rows, {"max_model_len": 256, "max_tokens": 16}) == ["as is", short, short]
    assert render(tokenizer, [{"prompts": [long, short]}], {"max_model_len": 4096, "max_tokens": 16}) == [long]


def test_max_loras_limits_the_adapter_slots_and_takes_openweights_defaults(tiny_model, tmp_path):
    from flows._vllm import ServerSpec, has_cuda, server_command

    adapters = {}
    for name in ("a", "b", "c"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "adapter_config.json").write_text('{"r": 8}')
        adapters[name] = tmp_path / name

    def slots(max_loras):
        command = server_command(ServerSpec(str(tiny_model), str(tiny_model), 256, 4, adapters, max_loras=max_loras), 1)
        return int(command[command.index("--max-loras") + 1]) - (0 if has_cuda() else 1)  # CPU keeps a spare slot

    assert (slots(None), slots(2), slots(9)) == (3, 2, 3)
    assert ApiParams(model=str(tiny_model), max_loras=-1, max_lora_rank="guess").max_loras is None  # OpenWeights'


def test_a_vllm_that_exits_while_starting_is_quoted_even_when_its_output_is_read_late():
    """vLLM can exit before the thread pumping its output has read its last lines; the error still quotes them
    (CI once saw "vLLM exited with code 7 while starting:" and nothing after it). Here the pump is made late."""
    import subprocess
    import threading
    import time
    from collections import deque

    import pytest

    from flows._vllm import free_port, wait_healthy

    proc = subprocess.Popen(
        ["sh", "-c", "echo 'no vLLM in this interpreter'; exit 7"], stdout=subprocess.PIPE, text=True
    )
    tail: deque[str] = deque(maxlen=30)

    def late_pump() -> None:
        time.sleep(1.0)
        tail.extend(line.rstrip("\n") for line in proc.stdout)

    logs = threading.Thread(target=late_pump, daemon=True)
    logs.start()
    with pytest.raises(RuntimeError, match="code 7 while starting:\nno vLLM in this interpreter"):
        wait_healthy(proc, free_port(), tail, timeout=30, logs=logs)


def test_a_local_model_that_is_not_there_is_refused_before_vllm_starts(tiny_model, tmp_path, monkeypatch):
    """Every vLLM start of the flows (API, batch, MMLU-Pro, inspect's server) reads the model's context length
    first; a model named by a path that does not exist stops there, with the fix, instead of vLLM importing itself
    and then failing on it as a Hub name."""
    import pytest

    from flows._vllm import ServerSpec, fit_max_model_len, server_command
    from ow_prefect.errors import ConfigurationError

    monkeypatch.delenv("RUNPOD_POD_ID", raising=False)
    for missing in ("/no/such/model", "./no-such-model", "~/no-such-model", str(tmp_path / "gone")):
        with pytest.raises(ConfigurationError, match=f"model '{re.escape(missing)}' does not exist on this machine"):
            server_command(ServerSpec(missing, missing, 256, 4), 1)
    monkeypatch.setenv("RUNPOD_POD_ID", "pod123")
    with pytest.raises(ConfigurationError, match="does not exist on pod pod123: .* a Hugging Face model is named"):
        fit_max_model_len("/workspace/models/not-synced", 256)
    assert fit_max_model_len(str(tiny_model), 100_000) < 100_000  # a local model that is there: its own maximum
    (tmp_path / "model.gguf").write_bytes(b"")  # a single-file model (GGUF) is a path too
    assert fit_max_model_len(str(tmp_path / "model.gguf"), 256) == 256
    assert fit_max_model_len("ow-tester/not-on-the-hub", 256) == 256  # a Hub name is vLLM's to find
