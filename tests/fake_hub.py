"""A FAKE Hugging Face Hub (the Hub has no local stand-in; nothing here can reach huggingface.co): the push at
the end of fine-tuning, and model downloads — gated ones included — the way huggingface_hub, transformers and
vLLM fetch them. Point `HF_ENDPOINT` at `url`.

Pushes: it serves the calls `HfApi.whoami`, `create_repo` and `upload_folder` make — whoami, repo create, the
model card's YAML check, preupload (every file "regular": its bytes travel base64 inside the commit) and the
ndjson commit — and keeps what was committed in `repos` (repo id -> {path: bytes}).

Downloads: `serve(repo_id, directory, gated=True)` publishes a local model directory (the tiny model) as a
repo. It answers `repo_info` (`/api/models/{repo}[/revision/{rev}]`), `list_repo_tree`
(`/api/models/{repo}/tree/{rev}`) and `HEAD`/`GET /{repo}/resolve/{rev}/{path}` with the commit, ETag and
size headers `hf_hub_download` reads (no LFS redirects, no Xet). A gated repo answers without the right token
exactly as the Hub does: 401 with `X-Error-Code: GatedRepo`, which huggingface_hub raises as `GatedRepoError`.

Repos in `repos` (pushed, or put there by a test) are served too, public (no token needed).

Every token it was shown (on every call, "" for none) is kept in `tokens`; `downloads` lists (repo, path) of
every file served. Not a model of the Hub: no revisions but one commit per repo, no pull requests.
"""

from __future__ import annotations

import base64
import hashlib
import json
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

from ow_prefect.testing.servers import AppServer


@dataclass
class ServedRepo:
    files: dict[str, bytes]
    gated: bool
    commit: str


