"""A Hugging Face LoRA adapter as a model, as OpenWeights takes it: a Hub repo (``org/name``, or
``org/name/checkpoint-100`` for a folder in it) or a local directory holding an ``adapter_config.json``.

The client reads the base model from the adapter's ``adapter_config.json`` (``base_model_name_or_path``),
downloads a Hub adapter's files, stores them content-addressed (``adapter:dir-…``) and passes the reference
every serving job takes: ``{"base": ..., "adapter": ..., "name": <what was given>}`` — vLLM serves the adapter
under that name. A Hub id without an ``adapter_config.json`` (or a Hub that cannot be reached) is a base model,
passed on as it is. The Hub's answer for a repo is kept for the process (a failed lookup is tried again).
"""

from __future__ import annotations

import json
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

from ow_prefect.storage import ID_RE

ADAPTER_PURPOSE = "adapter"
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")
HUB_PATH_RE = re.compile(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+(/[\w.\-]+)*$")


def adapter_reference(value: Any, storage: Any) -> Any:
    """`value` as a model reference when it is a LoRA adapter (see the module docstring); else unchanged. Only
    the adapter's config and weights are stored (not checkpoints or tokenizer files next to them)."""
    if not isinstance(value, str) or ID_RE.match(value) or value.startswith(("ftjob-", "ftjob:", "openai/")):
        return value
    local = Path(value).expanduser()
    if local.is_dir():
        return _stored(local, value, storage) if (local / ADAPTER_CONFIG).is_file() else value
    if not HUB_PATH_RE.match(value):
        return value
    folder = hub_adapter(value)
    return _stored(folder, value, storage) if folder is not None else value


def with_adapter_model(params: dict[str, Any], storage: Any) -> dict[str, Any]:
    """`params` with its `model` through `adapter_reference` (a job type's `prepare_params`)."""
    return {**params, "model": adapter_reference(params["model"], storage)} if "model" in params else params


def adapter_references(values: Any, storage: Any) -> Any:
    """`adapter_reference` of every item of a list (``lora_adapters``)."""
    return [adapter_reference(v, storage) for v in values] if isinstance(values, list) else values


_HUB_LOOKUPS: dict[str, Path | None] = {}  # Hub path -> its adapter folder, None: not an adapter (definite answers)


def hub_adapter(path: str) -> Path | None:
    """The local folder of the Hub adapter `path` (``org/name[/folder]``) with its config and weights downloaded;
    None when there is no adapter_config.json there or the Hub cannot be asked (then it is asked again next time)."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import (
        EntryNotFoundError,
        HFValidationError,
        RemoteEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    if path in _HUB_LOOKUPS:
        return _HUB_LOOKUPS[path]
    parts = path.split("/")
    repo, prefix = "/".join(parts[:2]), "".join(f"{part}/" for part in parts[2:])
    try:
        config = Path(hf_hub_download(repo, f"{prefix}{ADAPTER_CONFIG}"))
    except (RemoteEntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError, HFValidationError):
        _HUB_LOOKUPS[path] = None  # a base model (or one the run cannot load either: it says so then)
        return None
    except Exception:  # offline, unreachable: passed on as a model id
        return None
    for weights in ADAPTER_WEIGHTS:
        try:
            hf_hub_download(repo, f"{prefix}{weights}")
        except EntryNotFoundError:
            continue
        _HUB_LOOKUPS[path] = config.parent
        return config.parent
    raise ValueError(f"{path}: has an {ADAPTER_CONFIG} but none of {list(ADAPTER_WEIGHTS)} next to it")


def _stored(folder: Path, given: str, storage: Any) -> dict[str, str]:
    config = json.loads((folder / ADAPTER_CONFIG).read_text())
    base = config.get("base_model_name_or_path")
    if not isinstance(base, str) or not base:
        raise ValueError(
            f"{given}: its {ADAPTER_CONFIG} names no base_model_name_or_path; set it there, or pass "
            "model={'base': <base model>, 'adapter': ow.files.upload(<adapter dir>, 'adapter').id}"
        )
    if base.startswith(("/", "~", ".")) and not Path(base).expanduser().is_dir():
        raise ValueError(
            f"{given}: its {ADAPTER_CONFIG} names the base model {base!r}, a local path that does not exist here; "
            "set base_model_name_or_path to the base model's Hub id"
        )
    weights = next((folder / name for name in ADAPTER_WEIGHTS if (folder / name).is_file()), None)
    if weights is None:
        raise ValueError(f"{given}: has an {ADAPTER_CONFIG} but none of {list(ADAPTER_WEIGHTS)} next to it")
    with tempfile.TemporaryDirectory(prefix="ow-adapter-") as tmp:
        for file in (folder / ADAPTER_CONFIG, weights):
            shutil.copyfile(file, Path(tmp) / file.name)
        adapter = storage.put_path(tmp, ADAPTER_PURPOSE).id
    return {"base": base, "adapter": adapter, "name": given}
