"""A FAKE Hugging Face Hub for the push at the end of fine-tuning and for downloading a LoRA adapter (the Hub
has no local stand-in; nothing here can reach huggingface.co). Point `HF_ENDPOINT` at `url`.

It serves the calls `HfApi.whoami`, `create_repo` and `upload_folder` make — whoami, repo create, the model
card's YAML check, preupload (every file "regular": its bytes travel base64 inside the commit) and the ndjson
commit — checks the bearer token, and keeps what was committed in `repos` (repo id -> {path: bytes}) and every
token it was shown in `tokens`. `hf_hub_download` reads files of `repos` (HEAD and GET on `resolve/`, public:
no token needed; a missing file or repo answers with the Hub's error codes). Not a model of the Hub: no LFS/Xet,
no revisions, no pull requests.
"""

from __future__ import annotations

import base64
import hashlib
import json
import uuid
from dataclasses import dataclass, field

from fastapi import FastAPI, Request, Response
from fastapi.responses import JSONResponse

from ow_prefect.testing.servers import AppServer


@dataclass
class FakeHub:
    token: str
    user: str = "ow-tester"
    url: str = ""
    repos: dict[str, dict[str, bytes]] = field(default_factory=dict)
    private: dict[str, bool] = field(default_factory=dict)
    tokens: list[str] = field(default_factory=list)

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

        @app.api_route("/{owner}/{name}/resolve/{revision}/{path:path}", methods=["GET", "HEAD"])
        async def resolve(owner: str, name: str, revision: str, path: str, request: Request):
            repo_id = f"{owner}/{name}"
            if repo_id not in self.repos:
                return Response(status_code=404, headers={"X-Error-Code": "RepoNotFound"})
            if path not in self.repos[repo_id]:
                return Response(status_code=404, headers={"X-Error-Code": "EntryNotFound"})
            data = self.repos[repo_id][path]
            headers = {
                "X-Repo-Commit": hashlib.sha1(repo_id.encode()).hexdigest(),
                "ETag": f'"{hashlib.sha256(data).hexdigest()}"',
                "Content-Length": str(len(data)),
            }
            return Response(content=b"" if request.method == "HEAD" else data, headers=headers)

        return app
