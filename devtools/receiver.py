"""A loopback HTTP server for tests of what the front fetches and delivers: it serves a
picture, redirects, a huge body or no answer at all, and records the webhooks it is sent,
failing the first ones when told to. Importing it changes nothing."""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

HUGE_BYTES = 300 * 1024 * 1024  # what /huge and /huge-chunked claim to send
SILENT_S = 60  # how long /silent keeps a connection without answering


@dataclass
class Delivery:
    path: str
    headers: dict[str, str]
    body: bytes
    status: int  # what the receiver answered
    at: float  # time.monotonic() on arrival


@dataclass
class Receiver:
    """``url`` serves: ``/picture`` (``picture``, sent as text/html to prove that the
    content decides), ``/text``, ``/redirect?to=URL``, ``/huge`` (a 300 MB Content-Length),
    ``/huge-chunked`` (300 MB without one), ``/silent`` (never answers); a POST anywhere
    is a webhook, answered with the next of ``answers`` (a status, or a status and headers;
    then 200)."""

    picture: bytes = b""
    answers: list[int | tuple[int, dict[str, str]]] = field(default_factory=list)
    deliveries: list[Delivery] = field(default_factory=list)
    fetches: list[str] = field(default_factory=list)
    connections: int = 0  # TCP connections accepted, whatever came over them
    url: str = ""

    def wait_for(self, count: int, timeout_s: float = 60) -> list[Delivery]:
        deadline = time.monotonic() + timeout_s
        while len(self.deliveries) < count:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{len(self.deliveries)} of {count} webhooks arrived")
            time.sleep(0.05)
        return self.deliveries[:count]


def _handler(receiver: Receiver) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args: object) -> None:
            pass

        def _answer(self, status: int, body: bytes = b"", **headers: str) -> None:
            self.send_response(status)
            for name, value in {"Content-Length": str(len(body)), **headers}.items():
                self.send_header(name.replace("_", "-"), value)
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self) -> None:
            receiver.fetches.append(self.path)
            path, _, query = self.path.partition("?")
            if path == "/picture":
                self._answer(200, receiver.picture, Content_Type="text/html")
            elif path == "/text":
                self._answer(200, b"<html>not a picture</html>", Content_Type="image/png")
            elif path == "/redirect":
                self._answer(302, Location=query.removeprefix("to="))
            elif path == "/huge":
                self.send_response(200)
                self.send_header("Content-Length", str(HUGE_BYTES))
                self.end_headers()
                self._stream(HUGE_BYTES)
            elif path == "/huge-chunked":
                self.send_response(200)
                self.send_header("Transfer-Encoding", "chunked")
                self.end_headers()
                self._stream(HUGE_BYTES, chunked=True)
            elif path == "/silent":
                time.sleep(SILENT_S)
            else:
                self._answer(404)

        def _stream(self, total: int, chunked: bool = False) -> None:
            chunk = b"\0" * (1024 * 1024)
            with contextlib.suppress(OSError):  # the client hangs up once it has enough
                for _ in range(total // len(chunk)):
                    self.wfile.write(b"100000\r\n" + chunk + b"\r\n" if chunked else chunk)

        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
            answer = receiver.answers.pop(0) if receiver.answers else 200
            status, extra = answer if isinstance(answer, tuple) else (answer, {})
            headers = {name.lower(): value for name, value in self.headers.items()}
            receiver.deliveries.append(Delivery(self.path, headers, body, status, time.monotonic()))
            self._answer(status, **{name.replace("-", "_"): v for name, v in extra.items()})

    return Handler


class _CountingServer(ThreadingHTTPServer):
    receiver: Receiver

    def get_request(self) -> tuple:
        accepted = super().get_request()
        self.receiver.connections += 1
        return accepted


@contextlib.contextmanager
def receiving(picture: bytes = b"") -> Iterator[Receiver]:
    """A Receiver on a free loopback port, stopped afterwards."""
    receiver = Receiver(picture=picture)
    server = _CountingServer(("127.0.0.1", 0), _handler(receiver))
    server.receiver = receiver
    server.daemon_threads = True
    receiver.url = f"http://127.0.0.1:{server.server_address[1]}"
    # shutdown() waits for the serving loop's next poll: 0.5 s by default, at every test's end.
    thread = threading.Thread(target=server.serve_forever, args=(0.02,), daemon=True)
    thread.start()
    try:
        yield receiver
    finally:
        server.shutdown()
        server.server_close()
