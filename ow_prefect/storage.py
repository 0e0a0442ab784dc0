"""Content-addressed storage on a Prefect filesystem block (local disk by default, S3/R2/MinIO via prefect-aws).

Layout inside the block (or local directory):

    blobs/<sha256>                          the bytes of every stored file, once per distinct content
    files/<purpose>/<file|dir>-<hash>.json  the record of a file id (a directory's record lists its entries)
    outputs/<job id>.json                   what a job's last run recorded (see `ow_prefect.jobs.outputs`)

Blobs are written before records, so a record that exists always points at complete content.
"""

from __future__ import annotations

import functools
import json
import os
import re
import shutil
import tempfile
import time
from collections.abc import Collection, Iterator
from pathlib import Path
from typing import Any, Literal, Protocol

from pydantic import BaseModel, Field, ValidationError, field_validator, model_validator

from ow_prefect.errors import ConfigurationError, NotFoundError, StorageError
from ow_prefect.hashing import HASH_CHARS, canonical_json, sha256_bytes, sha256_file
from ow_prefect.hashing import file_id as file_id_for
from ow_prefect.settings import OWSettings, get_settings

PURPOSE_RE = re.compile(r"^[a-z][a-z0-9_\-]{0,63}$")
ID_RE = re.compile(r"^(?P<purpose>[a-z][a-z0-9_\-]{0,63}):(?P<kind>file|dir)-(?P<hash>[0-9a-f]{12})$")
SHA256_PATTERN = r"^[0-9a-f]{64}$"


def check_relative_path(path: str) -> str:
    """`path` as a relative POSIX path that stays where it is put: no absolute path, no `..`, no empty, `.`
    or backslash part. Records are data (anyone who can write the bucket can write one), so every path in one
    is checked before it is used."""
    parts = path.split("/")
    if not path or path.startswith("/") or "\\" in path or "\0" in path or any(p in ("", ".", "..") for p in parts):
        raise ValueError(f"{path!r} is not a relative path inside the destination (no '..', '/' first or '\\')")
    return path


def check_key(key: str) -> str:
    """A storage key is a relative path inside the store: nothing is ever read or written outside it."""
    try:
        return check_relative_path(key)
    except ValueError:
        raise StorageError(f"storage key {key!r} would leave the store; nothing was read or written") from None


class DirectoryEntry(BaseModel):
    path: str
    sha256: str = Field(pattern=SHA256_PATTERN)
    bytes: int = Field(ge=0)

    @field_validator("path")
    @classmethod
    def _inside(cls, path: str) -> str:
        return check_relative_path(path)


class FileObject(BaseModel):
    """A stored file or directory. Item access (`f["id"]`, `f.get("filename")`) works too, as on OpenWeights'
    file dicts (whose ``"object"`` is always ``"file"``).

    Reading a record validates it: the id is a file id whose purpose, kind and hash agree with the record,
    `sha256` is 64 hex digits, the filename is one plain name and directory entries are relative paths that
    stay inside the directory (a directory's id is also the hash of its entries)."""

    id: str = Field(pattern=ID_RE.pattern)
    purpose: str = Field(pattern=PURPOSE_RE.pattern)
    kind: Literal["file", "directory"]
    bytes: int = Field(ge=0)
    sha256: str = Field(pattern=SHA256_PATTERN)
    filename: str | None = None
    created_at: float
    entries: list[DirectoryEntry] | None = None

    def __getitem__(self, key: str) -> Any:
        if key == "object":
            return "file"
        if key not in type(self).model_fields:
            raise KeyError(key)
        return getattr(self, key)

    def get(self, key: str, default: Any = None) -> Any:
        try:
            return self[key]
        except KeyError:
            return default

    @field_validator("filename")
    @classmethod
    def _plain_name(cls, filename: str | None) -> str | None:
        if filename is not None and "/" in check_relative_path(filename):
            raise ValueError(f"{filename!r} is not a plain file name")
        return filename

    @model_validator(mode="after")
    def _consistent(self) -> FileObject:
        match = ID_RE.match(self.id)
        kind = "file" if self.kind == "file" else "dir"
        if (match["purpose"], match["kind"]) != (self.purpose, kind):
            raise ValueError(f"id {self.id} does not name a {self.kind} of purpose {self.purpose!r}")
        if not self.sha256.startswith(match["hash"]):
            raise ValueError(f"id {self.id} does not match sha256 {self.sha256}")
        if self.kind == "file" and self.entries is not None:
            raise ValueError("a file has no entries")
        if self.kind == "directory":
            entries = self.entries or []
            if manifest_sha256(entries) != self.sha256:
                raise ValueError("its entries do not hash to its sha256 (the directory's content id)")
            paths = {entry.path for entry in entries}
            parents = {path.rsplit("/", n)[0] for path in paths for n in range(1, path.count("/") + 1)}
            if len(paths) < len(entries) or paths & parents:
                raise ValueError("its entries repeat a path, or use a file's path as a directory")
        return self