@dataclass
class FakeHub:
    token: str
    user: str = "ow-tester"
    url: str = ""
    repos: dict[str, dict[str, bytes]] = field(default_factory=dict)
    private: dict[str, bool] = field(default_factory=dict)
    tokens: list[str] = field(default_factory=list)
    served: dict[str, ServedRepo] = field(default_factory=dict)
    downloads: list[tuple[str, str]] = field(default_factory=list)

    def serve(self, repo_id: str, directory: Path, gated: bool = True) -> str:
        """Publish every file under `directory` as the model repo `repo_id`; returns the repo id."""
        files = {
            p.relative_to(directory).as_posix(): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()
        }
        commit = hashlib.sha1(json.dumps(sorted((k, hashlib.sha1(v).hexdigest()) for k, v in files.items())).encode())
        self.served[repo_id] = ServedRepo(files, gated, commit.hexdigest())
        return repo_id

    def __enter__(self) -> FakeHub:
        self._served = AppServer(self.app()).__enter__()
        self.url = f"http://127.0.0.1:{self._served.port}"
        return self

    def __exit__(self, *exc: object) -> None:
        self._served.__exit__(*exc)

    def _refused(self, request: Request) -> JSONResponse | None:
        token = request.headers.get("authorization", "").removeprefix("Bearer ")
        self.tokens.append(token)
        if token != self.token:
            return JSONResponse({"error": "Invalid credentials in Authorization header"}, status_code=401)
        return None

    def _pushed(self, repo_id: str) -> ServedRepo | None:
        """A repo pushed (or put in `repos` by a test) is public: downloadable without a token."""
        if repo_id not in self.repos:
            return None
        files = self.repos[repo_id]
        commit = hashlib.sha1(json.dumps(sorted((k, hashlib.sha1(v).hexdigest()) for k, v in files.items())).encode())
        return ServedRepo(files, gated=False, commit=commit.hexdigest())

    def _repo(self, request: Request, repo_id: str) -> tuple[ServedRepo | None, Response | None]:
        """The repo, or the answer the Hub gives instead (unknown repo; gated repo without the right token)."""
        repo = self.served.get(repo_id) or self._pushed(repo_id)
        token = request.headers.get("authorization", "").removeprefix("Bearer ")
        self.tokens.append(token)
        if repo is None:
            return None, _hub_error(404, "RepoNotFound", f"Repository Not Found for url: {request.url}.")
        if repo.gated and token != self.token:
            message = f"Access to model {repo_id} is restricted. You must have access to it and be authenticated."
            return None, _hub_error(401, "GatedRepo", message)
        return repo, None

    def app(self) -> FastAPI:
        app = FastAPI()

        @app.get("/api/whoami-v2")
        async def whoami(request: Request):
            return self._refused(request) or {"type": "user", "name": self.user, "orgs": [], "auth": {}}

        @app.post("/api/repos/create")
        async def create(request: Request):
            if refused := self._refused(request):
                return refused
            body = await request.json()
            repo_id = f"{body.get('organization') or self.user}/{body['name']}"
            if repo_id in self.repos:
                return JSONResponse({"error": "You already created this model repo", "url": ""}, status_code=409)
            self.repos[repo_id] = {}
            self.private[repo_id] = body.get("visibility") == "private" or bool(body.get("private"))
            return {"url": f"{self.url}/{repo_id}", "name": repo_id, "id": uuid.uuid4().hex}

        @app.post("/api/validate-yaml")
        async def validate_yaml(request: Request):  # the model card's metadata, checked before a commit
            return self._refused(request) or {"errors": [], "warnings": []}

        @app.post("/api/models/{owner}/{name}/preupload/{revision}")
        async def preupload(owner: str, name: str, revision: str, request: Request):
            if refused := self._refused(request):
                return refused
            files = (await request.json())["files"]
            return {"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False} for f in files]}

        @app.post("/api/models/{owner}/{name}/commit/{revision}")
        async def commit(owner: str, name: str, revision: str, request: Request):
            if refused := self._refused(request):
                return refused
            repo_id = f"{owner}/{name}"
            for line in (await request.body()).decode().splitlines():
                item = json.loads(line)
                if item["key"] == "file":
                    value = item["value"]
                    self.repos.setdefault(repo_id, {})[value["path"]] = base64.b64decode(value["content"])
            oid = uuid.uuid4().hex + "0" * 8
            return {"commitUrl": f"{self.url}/{repo_id}/commit/{oid}", "commitOid": oid, "pullRequestUrl": None}

        @app.get("/api/models/{owner}/{name}")
        @app.get("/api/models/{owner}/{name}/revision/{revision}")
        async def repo_info(owner: str, name: str, request: Request, revision: str = "main"):
            repo_id = f"{owner}/{name}"
            repo, refused = self._repo(request, repo_id)
            if refused:
                return refused
            siblings = [{"rfilename": path} for path in repo.files]
            gated = "manual" if repo.gated else False
            return {
                "id": repo_id,
                "modelId": repo_id,
                "sha": repo.commit,
                "private": False,
                "gated": gated,
                "disabled": False,
                "tags": [],
                "siblings": siblings,
            }

        @app.get("/api/models/{owner}/{name}/tree/{revision}")
        @app.get("/api/models/{owner}/{name}/tree/{revision}/{path:path}")
        async def tree(owner: str, name: str, revision: str, request: Request, path: str = ""):
            repo, refused = self._repo(request, f"{owner}/{name}")
            if refused:
                return refused
            prefix = f"{path.strip('/')}/" if path.strip("/") else ""
            return [
                {"type": "file", "oid": _git_oid(data), "size": len(data), "path": file}
                for file, data in repo.files.items()
                if file.startswith(prefix)
            ]

        @app.api_route("/{owner}/{name}/resolve/{revision}/{path:path}", methods=["GET", "HEAD"])
        async def resolve(owner: str, name: str, revision: str, path: str, request: Request):
            repo_id = f"{owner}/{name}"
            repo, refused = self._repo(request, repo_id)
            if refused:
                return refused
            if revision not in ("main", repo.commit):
                return _hub_error(404, "RevisionNotFound", f"Invalid rev id: {revision}")
            if path not in repo.files:
                return _hub_error(404, "EntryNotFound", f"{path} does not exist on {revision}")
            data = repo.files[path]
            headers = {"X-Repo-Commit": repo.commit, "ETag": f'"{_git_oid(data)}"', "Content-Length": str(len(data))}
            if request.method == "HEAD":
                return Response(headers=headers)
            self.downloads.append((repo_id, path))
            return Response(data, headers=headers, media_type="application/octet-stream")

        return app


def _git_oid(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def _hub_error(status: int, code: str, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status, headers={"X-Error-Code": code, "X-Error-Message": message})
