"""A stand-in for the Hugging Face Hub that serves local directories as model repositories.

It answers the requests that ``huggingface_hub`` makes for BentoML's ``HuggingFaceModel``:
``bentoml build`` (``model_info``: the commit a revision points at, and file sizes) and
``bentoml serve`` (``snapshot_download``: the file tree at a commit, then a ``HEAD`` and a
``GET`` per file). Large binary files are served like the hub serves LFS files: ``/resolve``
answers with a redirect to a second origin (the "CDN") carrying ``X-Linked-Etag`` and
``X-Linked-Size``. Each repository sits at one fixed commit; any other revision gets the
hub's ``RevisionNotFound`` error. Every file body sent is recorded, so a test can assert
which files left the stand-in.

    with Hub({"org/model": Path("models/tiny/vae")}) as hub:
        HuggingFaceModel("org/model", endpoint=hub.url).resolve()
        hub.served  # [("org/model", "config.json"), ...]

    python -m devtools.hub org/model=models/tiny/vae DIR ...   # then HF_ENDPOINT=<printed url>
"""

from __future__ import annotations

import abc
import argparse
import contextlib
import hashlib
import json
import shutil
import threading
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import TracebackType
from urllib.parse import parse_qs, quote, unquote, urlsplit

# Files the hub keeps in Git LFS (from the .gitattributes every new hub repository gets);
# huggingface_hub downloads them through a redirect, so the stand-in does too.
LFS_SUFFIXES = frozenset(
    {".bin", ".ckpt", ".h5", ".jpeg", ".jpg", ".msgpack", ".onnx", ".onnx_data", ".png"}
    | {".pt", ".pth", ".safetensors", ".webp"}
)
LFS_MIN_SIZE = 10 * 1024 * 1024  # the hub puts any file this large in LFS
CHUNK = 1024 * 1024