def manifest_sha256(entries: list[DirectoryEntry]) -> str:
    return sha256_bytes(canonical_json([entry.model_dump() for entry in entries]).encode())


def check_purpose(purpose: str) -> None:
    if not PURPOSE_RE.match(purpose):
        raise ValueError(f"purpose {purpose!r} is not valid: use lowercase letters, digits, '-' and '_'")


def parse_id(file_id: str) -> re.Match[str]:
    match = ID_RE.match(file_id)
    if not match:
        raise NotFoundError(f"{file_id!r} is not a file id; ids look like 'conversations:file-0123456789ab'")
    return match


def record_key(file_id: str) -> str:
    match = parse_id(file_id)
    return f"files/{match['purpose']}/{match['kind']}-{match['hash']}.json"


class Backend(Protocol):
    """What storage needs from a place to put bytes."""

    def exists(self, key: str) -> bool: ...
    def put_bytes(self, key: str, data: bytes) -> None: ...
    def get_bytes(self, key: str) -> bytes: ...
    def put_file(self, key: str, path: Path) -> None: ...
    def get_file(self, key: str, path: Path) -> None: ...


class LocalBackend:
    """A directory on local disk; writes are atomic (temp file + rename)."""

    def __init__(self, root: Path):
        self.root = Path(root).expanduser()

    def __repr__(self) -> str:
        return f"LocalBackend({str(self.root)!r})"

    def _path(self, key: str) -> Path:
        return self.root / check_key(key)

    def exists(self, key: str) -> bool:
        return self._path(key).exists()

    def _atomic_write(self, key: str, write) -> None:
        target = self._path(key)
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=".tmp-")
        try:
            with os.fdopen(fd, "wb") as f:
                write(f)
            os.replace(tmp, target)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def put_bytes(self, key: str, data: bytes) -> None:
        self._atomic_write(key, lambda f: f.write(data))

    def put_file(self, key: str, path: Path) -> None:
        def copy(f):
            with open(path, "rb") as src:
                shutil.copyfileobj(src, f, 1 << 20)

        self._atomic_write(key, copy)

    def get_bytes(self, key: str) -> bytes:
        try:
            return self._path(key).read_bytes()
        except FileNotFoundError:
            raise NotFoundError(f"{key} is not in storage {self.root}") from None

    def get_file(self, key: str, path: Path) -> None:
        if not self.exists(key):
            raise NotFoundError(f"{key} is not in storage {self.root}")
        shutil.copyfile(self._path(key), path)


TRANSIENT_S3_CODES = frozenset(
    {"InternalError", "ServiceUnavailable", "SlowDown", "RequestTimeout", "Throttling", "ThrottlingException"}
)
BOTOCORE_MAX_BACKOFF_S = 20.0  # botocore's standard retry mode waits rand() x min(2**(n-1), 20) s before retry n


def _transient(exc: Exception) -> bool:
    """An S3 error that the same request may not meet again: no connection, a timeout, 5xx, throttling (what
    botocore's standard mode retries); used to word the error once botocore has given up."""
    from boto3.exceptions import S3UploadFailedError
    from botocore.exceptions import ClientError, ConnectionError, HTTPClientError

    if isinstance(exc, ConnectionError | HTTPClientError):
        return True
    if isinstance(exc, S3UploadFailedError):  # upload_file raises it while handling the part's ClientError
        inner = exc.__cause__ or exc.__context__
        return isinstance(inner, Exception) and _transient(inner)
    if isinstance(exc, ClientError):
        error = exc.response.get("Error", {})
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0
        return (status >= 500 and status != 501) or error.get("Code") in TRANSIENT_S3_CODES  # 501: never will
    return False


