"""The floor under an HTTP hop: uvicorn as BentoML starts it (its own choice of event loop
and HTTP parser), with an app that reads the whole body and answers, on any path, as many
bytes as ``?answer=N`` asks (none without it; so /readyz answers 200 at once).
`bench/served.py` sends it as many bytes as each hop of a request carries, beside the real hop.

    python -m bench.bare_http PORT
"""

from __future__ import annotations

import sys

import uvicorn
from starlette.types import Receive, Scope, Send


async def app(scope: Scope, receive: Receive, send: Send) -> None:
    if scope["type"] != "http":
        return
    while (await receive()).get("more_body"):
        pass
    size = int(scope["query_string"].decode().partition("=")[2] or 0)
    headers = [(b"content-type", b"application/octet-stream"), (b"content-length", b"%d" % size)]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": bytes(size)})


if __name__ == "__main__":
    uvicorn.run(app, port=int(sys.argv[1]), log_level="warning", server_header=False)
