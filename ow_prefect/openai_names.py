"""Which model names go to OpenAI (``gpt-…``, ``o3…``, ``ft:gpt-…``, or any name as ``openai/<name>``): one rule
for the chat client's routing and for batch inference's choice of flow. A leaf: it imports nothing of ours."""

from __future__ import annotations

import re

OPENAI_PREFIX = "openai/"
OPENAI_NAME_RE = re.compile(r"^(gpt-|o\d|chatgpt-|ft:gpt-)")


def is_openai(model: str) -> bool:
    return model.startswith(OPENAI_PREFIX) or bool(OPENAI_NAME_RE.match(model))
