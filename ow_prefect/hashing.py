"""Content hashing: file ids, job ids and code hashes (see docs/architecture.md, "Identity")."""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

HASH_CHARS = 12
# `{prefix}-{hash}`, the prefix a job type's name (a Python identifier), plus fine-tuning's `-{job_id_suffix}`.
JOB_ID_RE = re.compile(r"^[^\W\d]\w{0,99}-[0-9a-f]{12}(?:-[a-z0-9_\-]{1,32})?$")


def canonical_json(value: Any) -> str:
    """JSON with sorted keys and no whitespace, so equal values always give equal text."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: Path, chunk_size: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(chunk_size):
            digest.update(chunk)
    return digest.hexdigest()


def file_id(purpose: str, content_sha256: str) -> str:
    """`{purpose}:file-{sha256[:12]}`, as OpenWeights names files."""
    return f"{purpose}:file-{content_sha256[:HASH_CHARS]}"


def code_hash(root: Path, relative_paths: Iterable[str]) -> str:
    """sha256 over sorted relative paths and their bytes; directories are walked (``__pycache__`` skipped)."""
    files: set[str] = set()
    for rel in relative_paths:
        path = root / rel
        if path.is_dir():
            files.update(
                p.relative_to(root).as_posix()
                for p in path.rglob("*")
                if p.is_file() and "__pycache__" not in p.parts and p.suffix != ".pyc"
            )
        elif path.is_file():
            files.add(Path(rel).as_posix())
        else:
            raise FileNotFoundError(f"job code file {path} does not exist")
    digest = hashlib.sha256()
    for rel in sorted(files):
        digest.update(rel.encode() + b"\0")
        digest.update((root / rel).read_bytes() + b"\0")
    return digest.hexdigest()


def is_job_id(value: object) -> bool:
    return isinstance(value, str) and JOB_ID_RE.fullmatch(value) is not None


def job_id(prefix: str, params: dict[str, Any], code_sha256: str, image: str) -> str:
    """`{prefix}-{sha256(canonical params + code hash + image)[:12]}`."""
    payload = canonical_json({"params": params, "code": code_sha256, "image": image})
    return f"{prefix}-{sha256_bytes(payload.encode())[:HASH_CHARS]}"
