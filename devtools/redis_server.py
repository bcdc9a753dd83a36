"""A real Redis for tests and benchmarks: Debian's ``redis-server`` (or ``valkey-server``),
started on a free port in a folder of its own, and stopped with everything in it."""

from __future__ import annotations

import contextlib
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator

import redis

from devtools.harness import free_port

INSTALL = "install Debian's redis-server (apt-get install redis-server), as .ci/run does"


def server_binary() -> str:
    found = shutil.which("redis-server") or shutil.which("valkey-server")
    if found is None:
        raise RuntimeError(f"the Redis job store's tests need a Redis server: {INSTALL}")
    return found


@contextlib.contextmanager
def running_redis(timeout_s: float = 10.0) -> Iterator[str]:
    """A fresh Redis that keeps nothing on disk; its URL."""
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="redis-") as folder:
        options = ["--port", str(port), "--bind", "127.0.0.1", "--dir", folder]
        options += ["--save", "", "--appendonly", "no", "--protected-mode", "yes"]
        # DEBUG SLEEP, from this host only: a test makes the store stop answering for a while.
        options += ["--enable-debug-command", "local"]
        process = subprocess.Popen([server_binary(), *options], stdout=subprocess.DEVNULL)
        url = f"redis://127.0.0.1:{port}/0"
        try:
            deadline = time.monotonic() + timeout_s
            with redis.Redis.from_url(url) as client:
                while True:
                    try:
                        client.ping()
                        break
                    except redis.ConnectionError:
                        if process.poll() is not None or time.monotonic() > deadline:
                            raise RuntimeError(f"redis-server did not start on {port}") from None
                        time.sleep(0.05)
            yield url
        finally:
            process.terminate()
            process.wait(timeout=10)