def attempts_for(seconds: float) -> int:
    """botocore attempts whose expected back-off adds up to `seconds` (retry n waits rand() x min(2**(n-1),
    20) s: 0.5, 1, 2, 4, 8, then 10 s on average); 300 s -> 35 attempts."""
    waited, attempts = 0.0, 1
    while waited < seconds:
        waited += min(2 ** (attempts - 1), BOTOCORE_MAX_BACKOFF_S) / 2
        attempts += 1
    return attempts


def _storage_logger() -> Any:
    """The flow run's logger inside a run (the warning belongs in its logs), else this module's."""
    import logging

    try:
        from prefect.logging import get_run_logger

        return get_run_logger()
    except Exception:
        return logging.getLogger("ow_prefect.storage")


def _failure(caught_exception: Exception | None, response: Any) -> str:
    if caught_exception is not None:
        return f"{type(caught_exception).__name__}: {caught_exception}"
    http, parsed = response
    return f"{http.status_code} {(parsed or {}).get('Error', {}).get('Code', '')}".strip()


@functools.lru_cache(maxsize=8)
def s3_client(credentials: Any, attempts: int) -> Any:
    """An S3 client for a prefect-aws credentials block (its endpoint, region and botocore config), whose retries
    are botocore's standard mode with `attempts` attempts, unless the block's own config sets `retries` (then
    that wins). Each retry is a warning in the run's logs."""
    from botocore.config import Config

    params = credentials.aws_client_parameters.get_params_override()
    if credentials.region_name:
        params["region_name"] = credentials.region_name
    config = Config(retries={"mode": "standard", "total_max_attempts": attempts})
    if "config" in params:
        config = config.merge(params.pop("config"))
    client = credentials.get_boto3_session().client("s3", config=config, **params)
    max_attempts = client.meta.config.retries.get("total_max_attempts", attempts)
    where = client.meta.endpoint_url

    def remember_failure(request_dict: dict, caught_exception: Exception | None, response: Any, **_: Any) -> None:
        request_dict["context"]["ow_failure"] = _failure(caught_exception, response)  # why the next try, if any

    def warn_on_retry(request: Any, operation_name: str, **_: Any) -> None:
        attempt = request.context.get("retries", {}).get("attempt", 1)
        if attempt > 1:  # botocore has waited and asks again
            _storage_logger().warning(
                f"Storage S3 at {where} unavailable during {operation_name} ({request.context.get('ow_failure')}); "
                f"retrying, attempt {attempt} of {max_attempts}"
            )

    client.meta.events.register_first("needs-retry.s3", remember_failure)
    client.meta.events.register("request-created.s3", warn_on_retry)
    return client


