"""`ow.files`: validated, content-addressed uploads (sync and async twins)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import IO, TYPE_CHECKING

import anyio.to_thread

from ow_prefect.client._loop import same_docs
from ow_prefect.datasets import canonical_purpose, validate_dataset
from ow_prefect.errors import DatasetValidationError
from ow_prefect.storage import FileObject, check_purpose

if TYPE_CHECKING:
    from ow_prefect.client._client import BaseOpenWeights

FileInput = bytes | IO[bytes] | str | os.PathLike[str]


def read_input(file: FileInput, max_bytes: int) -> tuple[bytes, str | None]:
    """The bytes and a filename of what a caller passed: bytes, a binary file object or a path."""
    if isinstance(file, bytes):
        data, name = file, None
    elif isinstance(file, str | os.PathLike):
        path = Path(file)
        size = path.stat().st_size
        if size > max_bytes:
            raise DatasetValidationError(
                str(path),
                "?",
                [f"file: {size} bytes is over the limit of {max_bytes} bytes; split it or raise OW_MAX_FILE_MB"],
            )
        data, name = path.read_bytes(), path.name
    else:
        data = file.read(max_bytes + 1)
        if isinstance(data, str):
            raise TypeError("open the file in binary mode ('rb')")
        name = Path(getattr(file, "name", "") or "").name or None
    return data, name


class Files:
    def __init__(self, client: BaseOpenWeights):
        self._client = client

    def validate(self, file: FileInput, purpose: str) -> int:
        """Validate without storing; return the number of rows or raise one error listing every problem."""
        purpose = canonical_purpose(purpose)
        data, name = read_input(file, self._client.settings.max_file_bytes)
        return validate_dataset(data, purpose, source=name or "file", max_bytes=self._client.settings.max_file_bytes)

    def create(self, file: FileInput, purpose: str) -> FileObject:
        """Validate and store a file; identical bytes are stored once and get the same id. OpenWeights'
        ``purpose="preferences"`` is stored as ``preference``."""
        purpose = canonical_purpose(purpose)
        check_purpose(purpose)
        data, name = read_input(file, self._client.settings.max_file_bytes)
        validate_dataset(data, purpose, source=name or "file", max_bytes=self._client.settings.max_file_bytes)
        return self._client.storage.put_bytes(data, purpose, filename=name)

    def upload(self, path: str | os.PathLike[str], purpose: str) -> FileObject:
        """Store a file (validated like `create`) or a whole directory (adapters, checkpoints)."""
        if Path(path).is_dir():
            return self._client.storage.put_path(path, canonical_purpose(purpose))
        return self.create(path, purpose)

    def retrieve(self, file_id: str) -> FileObject:
        return self._client.storage.info(file_id)

    get_by_id = retrieve  # OpenWeights' name

    def content(self, file_id: str) -> bytes:
        return self._client.storage.get_bytes(file_id)

    def download(self, file_id: str, dest: str | os.PathLike[str]) -> Path:
        return self._client.storage.download(file_id, dest)


@same_docs(Files)
class AsyncFiles:
    """Storage I/O is blocking (boto3, disk), so here the sync `Files` is the implementation: the async twin runs
    it in a worker thread."""

    def __init__(self, client: BaseOpenWeights):
        self._sync = Files(client)

    async def validate(self, file: FileInput, purpose: str) -> int:
        return await anyio.to_thread.run_sync(self._sync.validate, file, purpose)

    async def create(self, file: FileInput, purpose: str) -> FileObject:
        return await anyio.to_thread.run_sync(self._sync.create, file, purpose)

    async def upload(self, path: str | os.PathLike[str], purpose: str) -> FileObject:
        return await anyio.to_thread.run_sync(self._sync.upload, path, purpose)

    async def retrieve(self, file_id: str) -> FileObject:
        return await anyio.to_thread.run_sync(self._sync.retrieve, file_id)

    get_by_id = retrieve  # OpenWeights' name

    async def content(self, file_id: str) -> bytes:
        return await anyio.to_thread.run_sync(self._sync.content, file_id)

    async def download(self, file_id: str, dest: str | os.PathLike[str]) -> Path:
        return await anyio.to_thread.run_sync(self._sync.download, file_id, dest)
