"""A small inspect-ai task for the eval tests: the tiny model's arithmetic questions, scored by whether the
answer has the shape the test adapter learned ("… plus … equals …")."""

from inspect_ai import Task, task
from inspect_ai.dataset import Sample
from inspect_ai.model import ChatMessageSystem, ChatMessageUser
from inspect_ai.scorer import includes
from inspect_ai.solver import generate

from ow_prefect.testing.tiny_model import sample_conversations


@task
def arithmetic() -> Task:
    samples = []
    for row in sample_conversations(6, seed=7):
        system, question, _ = row["messages"]
        samples.append(
            Sample(
                input=[ChatMessageSystem(content=system["content"]), ChatMessageUser(content=question["content"])],
                target="equals",
            )
        )
    return Task(dataset=samples, solver=generate(), scorer=includes())