class S3Backend:
    """A prefect-aws `S3Bucket` block (S3, R2, MinIO: the endpoint comes from its `AwsCredentials`).

    Calls are retried by botocore itself (standard mode: connection errors, timeouts, 5xx, throttling, with
    jittered back-off up to 20 s), with as many attempts as make about `OW_STORAGE_RETRY_SECONDS` (300 s by
    default) of waiting, so that a storage outage delays a job's uploads instead of losing what it computed.
    Errors that retrying cannot fix (403, a missing bucket) raise at once. (botocore's retry quota also stops
    retries once a client has spent 100 of them without a success in between: a long outage during a multipart
    upload, whose parts retry side by side, can end sooner than the setting says.)"""

    def __init__(self, bucket: Any, retry_seconds: float | None = None):
        self.bucket = bucket
        self.retry_seconds = get_settings().storage_retry_seconds if retry_seconds is None else retry_seconds
        self.client = s3_client(bucket.credentials, attempts_for(self.retry_seconds))
        self.prefix = (bucket.bucket_folder or "").strip("/")

    def __repr__(self) -> str:
        return f"S3Backend(bucket={self.bucket.bucket_name!r}, folder={self.prefix!r})"

    def _key(self, key: str) -> str:
        check_key(key)
        return f"{self.prefix}/{key}" if self.prefix else key

    def _is_missing(self, exc: Exception) -> bool:
        code = (getattr(exc, "response", None) or {}).get("Error", {}).get("Code", "")
        return code in ("404", "NoSuchKey", "NotFound")

    def _call(self, what: str, operation: Any, *args: Any, **kwargs: Any) -> Any:
        started = time.monotonic()
        try:
            return operation(*args, **kwargs)
        except Exception as exc:
            if not _transient(exc):
                raise
            raise StorageError(
                f"{self!r} was unavailable for {time.monotonic() - started:.0f} s during {what} ({exc}); check the "
                "endpoint and credentials of the storage block, or raise OW_STORAGE_RETRY_SECONDS"
            ) from exc

    def exists(self, key: str) -> bool:
        try:
            self._call(f"head {key}", self.client.head_object, Bucket=self.bucket.bucket_name, Key=self._key(key))
        except StorageError:
            raise
        except Exception as exc:
            if self._is_missing(exc):
                return False
            raise StorageError(f"cannot tell whether {key} is in {self!r}: {exc}") from exc
        return True

    def put_bytes(self, key: str, data: bytes) -> None:
        self._call(
            f"upload of {key}", self.client.put_object, Bucket=self.bucket.bucket_name, Key=self._key(key), Body=data
        )

    def put_file(self, key: str, path: Path) -> None:
        self._call(f"upload of {key}", self.client.upload_file, str(path), self.bucket.bucket_name, self._key(key))

    def get_bytes(self, key: str) -> bytes:
        def read() -> bytes:
            return self.client.get_object(Bucket=self.bucket.bucket_name, Key=self._key(key))["Body"].read()

        try:
            return self._call(f"download of {key}", read)
        except Exception as exc:
            if self._is_missing(exc):
                raise NotFoundError(f"{key} is not in {self!r}") from None
            raise

    def get_file(self, key: str, path: Path) -> None:
        if not self.exists(key):
            raise NotFoundError(f"{key} is not in {self!r}")
        self._call(f"download of {key}", self.client.download_file, self.bucket.bucket_name, self._key(key), str(path))


class BlockBackend:
    """Any other Prefect filesystem block, through its `read_path` / `write_path`."""

    def __init__(self, block: Any):
        self.block = block

    def __repr__(self) -> str:
        return f"BlockBackend({type(self.block).__name__})"

    def _call(self, method: str, key: str, *args: Any) -> Any:
        from prefect.utilities.asyncutils import run_coro_as_sync

        result = getattr(self.block, method)(check_key(key), *args)
        return run_coro_as_sync(result) if hasattr(result, "__await__") else result

    def exists(self, key: str) -> bool:
        try:
            self.get_bytes(key)
        except NotFoundError:
            return False
        return True

    def put_bytes(self, key: str, data: bytes) -> None:
        self._call("write_path", key, data)

    def get_bytes(self, key: str) -> bytes:
        """The bytes at `key`; NotFoundError only when the block says the path is not there, a StorageError
        naming the block's own error for anything else (an outage, a refused permission)."""
        try:
            return self._call("read_path", key)
        except StorageError:
            raise
        except Exception as exc:
            if _means_missing(exc):
                raise NotFoundError(f"{key} is not in {self!r}") from None
            why = exc.__cause__ or exc  # fsspec wraps a refused connection in a FileNotFoundError
            raise StorageError(f"cannot read {key} from {self!r}: {type(why).__name__}: {why}") from exc

    def put_file(self, key: str, path: Path) -> None:
        self.put_bytes(key, Path(path).read_bytes())

    def get_file(self, key: str, path: Path) -> None:
        Path(path).write_bytes(self.get_bytes(key))


def _means_missing(exc: Exception) -> bool:
    """Whether a filesystem block's error says "no such path": a FileNotFoundError (unless raised from another
    error: fsspec's HTTP filesystem turns a refused connection into one), or a cloud SDK's not-found error (GCS
    `NotFound`, Azure `ResourceNotFoundError`, S3 `NoSuchKey`), or a 404."""
    if isinstance(exc, FileNotFoundError):
        return exc.__cause__ is None or _means_missing(exc.__cause__)
    name = type(exc).__name__
    status = getattr(exc, "code", None) or getattr(exc, "status_code", None)
    return name in ("NotFound", "ResourceNotFoundError", "NoSuchKey") or status == 404