def git_blob_id(data: bytes) -> str:
    """The Git object id of a file: what the hub reports as ``oid`` and a small file's ETag."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass(frozen=True)
class RepoFile:
    path: str  # relative, "/"-separated, as in the repository
    source: Path
    size: int
    blob_id: str  # Git object id; of the LFS pointer for an LFS file, as on the hub
    sha256: str | None  # set for LFS files only
    pointer_size: int | None = None

    @property
    def is_lfs(self) -> bool:
        return self.sha256 is not None

    @classmethod
    def read(cls, path: str, source: Path) -> RepoFile:
        data = source.read_bytes()
        if Path(path).suffix not in LFS_SUFFIXES and len(data) < LFS_MIN_SIZE:
            return cls(path, source, len(data), git_blob_id(data), None)
        sha256 = hashlib.sha256(data).hexdigest()
        pointer = (
            f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {len(data)}\n"
        ).encode()
        return cls(path, source, len(data), git_blob_id(pointer), sha256, len(pointer))

    def tree_entry(self) -> dict[str, object]:
        """The entry ``/api/models/{repo}/tree/{rev}`` lists for this file."""
        entry: dict[str, object] = {
            "type": "file",
            "oid": self.blob_id,
            "size": self.size,
            "path": self.path,
        }
        if self.is_lfs:
            entry["lfs"] = {"oid": self.sha256, "size": self.size, "pointerSize": self.pointer_size}
        return entry

    def sibling(self, blobs: bool) -> dict[str, object]:
        """The entry ``model_info`` lists; sizes only with ``?blobs=true``, as on the hub."""
        if not blobs:
            return {"rfilename": self.path}
        entry: dict[str, object] = {
            "rfilename": self.path,
            "size": self.size,
            "blobId": self.blob_id,
        }
        if self.is_lfs:
            entry["lfs"] = {
                "sha256": self.sha256,
                "size": self.size,
                "pointerSize": self.pointer_size,
            }
        return entry


@dataclass
class Repo:
    """One model repository: the files under ``root`` at a single commit."""

    repo_id: str
    root: Path
    commit: str = ""  # 40 hex digits; derived from the content when empty, like a Git commit
    files: dict[str, RepoFile] = field(init=False)

    def __post_init__(self) -> None:
        self.root = Path(self.root)
        if not self.root.is_dir():
            raise NotADirectoryError(f"{self.repo_id}: {self.root} is not a directory")
        paths = sorted(p for p in self.root.rglob("*") if p.is_file())
        self.files = {
            (rel := p.relative_to(self.root).as_posix()): RepoFile.read(rel, p) for p in paths
        }
        if not self.commit:
            listing = "".join(f"{f.path}\0{f.blob_id}\n" for f in self.files.values())
            self.commit = hashlib.sha1(f"{self.repo_id}\n{listing}".encode()).hexdigest()
        if len(self.commit) != 40 or any(c not in "0123456789abcdef" for c in self.commit):
            raise ValueError(f"{self.repo_id}: commit must be 40 lowercase hex digits")

    def resolve_revision(self, revision: str) -> str | None:
        """The commit ``revision`` names: only ``main`` and the commit itself exist."""
        return self.commit if revision in ("main", self.commit) else None

    def directories(self) -> list[str]:
        return sorted({str(Path(p).parent.as_posix()) for p in self.files} - {"."})


class HubError(Exception):
    """An error answered the way the hub answers it: status, X-Error-Code, message."""

    def __init__(
        self, status: HTTPStatus, code: str, message: str, headers: Mapping[str, str] | None = None
    ) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message
        self.headers = dict(headers or {})


class _Server(ThreadingHTTPServer):
    daemon_threads = True  # a client that hangs never blocks shutdown

    def __init__(self, hub: Hub, handler: type[BaseHTTPRequestHandler], host: str) -> None:
        self.hub = hub
        super().__init__((host, 0), handler)


class _Handler(BaseHTTPRequestHandler, abc.ABC):
    server: _Server
    # HTTP/1.0: one request per connection, so no response framing can go wrong.
    protocol_version = "HTTP/1.0"

    def do_GET(self) -> None:
        self._answer(body=True)

    def do_HEAD(self) -> None:
        self._answer(body=False)

    def _answer(self, body: bool) -> None:
        hub = self.server.hub
        hub._log(self.command, self.path)
        try:
            self.route(hub, body)
        except HubError as error:
            payload = json.dumps({"error": error.message}).encode()
            self._start(error.status, "application/json", len(payload))
            self.send_header("X-Error-Code", error.code)
            self.send_header("X-Error-Message", error.message)
            for name, value in error.headers.items():
                self.send_header(name, value)
            self.end_headers()
            if body:
                self.wfile.write(payload)

    @abc.abstractmethod
    def route(self, hub: Hub, body: bool) -> None:
        """Answer the request, or raise HubError."""

    def _start(self, status: HTTPStatus, content_type: str, length: int) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(length))

    def send_json(self, data: object, body: bool) -> None:
        payload = json.dumps(data).encode()
        self._start(HTTPStatus.OK, "application/json", len(payload))
        self.end_headers()
        if body:
            self.wfile.write(payload)

    def send_file(self, repo: Repo, file: RepoFile, body: bool, headers: Mapping[str, str]) -> None:
        self._start(HTTPStatus.OK, "application/octet-stream", file.size)
        for name, value in headers.items():
            self.send_header(name, value)
        self.end_headers()
        if body:
            # Recorded before the copy: a download that fails midway still left the stand-in.
            self.server.hub._record(repo.repo_id, file.path)
            with file.source.open("rb") as f:
                shutil.copyfileobj(f, self.wfile, CHUNK)

    def log_message(self, format: str, *args: object) -> None:
        if self.server.hub.verbose:
            super().log_message(format, *args)


class _HubHandler(_Handler):
    """The hub's API (``/api/models/...``) and file URLs (``/{repo}/resolve/{rev}/{path}``)."""

    def route(self, hub: Hub, body: bool) -> None:
        # Split the raw path, then unquote each part: a revision is quoted whole
        # (``refs%2Fpr%2F1``), so it is one segment of the raw path.
        url = urlsplit(self.path)
        query = {k: v[-1] for k, v in parse_qs(url.query).items()}
        if url.path == "/api/agent-harnesses":
            # huggingface_hub 2.x fetches this registry once a day for its User-Agent
            # header; empty, it detects nothing and moves on.
            return self.send_json({"standardEnvVars": [], "harnesses": {}}, body)
        if url.path.startswith("/api/models/"):
            if self.command != "GET":
                raise HubError(HTTPStatus.METHOD_NOT_ALLOWED, "MethodNotAllowed", "GET only")
            repo, rest = hub._find_repo(url.path.removeprefix("/api/models/"))
            self.api(repo, rest, query, body)
            return
        repo, rest = hub._find_repo(url.path.removeprefix("/"))
        kind, _, rest = rest.removeprefix("/").partition("/")
        revision, _, filename = rest.partition("/")
        if kind != "resolve" or not filename:
            raise HubError(HTTPStatus.NOT_FOUND, "EntryNotFound", f"no such URL: {url.path}")
        self.resolve(hub, repo, unquote(revision), unquote(filename), body)

    def api(self, repo: Repo, rest: str, query: dict[str, str], body: bool) -> None:
        if rest in ("", "/"):
            return self.model_info(repo, "main", query, body)
        verb, _, rest = rest.removeprefix("/").partition("/")
        if verb == "revision" and rest:
            return self.model_info(repo, unquote(rest), query, body)
        if verb == "tree" and rest:
            revision, _, subdir = rest.partition("/")
            return self.tree(repo, unquote(revision), unquote(subdir), query, body)
        raise HubError(HTTPStatus.NOT_FOUND, "EntryNotFound", f"no such API: {verb}")

    def model_info(self, repo: Repo, revision: str, query: dict[str, str], body: bool) -> None:
        commit = _commit(repo, revision)
        blobs = query.get("blobs", "").lower() in ("1", "true")
        info = {
            "_id": repo.commit[:24],
            "id": repo.repo_id,
            "modelId": repo.repo_id,
            "sha": commit,
            "private": False,
            "disabled": False,
            "gated": False,
            "tags": [],
            "siblings": [f.sibling(blobs) for f in repo.files.values()],
        }
        self.send_json(info, body)

    def tree(
        self, repo: Repo, revision: str, subdir: str, query: dict[str, str], body: bool
    ) -> None:
        _commit(repo, revision)
        recursive = query.get("recursive", "").lower() in ("1", "true")
        prefix = f"{subdir.strip('/')}/" if subdir.strip("/") else ""
        if prefix and not any(p.startswith(prefix) for p in repo.files):
            raise HubError(HTTPStatus.NOT_FOUND, "EntryNotFound", f"{subdir} does not exist")

        def listed(path: str) -> bool:
            return path.startswith(prefix) and (recursive or "/" not in path[len(prefix) :])

        folders = [
            {"type": "directory", "oid": git_blob_id(d.encode()), "size": 0, "path": d}
            for d in repo.directories()
            if listed(d)
        ]
        files = [f.tree_entry() for f in repo.files.values() if listed(f.path)]
        self.send_json(folders + files, body)

    def resolve(self, hub: Hub, repo: Repo, revision: str, filename: str, body: bool) -> None:
        commit = _commit(repo, revision)
        file = repo.files.get(filename)
        if file is None:
            # huggingface_hub caches "this file does not exist at this commit" from this header.
            raise HubError(
                HTTPStatus.NOT_FOUND,
                "EntryNotFound",
                f"{filename} does not exist at {commit}",
                {"X-Repo-Commit": commit},
            )
        headers = {"X-Repo-Commit": commit, "ETag": f'"{file.blob_id}"'}
        if not file.is_lfs:
            return self.send_file(repo, file, body, headers)
        # An LFS file: the metadata rides on a redirect to another origin, as on the hub.
        headers["X-Linked-Etag"] = f'"{file.sha256}"'
        headers["X-Linked-Size"] = str(file.size)
        headers["Location"] = f"{hub.cdn_url}/{quote(repo.repo_id)}/{commit}/{quote(file.path)}"
        self._start(HTTPStatus.FOUND, "text/plain", 0)
        for name, value in headers.items():
            self.send_header(name, value)
        self.end_headers()


