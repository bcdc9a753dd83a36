"""The front's connections to a URL a client gave (an image to fetch, a webhook to deliver):
every one goes through this module, and nowhere else, under the outbound policy
(``sdxl_controlnet/outbound.py``).

- The decision is taken on exactly what is connected to: every address a name resolves to
  is checked by the connection's only resolver, and the socket factory checks the address
  and port of every socket before it connects (an address in the URL never meets the
  resolver). A DNS rebinding finds nothing to rebind.
- Redirects, at most ``MAX_REDIRECTS``, are followed here, each checked like the first URL.
- A body is read as it streams and cut at ``max_bytes``; connecting and the whole exchange,
  redirects included, are held to ``timeout_s``.

Every failure is a ``Refused``: ``reason`` is what the client reads; ``detail`` and the host
go to the log, and each failure is counted by kind (``sdxl_controlnet_outbound_failures``).
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import socket
import typing as t
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import aiohttp
from aiohttp.abc import AbstractResolver, ResolveResult
from yarl import URL

from .. import logs, outbound
from ..addresses import Address
from ..metrics import OUTBOUND_FAILURES
from ..outbound import Kind, Policy, Refused, literal

logger = logs.logger(__name__)

# The failures a later try may not meet.
RETRYABLE: frozenset[Kind] = frozenset({"timeout", "network"})
MAX_REDIRECTS = 3
REDIRECTS = {301, 302, 303, 307, 308}
CHUNK_BYTES = 64 * 1024
USER_AGENT = "sdxl-controlnet"


@dataclass
class _Guard:
    """One session's checks: the scheme of the request under way, the addresses its
    resolver cleared, and the refusal that stopped a socket, to report it as such."""

    policy: Policy
    http: bool = False
    cleared: set[tuple[Address, int]] = field(default_factory=set)
    refusal: Refused | None = None

    def socket(self, addr_info: t.Any) -> socket.socket:
        family, type_, proto, _, sockaddr = addr_info
        host, port = sockaddr[0], sockaddr[1]
        try:
            address = ipaddress.ip_address(host)
            if len(sockaddr) > 3 and sockaddr[3]:
                raise Refused("url", "not a valid host: a zone id", f"{host} scope {sockaddr[3]}")
            if (address, port) not in self.cleared:
                self.policy.check_connection(None, address, port, self.http)
        except (Refused, ValueError) as exc:
            self.refusal = exc if isinstance(exc, Refused) else Refused("url", "not valid", host)
            raise OSError(f"refused by the outbound policy: {host}") from None
        return socket.socket(family=family, type=type_, proto=proto)


def _lookups() -> AbstractResolver:
    """Name lookups on c-ares, one channel per worker, configured as the host's resolver
    (resolv.conf): a name that never answers holds up no other lookup, where the threaded
    resolver's could take all of libuv's four threads, the GPU Service's lookup's too. The
    fetch gives up on it at ``timeout_s``, as on any stage of the exchange."""
    return aiohttp.AsyncResolver()


class _CheckedResolver(AbstractResolver):
    """The connection's resolver: every address of a name is checked, and only checked
    addresses are handed to the connector, which connects to them and to nothing else."""

    def __init__(self, guard: _Guard) -> None:
        self.guard = guard
        self.resolver = _lookups()

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        literal(host)
        results = await self.resolver.resolve(host, port, family)
        for result in results:
            address = ipaddress.ip_address(result["host"])
            self.guard.policy.check_connection(host, address, port, self.guard.http)
            self.guard.cleared.add((address, port))
        return results

    async def close(self) -> None:
        await self.resolver.close()


@contextlib.asynccontextmanager
async def _session(guard: _Guard) -> AsyncIterator[aiohttp.ClientSession]:
    connector = aiohttp.TCPConnector(
        resolver=_CheckedResolver(guard), use_dns_cache=False, socket_factory=guard.socket
    )
    timeout = aiohttp.ClientTimeout(total=guard.policy.timeout_s, connect=guard.policy.timeout_s)
    async with aiohttp.ClientSession(
        connector=connector,
        timeout=timeout,
        trust_env=False,  # no proxy from the environment: the connection is the one checked
        headers={"User-Agent": USER_AGENT},
        cookie_jar=aiohttp.DummyCookieJar(),
    ) as session:
        yield session


@contextlib.asynccontextmanager
async def _failures_refused(guard: _Guard) -> AsyncIterator[None]:
    """Whatever goes wrong, as a Refused; the whole exchange within the time cap."""
    timeout_s = guard.policy.timeout_s
    try:
        async with asyncio.timeout(timeout_s):
            yield
    except Refused:
        raise
    except TimeoutError:
        raise Refused("timeout", f"timed out after {timeout_s:g} s") from None
    except (aiohttp.ClientError, OSError) as exc:
        if guard.refusal is not None:
            raise guard.refusal from None
        cause = getattr(exc, "os_error", exc)
        detail = f"{type(exc).__name__}: {exc} ({cause})"
        if isinstance(exc, aiohttp.InvalidURL):
            raise Refused("url", "not a valid URL", detail) from None
        raise Refused("network", "could not be reached", detail) from None
    except (ValueError, UnicodeError) as exc:  # what yarl and the IDNA codec raise
        raise Refused("url", "not a valid URL", f"{type(exc).__name__}: {exc}") from None


@contextlib.asynccontextmanager
async def _counted(use: str, url: str) -> AsyncIterator[None]:
    """Every failure logged, with what the client is not told, and counted by kind."""
    try:
        yield
    except Refused as exc:
        OUTBOUND_FAILURES.labels(use=use, kind=exc.kind).inc()
        logger.warning("%s of %s refused (%s): %s", use, host(url), exc.kind, exc.detail)
        raise


def host(url: str) -> str | None:
    """``url``'s host as connected to, for the log; None if it has none."""
    try:
        return URL(url).raw_host
    except (ValueError, TypeError, UnicodeError):
        return None