def backend_for_block(block: Any) -> Backend:
    from prefect.filesystems import LocalFileSystem

    if isinstance(block, LocalFileSystem):
        return LocalBackend(Path(block.basepath or "."))
    if type(block).__name__ == "S3Bucket":
        return S3Backend(block)
    if hasattr(block, "read_path") and hasattr(block, "write_path"):
        return BlockBackend(block)
    raise ConfigurationError(f"block {type(block).__name__} is not a filesystem block (no read_path/write_path)")


def load_backend(settings: OWSettings | None = None) -> Backend:
    """The backend named by ``OW_STORAGE_BLOCK``, or the local directory when none is set."""
    settings = settings or get_settings()
    if not settings.storage_block:
        return LocalBackend(settings.local_storage_dir)
    from prefect.blocks.core import Block

    try:
        block = Block.load(settings.storage_block, _sync=True)
    except ValueError as exc:
        raise ConfigurationError(
            f"OW_STORAGE_BLOCK={settings.storage_block!r} cannot be loaded ({exc}). Create it first "
            "(see blocks/storage.py) or unset OW_STORAGE_BLOCK to use local disk."
        ) from exc
    return backend_for_block(block)


def _walk(root: Path, skip: Collection[str] = ()) -> Iterator[Path]:
    """Every file under `root`, sorted; directories and files named in `skip` are left out (not entered)."""
    found = []
    for folder, dirs, files in os.walk(root):
        dirs[:] = [d for d in dirs if d not in skip]
        found += [Path(folder, name) for name in files if name not in skip]
    yield from (path for path in sorted(found) if path.is_file())