class _CdnHandler(_Handler):
    """The LFS storage the hub redirects to: ``/{repo}/{commit}/{path}``, no hub headers."""

    def route(self, hub: Hub, body: bool) -> None:
        repo, rest = hub._find_repo(urlsplit(self.path).path.removeprefix("/"))
        commit, _, filename = rest.removeprefix("/").partition("/")
        file = repo.files.get(unquote(filename))
        if commit != repo.commit or file is None or not file.is_lfs:
            raise HubError(HTTPStatus.NOT_FOUND, "NoSuchKey", "The specified key does not exist.")
        self.send_file(repo, file, body, {"ETag": f'"{file.sha256}"'})


def _commit(repo: Repo, revision: str) -> str:
    commit = repo.resolve_revision(revision)
    if commit is None:
        # The hub's own wording; huggingface_hub turns the code into RevisionNotFoundError.
        raise HubError(HTTPStatus.NOT_FOUND, "RevisionNotFound", f"Invalid rev id: {revision}")
    return commit


class Hub:
    """The stand-in, on two free ports of ``host``: the hub at ``url``, its LFS storage at
    ``cdn_url``. A context manager; ``served`` lists the ``(repo_id, path)`` of every file
    body sent, ``requests`` every ``"METHOD /path"`` received."""

    def __init__(
        self,
        repos: Mapping[str, Path | str] | Iterable[Repo],
        *,
        host: str = "127.0.0.1",
        verbose: bool = False,
    ) -> None:
        if isinstance(repos, Mapping):
            repos = [Repo(repo_id, Path(root)) for repo_id, root in repos.items()]
        self.repos: dict[str, Repo] = {r.repo_id: r for r in repos}
        self.host = host
        self.verbose = verbose
        self.served: list[tuple[str, str]] = []
        self.requests: list[str] = []
        self._lock = threading.Lock()
        self._servers: list[_Server] = []
        self._threads: list[threading.Thread] = []

    @property
    def url(self) -> str:
        return self._url(0)

    @property
    def cdn_url(self) -> str:
        return self._url(1)

    def _url(self, index: int) -> str:
        if not self._servers:
            raise RuntimeError("the hub is not running")
        host, port = self._servers[index].server_address[:2]
        return f"http://{host}:{port}"

    def served_paths(self, repo_id: str) -> list[str]:
        """The files of ``repo_id`` sent so far, sorted, each once."""
        with self._lock:
            return sorted({path for rid, path in self.served if rid == repo_id})

    def reset(self) -> None:
        """Forget what was served and requested so far."""
        with self._lock:
            self.served.clear()
            self.requests.clear()

    def start(self) -> Hub:
        for handler in (_HubHandler, _CdnHandler):
            server = _Server(self, handler, self.host)
            thread = threading.Thread(
                target=server.serve_forever, name=f"hub-{handler.__name__}", daemon=True
            )
            thread.start()
            self._servers.append(server)
            self._threads.append(thread)
        return self

    def stop(self) -> None:
        for server in self._servers:
            server.shutdown()
            server.server_close()
        for thread in self._threads:
            thread.join()
        self._servers.clear()
        self._threads.clear()

    def __enter__(self) -> Hub:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def _find_repo(self, path: str) -> tuple[Repo, str]:
        """The repository ``path`` starts with, and the rest of it. Ids may have one or two
        parts (``gpt2``, ``org/name``): the longest that matches wins."""
        for repo_id in sorted(self.repos, key=len, reverse=True):
            if path == repo_id or path.startswith(f"{repo_id}/"):
                return self.repos[repo_id], path[len(repo_id) :]
        # Unauthenticated, the hub cannot tell "missing" from "private": 401, RepoNotFound.
        raise HubError(
            HTTPStatus.UNAUTHORIZED, "RepoNotFound", f"Repository not found: {path.split('/')[0]}"
        )

    def _log(self, method: str, path: str) -> None:
        with self._lock:
            self.requests.append(f"{method} {path}")

    def _record(self, repo_id: str, path: str) -> None:
        with self._lock:
            self.served.append((repo_id, path))


def _parse_repo(arg: str) -> Repo:
    """``org/name=DIR`` or ``DIR`` (served as ``local/<dir name>``)."""
    repo_id, sep, root = arg.rpartition("=")
    path = Path(root)
    return Repo(repo_id if sep else f"local/{path.resolve().name}", path)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("repos", nargs="+", metavar="[ORG/NAME=]DIR", help="a directory to serve")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--quiet", action="store_true", help="do not log each request")
    args = parser.parse_args(argv)
    hub = Hub([_parse_repo(arg) for arg in args.repos], host=args.host, verbose=not args.quiet)
    with hub:
        for repo in hub.repos.values():
            print(f"{repo.repo_id}@{repo.commit}  ({len(repo.files)} files from {repo.root})")
        print(f"export HF_ENDPOINT={hub.url}   # Ctrl-C stops the hub", flush=True)
        with contextlib.suppress(KeyboardInterrupt):
            threading.Event().wait()


if __name__ == "__main__":
    main()