def _redirect(guard: _Guard, target: URL, location: str) -> URL:
    try:
        return guard.policy.check_url(target.join(URL(location)))
    except (ValueError, UnicodeError) as exc:
        raise Refused("url", "redirected to an invalid URL", f"{location}: {exc}") from None
    except Refused as exc:
        raise Refused(
            exc.kind, f"redirected: {exc.reason}", f"to {location}: {exc.detail}"
        ) from None


def _too_large(policy: Policy) -> Refused:
    return Refused("too_large", f"too large: over {policy.max_bytes} bytes, this server's limit")


async def fetch(url: str, policy: Policy | None = None) -> bytes:
    """The body of ``url``, fetched under ``policy``, following up to MAX_REDIRECTS
    redirects; anything else than a 200 is refused."""
    guard = _Guard(policy or outbound.FETCH_POLICY)
    async with _counted("fetch", url):
        target = guard.policy.check_url(url)
        async with _session(guard) as session, _failures_refused(guard):
            for _ in range(MAX_REDIRECTS + 1):
                guard.http = target.scheme == "http"
                async with session.get(target, allow_redirects=False) as response:
                    if response.status in REDIRECTS and "Location" in response.headers:
                        target = _redirect(guard, target, response.headers["Location"])
                        continue
                    if response.status != 200:
                        raise Refused("status", f"the server answered {response.status}, not 200")
                    if (response.content_length or 0) > guard.policy.max_bytes:
                        raise _too_large(guard.policy)
                    body = bytearray()
                    async for chunk in response.content.iter_chunked(CHUNK_BYTES):
                        body += chunk
                        if len(body) > guard.policy.max_bytes:
                            raise _too_large(guard.policy)
                    return bytes(body)
        raise Refused("url", f"more than {MAX_REDIRECTS} redirects")


@dataclass(frozen=True)
class Answer:
    status: int
    headers: t.Mapping[str, str]


async def post(
    url: str, body: bytes, headers: t.Mapping[str, str], policy: Policy | None = None
) -> Answer:
    """POST ``body`` to ``url`` under ``policy``; the answer's status and headers.
    Redirects are not followed: a webhook receiver answers at its own address."""
    guard = _Guard(policy or outbound.WEBHOOK_POLICY)
    async with _counted("webhook", url):
        target = guard.policy.check_url(url)
        guard.http = target.scheme == "http"
        async with (
            _session(guard) as session,
            _failures_refused(guard),
            session.post(target, data=body, headers=headers, allow_redirects=False) as answer,
        ):
            await answer.content.read(CHUNK_BYTES)  # not needed: only its status
            return Answer(answer.status, dict(answer.headers))
