"""A small, real HTTP server that speaks enough of the Hugging Face Hub API for tests.

``LocalHub`` runs a stdlib ``ThreadingHTTPServer`` on 127.0.0.1 and implements the endpoints that
huggingface_hub 2.4 calls for ``create_repo``, ``upload_file``/``upload_folder`` (preupload, git-LFS
batch + basic PUT transfer + verify, NDJSON commit), ``model_info``/``repo_info``, ``list_repo_tree``,
``hf_hub_download``/``snapshot_download`` (HEAD/GET ``/resolve``) and ``whoami``. State lives in memory.

    with LocalHub() as hub:
        hub.patch_env(monkeypatch)          # HfApi(), hf_hub_download, diffusers' from_pretrained -> hub
        HfApi().create_repo("user/tiny", token="x")

Xet is never offered: the decision to use Xet is *client-side* (``is_xet_available()``: hf_xet installed
and ``HF_HUB_DISABLE_XET`` unset), so ``patch_env`` sets ``HF_HUB_DISABLE_XET``; a client that still
asks for a Xet token gets a 501 explaining that. Run by hand with ``python tests/support/hub_server.py --port 8999``
and point a fresh process at it with ``HF_ENDPOINT=http://127.0.0.1:8999 HF_HUB_DISABLE_XET=1``.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import os
import re
import shutil
import sys
import tempfile
import threading
import time
import traceback
from dataclasses import dataclass, field
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

# Files that go through git-LFS (the Hub's default .gitattributes does the same by extension, and the Hub
# also sends binary or big files to LFS). Everything else is sent base64-encoded inside the commit payload.
LFS_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".onnx", ".msgpack", ".npz", ".gguf")
LFS_MIN_SIZE = 10 * 1024 * 1024
URL_PREFIXES = {"datasets": "dataset", "spaces": "space", "kernels": "kernel"}  # web URL prefix -> repo type
API_TYPES = {"models": "model", "datasets": "dataset", "spaces": "space", "kernels": "kernel"}  # /api/<t>/...
BAD_TOKEN = "Invalid credentials in Authorization header"  # keeps huggingface_hub from calling a 401 "RepoNotFound"


class HubError(Exception):
    """An HTTP error answered the way the Hub does: JSON body plus X-Error-Code / X-Error-Message headers."""

    def __init__(self, status: int, message: str, code: str | None = None, headers: dict | None = None, **body):
        super().__init__(message)
        self.status, self.message, self.code, self.headers, self.body = status, message, code, headers or {}, body


def git_blob_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def _now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


@dataclass(frozen=True)
class Entry:
    """One file of a commit. Content lives in ``Hub.blobs`` keyed by sha256."""

    sha256: str
    size: int
    lfs: bool
    oid: str  # git blob oid: of the content, or of the LFS pointer file for LFS files
    pointer_size: int = 0

    @classmethod
    def make(cls, data: bytes, lfs: bool) -> "Entry":
        sha256 = hashlib.sha256(data).hexdigest()
        if not lfs:
            return cls(sha256, len(data), False, git_blob_sha1(data))
        pointer = f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {len(data)}\n".encode()
        return cls(sha256, len(data), True, git_blob_sha1(pointer), len(pointer))

    def lfs_json(self) -> dict | None:
        return {"oid": self.sha256, "size": self.size, "pointerSize": self.pointer_size} if self.lfs else None


@dataclass
class Commit:
    sha: str
    parent: str | None
    title: str
    date: str
    files: dict[str, Entry]


@dataclass
class Repo:
    type: str
    id: str
    private: bool
    created: str
    commits: dict[str, Commit] = field(default_factory=dict)
    branches: dict[str, str] = field(default_factory=dict)

    @property
    def url_path(self) -> str:  # "user/x" for models, "datasets/user/x" for datasets...
        prefix = {v: k for k, v in URL_PREFIXES.items()}.get(self.type)
        return f"{prefix}/{self.id}" if prefix else self.id

    def add_commit(self, parent: str | None, title: str, files: dict[str, Entry], branch: str) -> Commit:
        seed = json.dumps([parent, title, time.time_ns(), sorted((p, e.oid) for p, e in files.items())])
        commit = Commit(hashlib.sha1(seed.encode()).hexdigest(), parent, title, _now(), files)
        self.commits[commit.sha] = commit
        self.branches[branch] = commit.sha
        return commit

    def resolve(self, revision: str) -> Commit:
        sha = self.branches.get(revision) or (revision if revision in self.commits else None)
        if sha is None:
            raise HubError(404, f"Invalid rev id: {revision}", "RevisionNotFound")
        return self.commits[sha]


class _State:
    """Everything the server knows: repos, content-addressed blobs, LFS uploads announced but not yet PUT."""

    def __init__(self, username: str, lfs: bool):
        self.username, self.lfs = username, lfs
        self.repos: dict[tuple[str, str], Repo] = {}
        self.blobs: dict[str, bytes] = {}
        self.pending_lfs: dict[str, int] = {}  # sha256 -> announced size
        self.lock = threading.RLock()

    def wants_lfs(self, path: str, size: int, sample: bytes) -> bool:
        return self.lfs and size > 0 and (path.endswith(LFS_SUFFIXES) or size >= LFS_MIN_SIZE or b"\0" in sample)


# --- routing -------------------------------------------------------------------------------------------------
_REPO = r"(?P<ns>[^/]+)/(?P<name>[^/]+?)"
_WEB_REPO = r"/(?:(?P<prefix>datasets|spaces|kernels)/)?" + _REPO
_API_REPO = r"/api/(?P<t>models|datasets|spaces|kernels)/" + _REPO
ROUTES: list[tuple[str, re.Pattern, str]] = [
    (m, re.compile(rx + "$"), fn)
    for m, rx, fn in [
        ("GET", r"/api/whoami-v2", "whoami"),
        ("POST", r"/api/repos/create", "create_repo"),
        ("DELETE", r"/api/repos/delete", "delete_repo"),
        ("POST", r"/api/validate-yaml", "validate_yaml"),
        ("*", r"/api/telemetry/.*", "telemetry"),
        ("GET", _API_REPO + r"/tree/(?P<rev>[^/]+)(?:/(?P<path>.+))?", "tree"),
        ("POST", _API_REPO + r"/preupload/(?P<rev>[^/]+)", "preupload"),
        ("POST", _API_REPO + r"/commit/(?P<rev>[^/]+)", "commit"),
        ("GET", _API_REPO + r"/xet-(?:read|write)-token/(?P<rev>[^/]+)", "xet_token"),
        ("GET", _API_REPO + r"(?:/revision/(?P<rev>[^/]+))?", "repo_info"),
        ("POST", _WEB_REPO + r"\.git/info/lfs/objects/batch", "lfs_batch"),
        ("POST", _WEB_REPO + r"\.git/info/lfs/objects/verify", "lfs_verify"),
        ("PUT", r"/lfs-upload/(?P<oid>[0-9a-f]{64})", "lfs_put"),
        ("GET", _WEB_REPO + r"/resolve/(?P<rev>[^/]+)/(?P<path>.+)", "resolve"),
        ("HEAD", _WEB_REPO + r"/resolve/(?P<rev>[^/]+)/(?P<path>.+)", "resolve"),
    ]
]


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, like the Hub; every response carries a Content-Length
    timeout = 60  # idle keep-alive connections eventually free their thread
    server: "_Server"

    def log_message(self, *args) -> None:  # silence the default stderr access log
        pass

    def do_GET(self):
        self._dispatch("GET")

    def do_HEAD(self):
        self._dispatch("HEAD")

    def do_POST(self):
        self._dispatch("POST")

    def do_PUT(self):
        self._dispatch("PUT")

    def do_DELETE(self):
        self._dispatch("DELETE")

    # -- plumbing ---------------------------------------------------------------------------------------------
    def _dispatch(self, method: str) -> None:
        url = urlsplit(self.path)
        hub = self.server.hub
        hub.requests.append((method, url.path))
        self.body = self._read_body()
        self.query = {k: v[-1] for k, v in parse_qs(url.query).items()}
        self.state = hub.state
        try:
            for route_method, pattern, fn in ROUTES:
                match = pattern.match(url.path)
                if match and route_method in (method, "*"):
                    args = {k: unquote(v) for k, v in match.groupdict().items() if v is not None}
                    return getattr(self, "h_" + fn)(**args)
            hub.unhandled.append((method, url.path))
            raise HubError(404, f"LocalHub does not implement {method} {url.path}")
        except HubError as e:
            headers = {"X-Error-Message": e.message, **e.headers}
            if e.code:
                headers["X-Error-Code"] = e.code
            self._send(e.status, {"error": e.message, **e.body}, headers)
        except Exception as e:  # a LocalHub bug or a request it does not understand: answer, don't drop the socket
            traceback.print_exc()
            hub.unhandled.append((method, url.path))
            self._send(500, {"error": repr(e)}, {"X-Error-Message": f"LocalHub crashed: {e!r}"})

    def _read_body(self) -> bytes:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():  # streamed uploads may be chunked
            parts = []
            while size := int(self.rfile.readline().split(b";")[0].strip() or b"0", 16):
                parts.append(self.rfile.read(size))
                self.rfile.readline()
            while self.rfile.readline() not in (b"\r\n", b"\n", b""):  # trailers
                pass
            return b"".join(parts)
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _send(self, status: int, body=None, headers: dict | None = None, content_length: int | None = None):
        if isinstance(body, (dict, list)):
            body, headers = json.dumps(body).encode(), {"Content-Type": "application/json", **(headers or {})}
        body = body or b""
        self.send_response(status)
        for key, value in (headers or {}).items():
            self.send_header(key, str(value).replace("\n", " "))
        self.send_header("Content-Length", str(len(body) if content_length is None else content_length))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _json(self) -> dict:
        try:
            return json.loads(self.body or b"{}")
        except json.JSONDecodeError as e:
            raise HubError(400, f"Invalid JSON body: {e}")

    def _token(self) -> str | None:
        auth = self.headers.get("Authorization", "")
        return (auth[7:].strip() or None) if auth.startswith("Bearer ") else None

    def _require_token(self) -> None:
        if self._token() is None:
            raise HubError(401, BAD_TOKEN)

    def _repo(self, ns: str, name: str, t: str | None = None, prefix: str | None = None) -> Repo:
        repo_type = API_TYPES[t] if t else URL_PREFIXES.get(prefix or "", "model")
        repo = self.state.repos.get((repo_type, f"{ns}/{name}"))
        if repo is None or (repo.private and self._token() is None):
            raise HubError(404, "Repository not found", "RepoNotFound")
        return repo

    @property
    def endpoint(self) -> str:
        return self.server.hub.endpoint

    # -- account / repo management ----------------------------------------------------------------------------
    def h_whoami(self):
        self._require_token()
        name = self.state.username
        self._send(200, {"type": "user", "id": name, "name": name, "fullname": name, "orgs": [],
                         "auth": {"type": "access_token", "accessToken": {"displayName": "local", "role": "write"}}})

    def h_create_repo(self):
        self._require_token()
        payload = self._json()
        repo_type = payload.get("type") or "model"
        repo_id = f"{payload.get('organization') or self.state.username}/{payload['name']}"
        with self.state.lock:
            key = (repo_type, repo_id)
            if key in self.state.repos:
                # create_repo(exist_ok=True) swallows the 409 and then reads "url" from this very body
                url = f"{self.endpoint}/{self.state.repos[key].url_path}"
                raise HubError(409, f"You already created this {repo_type} repo", url=url)
            repo = Repo(repo_type, repo_id, payload.get("visibility", "public") != "public", _now())
            repo.add_commit(None, "initial commit", {}, "main")
            self.state.repos[key] = repo
        self._send(200, {"url": f"{self.endpoint}/{repo.url_path}", "name": repo_id, "id": repo_id})

    def h_delete_repo(self):
        self._require_token()
        payload = self._json()
        repo_id = f"{payload.get('organization') or self.state.username}/{payload['name']}"
        with self.state.lock:
            if self.state.repos.pop((payload.get("type") or "model", repo_id), None) is None:
                raise HubError(404, "Repository not found", "RepoNotFound")
        self._send(200, {})

    def h_validate_yaml(self):  # called by create_commit whenever a README.md is uploaded
        self._send(200, {"errors": [], "warnings": []})

    def h_telemetry(self):
        self._send(200, {})

    def h_xet_token(self, **_):
        raise HubError(501, "LocalHub does not support Xet storage: set HF_HUB_DISABLE_XET=1 (see LocalHub.patch_env)")

    # -- reading ----------------------------------------------------------------------------------------------
    def h_repo_info(self, t, ns, name, rev="main"):
        repo = self._repo(ns, name, t=t)
        commit = repo.resolve(rev)
        blobs = self.query.get("blobs", "").lower() in ("1", "true")
        siblings = []
        for path, entry in sorted(commit.files.items()):
            sibling = {"rfilename": path}
            if blobs:
                sibling.update(size=entry.size, blobId=entry.oid)
                if entry.lfs:
                    sibling["lfs"] = {"sha256": entry.sha256, "size": entry.size, "pointerSize": entry.pointer_size}
            siblings.append(sibling)
        self._send(200, {"_id": hashlib.sha1(repo.id.encode()).hexdigest()[:24], "id": repo.id, "modelId": repo.id,
                         "author": repo.id.split("/")[0], "sha": commit.sha, "lastModified": commit.date,
                         "createdAt": repo.created, "private": repo.private, "gated": False, "disabled": False,
                         "downloads": 0, "likes": 0, "tags": [], "siblings": siblings})

    def h_tree(self, t, ns, name, rev, path=""):
        commit = self._repo(ns, name, t=t).resolve(rev)
        prefix = path.strip("/") + "/" if path.strip("/") else ""
        recursive = self.query.get("recursive", "").lower() in ("1", "true")
        under = {p[len(prefix):]: e for p, e in commit.files.items() if p.startswith(prefix)}
        if prefix and not under:
            raise HubError(404, f"{path} does not exist on {rev}", "EntryNotFound")
        items: dict[str, dict] = {}
        for rel, entry in sorted(under.items()):
            parts = rel.split("/")
            for depth in range(1, len(parts) if recursive else min(len(parts), 2)):  # folders on the way
                folder = prefix + "/".join(parts[:depth])
                items.setdefault(folder, {"type": "directory", "size": 0, "path": folder,
                                          "oid": hashlib.sha1(folder.encode() + commit.sha.encode()).hexdigest()})
            if recursive or len(parts) == 1:
                items[prefix + rel] = {"type": "file", "path": prefix + rel, "size": entry.size, "oid": entry.oid,
                                       **({"lfs": entry.lfs_json()} if entry.lfs else {})}
        self._send(200, list(items.values()))

    def h_resolve(self, ns, name, rev, path, prefix=None):
        repo = self._repo(ns, name, prefix=prefix)
        commit = repo.resolve(rev)
        entry = commit.files.get(path)
        if entry is None:  # X-Repo-Commit lets the client cache the non-existence (".no_exist")
            raise HubError(404, "Entry not found", "EntryNotFound", {"X-Repo-Commit": commit.sha})
        data = self.state.blobs[entry.sha256]
        headers = {"X-Repo-Commit": commit.sha, "ETag": f'"{entry.sha256 if entry.lfs else entry.oid}"',
                   "Accept-Ranges": "bytes", "Content-Type": "application/octet-stream",
                   "Content-Disposition": f'inline; filename="{path.rsplit("/", 1)[-1]}"'}
        if entry.lfs:  # the Hub sends these on the (redirect) response of LFS files; we serve the bytes directly
            headers.update({"X-Linked-Etag": f'"{entry.sha256}"', "X-Linked-Size": entry.size})
        status, start, end = 200, 0, len(data)
        match = re.fullmatch(r"bytes=(\d*)-(\d*)", self.headers.get("Range", ""))
        if match and (match[1] or match[2]):  # resumed downloads
            start = int(match[1]) if match[1] else max(0, len(data) - int(match[2]))
            end = min(int(match[2]) + 1, len(data)) if match[1] and match[2] else len(data)
            if start >= len(data):
                raise HubError(416, "Range not satisfiable", headers={"Content-Range": f"bytes */{len(data)}"})
            status, headers["Content-Range"] = 206, f"bytes {start}-{end - 1}/{len(data)}"
        self._send(status, data[start:end], headers)

    # -- writing ----------------------------------------------------------------------------------------------
    def h_preupload(self, t, ns, name, rev):
        self._require_token()
        repo = self._repo(ns, name, t=t)
        files = repo.resolve(rev).files if rev in repo.branches or rev in repo.commits else {}
        answer = []
        for f in self._json().get("files", []):
            sample = base64.b64decode(f.get("sample", ""))
            mode = "lfs" if self.state.wants_lfs(f["path"], int(f["size"]), sample) else "regular"
            old = files.get(f["path"])
            # `oid` of the file already there lets the client skip unchanged files: sha256 for LFS, git sha1 else
            oid = None if old is None else (old.sha256 if mode == "lfs" else old.oid)
            answer.append({"path": f["path"], "uploadMode": mode, "shouldIgnore": False, "oid": oid})
        self._send(200, {"files": answer, "commitOid": repo.branches.get(rev)})

    def h_lfs_batch(self, ns, name, prefix=None):
        self._require_token()
        repo = self._repo(ns, name, prefix=prefix)
        payload = self._json()
        if payload.get("operation") != "upload":
            raise HubError(400, "LocalHub only implements the LFS 'upload' operation")
        objects = []
        with self.state.lock:
            for obj in payload.get("objects", []):
                oid, size = obj["oid"], int(obj["size"])
                item = {"oid": oid, "size": size, "authenticated": True}
                if oid not in self.state.blobs:  # no "actions" == already stored, client skips the upload
                    self.state.pending_lfs[oid] = size
                    item["actions"] = {
                        "upload": {"href": f"{self.endpoint}/lfs-upload/{oid}"},  # no "chunk_size": basic transfer
                        "verify": {"href": f"{self.endpoint}/{repo.url_path}.git/info/lfs/objects/verify"},
                    }
                objects.append(item)
        self._send(200, {"transfer": "basic", "objects": objects, "hash_algo": "sha256"},
                   {"Content-Type": "application/vnd.git-lfs+json"})

    def h_lfs_put(self, oid):  # plays the pre-signed storage URL: no auth header, only announced oids accepted
        with self.state.lock:
            if oid not in self.state.pending_lfs:
                raise HubError(403, f"No pending LFS upload for {oid}")
            if hashlib.sha256(self.body).hexdigest() != oid or len(self.body) != self.state.pending_lfs[oid]:
                raise HubError(400, f"Uploaded content does not match oid {oid}")
            self.state.blobs[oid] = self.body
            del self.state.pending_lfs[oid]
        self._send(200, b"")

    def h_lfs_verify(self, ns, name, prefix=None):
        self._require_token()
        self._repo(ns, name, prefix=prefix)
        payload = self._json()
        data = self.state.blobs.get(payload.get("oid", ""))
        if data is None or len(data) != payload.get("size"):
            raise HubError(404, f"LFS object {payload.get('oid')} not found")
        self._send(200, {"success": True})

    def h_commit(self, t, ns, name, rev):
        self._require_token()
        if self.query.get("create_pr"):
            raise HubError(400, "LocalHub does not implement pull requests (create_pr)")
        lines = [json.loads(line) for line in self.body.splitlines() if line.strip()]
        if not lines or lines[0].get("key") != "header":
            raise HubError(400, "Commit payload must be NDJSON starting with a 'header' line")
        header = lines[0]["value"]
        with self.state.lock:
            repo = self._repo(ns, name, t=t)
            if rev not in repo.branches:
                raise HubError(404, f"Invalid rev id: {rev} (LocalHub commits to branches only)", "RevisionNotFound")
            parent = repo.commits[repo.branches[rev]]
            if header.get("parentCommit") and not parent.sha.startswith(header["parentCommit"]):
                raise HubError(412, f"A commit has happened since. Parent commit is {parent.sha}")
            files = dict(parent.files)
            for op in lines[1:]:
                key, value = op.get("key"), op.get("value", {})
                path = value.get("path", "")
                if key == "file":
                    encoding = value.get("encoding", "utf-8")
                    data = base64.b64decode(value["content"]) if encoding == "base64" else value["content"].encode()
                    files[path] = Entry.make(data, lfs=False)
                    self.state.blobs[files[path].sha256] = data
                elif key == "lfsFile":
                    data = self.state.blobs.get(value["oid"])
                    if data is None:
                        raise HubError(400, f"LFS object {value['oid']} for {path} was never uploaded")
                    files[path] = Entry.make(data, lfs=True)
                elif key == "deletedFile":
                    if files.pop(path, None) is None:
                        raise HubError(404, f"A file with this name doesn't exist: {path}", "EntryNotFound")
                elif key == "deletedFolder":
                    files = {p: e for p, e in files.items() if not p.startswith(path.rstrip("/") + "/")}
                else:
                    raise HubError(400, f"Unknown commit operation {key!r}")
            commit = repo.add_commit(parent.sha, header.get("summary", ""), files, rev)
        self._send(200, {"success": True, "commitOid": commit.sha, "pullRequestUrl": None, "hookOutput": "",
                         "commitUrl": f"{self.endpoint}/{repo.url_path}/commit/{commit.sha}"})


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    hub: "LocalHub"


class LocalHub:
    """In-memory Hub on 127.0.0.1. ``requests`` logs every ``(method, path)``; ``unhandled`` unknown/crashed ones.

    Args:
        port: 0 picks a free port.
        username: namespace used when ``create_repo`` gets a bare name, and returned by ``whoami``.
        lfs: if False, every file is uploaded "regular" (base64 in the commit) instead of through git-LFS.
    """

    def __init__(self, port: int = 0, host: str = "127.0.0.1", username: str = "user", lfs: bool = True):
        self.state = _State(username, lfs)
        self.requests: list[tuple[str, str]] = []
        self.unhandled: list[tuple[str, str]] = []
        self._server = _Server((host, port), _Handler)
        self._server.hub = self
        self.host, self.port = self._server.server_address[:2]
        self.endpoint = f"http://{self.host}:{self.port}"
        self._thread: threading.Thread | None = None
        self._tmp_dirs: list[str] = []

    def start(self) -> "LocalHub":
        self._thread = threading.Thread(target=self._server.serve_forever, args=(0.05,), name="LocalHub", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._thread is not None:
            self._server.shutdown()
            self._thread.join()
            self._thread = None
        self._server.server_close()
        for path in self._tmp_dirs:
            shutil.rmtree(path, ignore_errors=True)

    __enter__ = start

    def __exit__(self, *exc) -> None:
        self.stop()

    def api(self, token: str | bool | None = None):
        """An ``HfApi`` bound to this hub (works without ``patch_env``)."""
        from huggingface_hub import HfApi

        return HfApi(endpoint=self.endpoint, token=token)

    def patch_env(self, monkeypatch, home: str | Path | None = None, token: str | None = None) -> Path:
        """Point an already-imported huggingface_hub (and diffusers) at this hub; returns the temporary HF_HOME.

        ``monkeypatch`` is pytest's fixture (or ``pytest.MonkeyPatch()``), which undoes everything afterwards.
        huggingface_hub copies env vars into ``huggingface_hub.constants`` at import time and builds a module-level
        ``HfApi`` (behind ``model_info``, ``create_repo``, ``upload_folder``...) with the endpoint of that moment,
        so setting ``HF_ENDPOINT`` is not enough: the constants and ``hf_api.api.endpoint`` are patched too.
        The env vars are still set, for subprocesses. ``token`` (optional) becomes the implicit ``HF_TOKEN``.
        """
        import huggingface_hub
        from huggingface_hub import constants, hf_api
        from huggingface_hub.utils import _http

        if home is None:
            home = tempfile.mkdtemp(prefix="localhub-home-")
            self._tmp_dirs.append(home)
        home = Path(home)
        hub_cache = home / "hub"
        env = {"HF_ENDPOINT": self.endpoint, "HF_HOME": str(home), "HF_HUB_CACHE": str(hub_cache),
               "HF_HUB_OFFLINE": "0", "HF_HUB_DISABLE_XET": "1", "HF_HUB_DISABLE_TELEMETRY": "1"}
        for var in ("NO_PROXY", "no_proxy"):  # never send 127.0.0.1 through a proxy
            env[var] = ",".join(filter(None, [os.environ.get(var), "127.0.0.1", "localhost"]))
        for var, value in env.items():
            monkeypatch.setenv(var, value)
        for var in ("TRANSFORMERS_OFFLINE", "HUGGINGFACE_CO_STAGING", "HUGGINGFACE_HUB_CACHE", "HF_ASSETS_CACHE",
                    "HF_TOKEN_PATH", "HF_XET_CACHE", "HF_TOKEN", "HUGGING_FACE_HUB_TOKEN",
                    "HF_HUB_DISABLE_IMPLICIT_TOKEN"):
            monkeypatch.delenv(var, raising=False)
        if token is not None:
            monkeypatch.setenv("HF_TOKEN", token)

        patches = {
            "ENDPOINT": self.endpoint,
            "HUGGINGFACE_CO_URL_TEMPLATE": self.endpoint + "/{repo_id}/resolve/{revision}/{filename}",  # hf_hub_url
            "HF_URL_HOSTS": constants.HF_URL_HOSTS | {self.host},
            "HF_HUB_OFFLINE": False,
            "HF_HUB_DISABLE_XET": True,  # read by is_xet_available() at call time
            "HF_HUB_DISABLE_TELEMETRY": True,
            "HF_HUB_DISABLE_IMPLICIT_TOKEN": False,
            "HF_HOME": str(home),
            "HF_HUB_CACHE": str(hub_cache),
            "HUGGINGFACE_HUB_CACHE": str(hub_cache),
            "HF_ASSETS_CACHE": str(home / "assets"),
            "HUGGINGFACE_ASSETS_CACHE": str(home / "assets"),
            "HF_TOKEN_PATH": str(home / "token"),  # no stored token of the real user leaks in
            "HF_STORED_TOKENS_PATH": str(home / "stored_tokens"),
            "HF_XET_CACHE": str(home / "xet"),
        }
        for name, value in patches.items():
            monkeypatch.setattr(constants, name, value)
        monkeypatch.setattr(hf_api.api, "endpoint", self.endpoint)  # module-level HfApi behind model_info & co
        origin = ("http", self.host, self.port)
        monkeypatch.setattr(_http, "_HUB_ORIGINS", _http._HUB_ORIGINS | {origin}, raising=False)
        # Libraries that copied HF_HUB_OFFLINE by value at import time (e.g. diffusers.loaders.lora_base).
        for mod_name, module in list(sys.modules.items()):
            if mod_name.startswith(("diffusers", "transformers")) and getattr(module, "HF_HUB_OFFLINE", None) is True:
                monkeypatch.setattr(module, "HF_HUB_OFFLINE", False)
        huggingface_hub.close_session()  # next request builds a fresh httpx client (re-reads proxy env)
        return home


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Run an in-memory Hugging Face Hub for local testing.")
    parser.add_argument("--port", type=int, default=8999)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--no-lfs", action="store_true", help="upload every file as a regular (base64) file")
    args = parser.parse_args(argv)
    hub = LocalHub(port=args.port, host=args.host, lfs=not args.no_lfs)
    print(f"LocalHub listening on {hub.endpoint}\n  export HF_ENDPOINT={hub.endpoint} HF_HUB_DISABLE_XET=1", flush=True)
    try:
        hub._server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        hub._server.server_close()


if __name__ == "__main__":
    main()
