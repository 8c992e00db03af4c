"""A minimal stand-in for the Hugging Face Hub, for tests: in-memory model repos served over HTTP on 127.0.0.1.

It answers exactly the calls `huggingface_hub` makes to push a folder (`create_repo`, the README metadata check,
`preupload`, the ndjson `commit`) and to download a file (`HEAD` and `GET` on `/<repo>/resolve/<revision>/<path>`,
with the `X-Repo-Commit`, `ETag` and `Content-Length` headers that `hf_hub_download` reads), and the agent-harness
registry that the client fetches for its user agent (served empty). Every file is committed as a "regular" file
(base64 inside the commit): no LFS, no Xet. Point a client at it with `HF_ENDPOINT` (read by `huggingface_hub` at
import, so set it before importing, e.g. in a subprocess).

>>> with HubServer() as hub:
...     subprocess.run([...], env={**os.environ, "HF_ENDPOINT": hub.endpoint, "HF_TOKEN": "hf_test"})
...     hub.files("user/repo")
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlsplit

REPO_ID = r"(?P<repo>[^/]+/[^/]+)"
PREUPLOAD = re.compile(rf"/api/models/{REPO_ID}/preupload/(?P<revision>[^/]+)")
COMMIT = re.compile(rf"/api/models/{REPO_ID}/commit/(?P<revision>[^/]+)")
RESOLVE = re.compile(rf"/{REPO_ID}/resolve/(?P<revision>[^/]+)/(?P<path>.+)")


class _Repo:
    def __init__(self) -> None:
        self.files: dict[str, bytes] = {}
        self.commit = hashlib.sha1(b"initial commit").hexdigest()  # (40 hex digits, as git)


class HubServer:
    """A threaded HTTP server holding model repos in memory; a context manager that starts and stops it."""

    def __init__(self) -> None:
        self.repos: dict[str, _Repo] = {}
        self.requests: list[str] = []  # "METHOD /path", in order
        self.unhandled: list[str] = []  # requests the server has no answer for
        self.lock = threading.Lock()
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        self._httpd.daemon_threads = True
        self._httpd.hub = self
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)

    @property
    def endpoint(self) -> str:
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}"

    def files(self, repo_id: str) -> dict[str, bytes]:
        """The files of `repo_id` at its last commit."""
        with self.lock:
            return dict(self.repos[repo_id].files)

    def __enter__(self) -> HubServer:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join()


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as httpx expects; every answer carries a Content-Length

    @property
    def hub(self) -> HubServer:
        return self.server.hub

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002  (the base class's name)
        pass  # quiet: the requests are kept in `HubServer.requests`

    # --- routing ---------------------------------------------------------------------------------------------------

    def do_POST(self) -> None:  # noqa: N802  (http.server's naming)
        path = self._record()
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))

        if path == "/api/repos/create":
            self._create_repo(json.loads(body))
        elif path == "/api/validate-yaml":
            self._send_json({"errors": [], "warnings": []})
        elif match := PREUPLOAD.fullmatch(path):
            self._preupload(match["repo"], json.loads(body))
        elif match := COMMIT.fullmatch(path):
            self._commit(match["repo"], body)
        else:
            self._unhandled()

    def do_HEAD(self) -> None:  # noqa: N802
        self._resolve(send_body=False)

    def do_GET(self) -> None:  # noqa: N802
        if urlsplit(self.path).path == "/api/agent-harnesses":  # the client's best-effort user-agent registry
            self._record()
            self._send_json({"standardEnvVars": [], "harnesses": {}})
        else:
            self._resolve(send_body=True)

    # --- endpoints -------------------------------------------------------------------------------------------------

    def _create_repo(self, payload: dict) -> None:
        repo_id = f"{payload['organization']}/{payload['name']}" if payload.get("organization") else payload["name"]
        with self.hub.lock:
            if repo_id in self.hub.repos:
                self._send_error(HTTPStatus.CONFLICT, "RepoExists", "You already created this model repo")
                return
            self.hub.repos[repo_id] = _Repo()
        self._send_json({"url": f"{self._base_url()}/{repo_id}", "name": repo_id})

    def _preupload(self, repo_id: str, payload: dict) -> None:
        if repo_id not in self.hub.repos:
            self._send_error(HTTPStatus.NOT_FOUND, "RepoNotFound", f"Repository {repo_id} not found")
            return
        files = [
            {"path": item["path"], "uploadMode": "regular", "shouldIgnore": False, "oid": None}
            for item in payload["files"]
        ]
        self._send_json({"files": files, "commitOid": self.hub.repos[repo_id].commit})

    def _commit(self, repo_id: str, body: bytes) -> None:
        with self.hub.lock:
            repo = self.hub.repos.get(repo_id)
            if repo is None:
                self._send_error(HTTPStatus.NOT_FOUND, "RepoNotFound", f"Repository {repo_id} not found")
                return
            files = dict(repo.files)
            for line in body.splitlines():
                item = json.loads(line)
                key, value = item["key"], item["value"]
                if key == "file":
                    if value.get("encoding") != "base64":
                        self._send_error(HTTPStatus.BAD_REQUEST, "BadRequest", "only base64 files are supported")
                        return
                    files[value["path"]] = base64.b64decode(value["content"])
                elif key == "deletedFile":
                    files.pop(value["path"], None)
                elif key != "header":
                    self._send_error(HTTPStatus.BAD_REQUEST, "BadRequest", f"unsupported commit entry {key!r}")
                    return
            repo.files = files
            repo.commit = hashlib.sha1(repo.commit.encode() + body).hexdigest()
            commit = repo.commit
        self._send_json({"commitUrl": f"{self._base_url()}/{repo_id}/commit/{commit}", "commitOid": commit})

    def _resolve(self, send_body: bool) -> None:
        path = self._record()
        match = RESOLVE.fullmatch(path)
        if match is None:
            self._unhandled(send_body=send_body)
            return
        with self.hub.lock:
            repo = self.hub.repos.get(match["repo"])
            content = repo.files.get(unquote(match["path"])) if repo is not None else None
            commit = repo.commit if repo is not None else None
        if repo is None:
            self._send_error(HTTPStatus.NOT_FOUND, "RepoNotFound", "Repository not found", send_body=send_body)
            return
        if content is None:
            self._send_error(HTTPStatus.NOT_FOUND, "EntryNotFound", "Entry not found", send_body=send_body)
            return

        self.send_response(HTTPStatus.OK)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(len(content)))
        self.send_header("ETag", f'"{hashlib.sha256(content).hexdigest()}"')
        self.send_header("X-Repo-Commit", commit)
        self.end_headers()
        if send_body:
            self.wfile.write(content)

    # --- helpers ---------------------------------------------------------------------------------------------------

    def _record(self) -> str:
        path = urlsplit(self.path).path
        self.hub.requests.append(f"{self.command} {path}")
        return path

    def _base_url(self) -> str:
        return f"http://{self.headers.get('Host', '127.0.0.1')}"

    def _unhandled(self, send_body: bool = True) -> None:
        self.hub.unhandled.append(f"{self.command} {self.path}")
        self._send_error(HTTPStatus.NOT_FOUND, "NotImplemented", "not served by the test hub", send_body=send_body)

    def _send_json(self, payload: dict, status: HTTPStatus = HTTPStatus.OK) -> None:
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _send_error(self, status: HTTPStatus, code: str, message: str, send_body: bool = True) -> None:
        data = json.dumps({"error": message}).encode() if send_body else b""
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.send_header("X-Error-Code", code)
        self.send_header("X-Error-Message", message)
        self.end_headers()
        self.wfile.write(data)
