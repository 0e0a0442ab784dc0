"""Create or update a block document only when its values changed, and say which it was."""

from __future__ import annotations

from typing import Any, Literal

Outcome = Literal["created", "updated", "unchanged"]


def block_values(block: Any) -> dict[str, Any]:
    """A block's stored values, secrets revealed and nested blocks included: for comparing, never for printing."""
    keys = set(block.model_json_schema(by_alias=False)["properties"])
    return block.model_dump(mode="json", include=keys, context={"include_secrets": True})


def upsert(block: Any, name: str) -> tuple[Outcome, Any]:
    """Save `block` as `name` unless a document with the same values exists; return the outcome and the saved
    block (the existing one when unchanged: its `_block_document_id` is what references should point at)."""
    from prefect.exceptions import ObjectNotFound

    try:
        existing = type(block).load(name, _sync=True)
    except (ObjectNotFound, ValueError):  # ValueError: the block type is not registered yet
        block.save(name, _sync=True)
        return "created", block
    if block_values(existing) == block_values(block):
        return "unchanged", existing
    block.save(name, overwrite=True, _sync=True)
    return "updated", block