class Storage:
    """Content-addressed files and directories on one backend."""

    def __init__(self, backend: Backend):
        self.backend = backend

    @classmethod
    def from_settings(cls, settings: OWSettings | None = None) -> Storage:
        return cls(load_backend(settings))

    def __repr__(self) -> str:
        return f"Storage({self.backend!r})"

    def _put_blob(self, sha256: str, *, data: bytes | None = None, path: Path | None = None) -> None:
        key = f"blobs/{sha256}"
        if self.backend.exists(key):
            return
        if data is not None:
            self.backend.put_bytes(key, data)
        else:
            self.backend.put_file(key, path)

    def _save_record(self, record: FileObject) -> FileObject:
        key = record_key(record.id)
        if self.backend.exists(key):
            return self.info(record.id)
        self.backend.put_bytes(key, record.model_dump_json(exclude_none=True).encode())
        return record

    def _put_file(self, purpose: str, sha: str, size: int, filename: str | None, **content: Any) -> FileObject:
        """Store one file's content (`data=` bytes or `path=`) under its id, unless that id exists already."""
        file_id = file_id_for(purpose, sha)
        if self.backend.exists(record_key(file_id)):
            return self.info(file_id)
        self._put_blob(sha, **content)
        record = FileObject(
            id=file_id, purpose=purpose, kind="file", bytes=size, sha256=sha, filename=filename, created_at=time.time()
        )
        return self._save_record(record)

    def put_bytes(self, data: bytes, purpose: str, filename: str | None = None) -> FileObject:
        check_purpose(purpose)
        return self._put_file(purpose, sha256_bytes(data), len(data), filename, data=data)

    def put_path(self, path: str | os.PathLike[str], purpose: str, skip: Collection[str] = ()) -> FileObject:
        """Store a file or a whole directory; unchanged content is never uploaded twice. In a directory, files
        and folders named in `skip` (e.g. ``.git``) are left out."""
        check_purpose(purpose)
        path = Path(path)
        if path.is_dir():
            return self._put_directory(path, purpose, skip)
        if not path.is_file():
            raise NotFoundError(f"{path} does not exist")
        return self._put_file(purpose, sha256_file(path), path.stat().st_size, path.name, path=path)

    def _put_directory(self, root: Path, purpose: str, skip: Collection[str]) -> FileObject:
        entries = []
        for file in _walk(root, skip):
            sha = sha256_file(file)
            self._put_blob(sha, path=file)
            entries.append(
                DirectoryEntry(path=file.relative_to(root).as_posix(), sha256=sha, bytes=file.stat().st_size)
            )
        manifest_sha = manifest_sha256(entries)
        return self._save_record(
            FileObject(
                id=f"{purpose}:dir-{manifest_sha[:HASH_CHARS]}",
                purpose=purpose,
                kind="directory",
                bytes=sum(e.bytes for e in entries),
                sha256=manifest_sha,
                filename=root.resolve().name or None,
                created_at=time.time(),
                entries=entries,
            )
        )

    def info(self, file_id: str) -> FileObject:
        """The record of `file_id`, validated (see `FileObject`): a record that is not what its key promises is
        a StorageError, never used."""
        key = record_key(file_id)
        try:
            raw = self.backend.get_bytes(key)
        except NotFoundError:
            raise NotFoundError(f"file {file_id} is not in {self!r}") from None
        try:
            record = FileObject.model_validate_json(raw)
        except ValidationError as exc:
            problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'record'}: {e['msg']}" for e in exc.errors())
            raise StorageError(f"the record of {file_id} ({key}) is invalid, so it was not used: {problems}") from None
        if record.id != file_id:
            raise StorageError(f"the record at {key} says it is {record.id}, not {file_id}, so it was not used")
        return record

    def exists(self, file_id: str) -> bool:
        return self.backend.exists(record_key(file_id))

    def get_bytes(self, file_id: str) -> bytes:
        record = self.info(file_id)
        if record.kind == "directory":
            raise StorageError(f"{file_id} is a directory; use download(id, dest_dir)")
        data = self.backend.get_bytes(f"blobs/{record.sha256}")
        _check_hash(file_id, record.sha256, sha256_bytes(data))
        return data

    def download(self, file_id: str, dest: str | os.PathLike[str]) -> Path:
        """A file goes to `dest` (or `dest/<filename>` when `dest` is a directory); a directory into `dest`.

        Every byte is checked against its hash before it lands: the content is fetched into a temporary file (a
        directory into a temporary folder) beside the destination and moved into place only when it matches.
        """
        record = self.info(file_id)
        dest = Path(dest)
        if record.kind == "file":
            target = dest / (record.filename or record.id.split(":")[1]) if dest.is_dir() else dest
            target.parent.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryDirectory(dir=target.parent, prefix=".ow-partial-") as staging:
                self._fetch_blob(file_id, record.sha256, Path(staging) / "blob")
                os.replace(Path(staging) / "blob", target)
            return target
        entries = record.entries or []
        root = dest.resolve()
        for entry in entries:  # a link already in `dest` could still lead out: checked before anything is written
            if not (root / entry.path).resolve().is_relative_to(root):
                raise StorageError(f"{file_id}: entry {entry.path!r} points outside the directory; nothing written")
        dest.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=dest.parent, prefix=f".{dest.name}.partial-") as staging:
            for entry in entries:
                (Path(staging) / entry.path).parent.mkdir(parents=True, exist_ok=True)
                self._fetch_blob(f"{file_id} entry {entry.path!r}", entry.sha256, Path(staging) / entry.path)
            dest.mkdir(exist_ok=True)
            for entry in entries:
                (dest / entry.path).parent.mkdir(parents=True, exist_ok=True)
                os.replace(Path(staging) / entry.path, dest / entry.path)
        return dest

    def _fetch_blob(self, what: str, sha256: str, path: Path) -> None:
        self.backend.get_file(f"blobs/{sha256}", path)
        _check_hash(what, sha256, sha256_file(path))

    def put_json(self, key: str, value: Any) -> None:
        """Mutable JSON documents beside the content store (job outputs)."""
        self.backend.put_bytes(key, json.dumps(value, indent=1, sort_keys=True).encode())

    def get_json(self, key: str) -> Any:
        return json.loads(self.backend.get_bytes(key))


def _check_hash(what: str, expected: str, actual: str) -> None:
    if actual != expected:
        raise StorageError(
            f"{what}: the stored content is corrupted or was replaced (it hashes to {actual}, its record says "
            f"{expected}); nothing was written. Upload the file again."
        )
