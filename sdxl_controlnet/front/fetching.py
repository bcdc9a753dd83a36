"""The outbound policy: every request the front makes to a URL a client gave (an image to
fetch, a webhook to deliver) goes through this module, and nowhere else.

- ``https`` only, to public addresses only, unless ``URL_FETCH_ALLOW`` lists the host (by
  name or address) or a network holding its address: those may also be ``http`` and private.
- Every address a name resolves to is checked before connecting, and the connection goes to
  the address checked: the resolver below is the connection's only resolver, so nothing
  looks the name up a second time (a DNS rebinding finds nothing to rebind).
- Redirects, at most ``MAX_REDIRECTS``, are followed here, each checked like the first URL.
- A body is read as it streams and cut at ``max_bytes``; connecting and the whole exchange,
  redirects included, are held to ``timeout_s``.

Every refusal is a ``Refused`` whose ``reason`` is a sentence a client can act on.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import socket
import typing as t
from collections.abc import AsyncIterator
from dataclasses import dataclass

import aiohttp
from aiohttp.abc import AbstractResolver, ResolveResult
from yarl import URL

from ..settings import Settings, settings

MAX_REDIRECTS = 3
REDIRECTS = {301, 302, 303, 307, 308}
CHUNK_BYTES = 64 * 1024
USER_AGENT = "sdxl-controlnet"
Address = ipaddress.IPv4Address | ipaddress.IPv6Address
Network = ipaddress.IPv4Network | ipaddress.IPv6Network
# Why a fetch can fail: the client's URL is at fault, or the network may do better later.
Kind = t.Literal["address", "url", "too_large", "timeout", "network", "status", "not_image"]
RETRYABLE: frozenset[Kind] = frozenset({"timeout", "network"})


class Refused(Exception):
    """The policy refused a URL, or fetching it failed; ``reason`` says which and why."""

    def __init__(self, kind: Kind, reason: str) -> None:
        super().__init__(reason)
        self.kind = kind
        self.reason = reason


def _unmapped(address: Address) -> Address:
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
        return address.ipv4_mapped
    return address


def _refused_because(address: Address) -> str | None:
    """What makes ``address`` one a client must not reach through this server, if anything."""
    for name in ("loopback", "link_local", "multicast", "unspecified", "reserved", "private"):
        if getattr(address, f"is_{name}"):
            return name.replace("_", "-")
    return None if address.is_global else "non-public"


@dataclass(frozen=True)
class Policy:
    allow_hosts: frozenset[str]
    allow_networks: tuple[Network, ...]
    timeout_s: float
    max_bytes: int

    @classmethod
    def from_settings(cls, values: Settings = settings) -> Policy:
        entries = [e.strip() for e in values.url_fetch_allow.split(",") if e.strip()]
        networks = tuple(ipaddress.ip_network(e, strict=False) for e in entries if "/" in e)
        hosts = frozenset(e.lower().strip("[]") for e in entries if "/" not in e)
        return cls(hosts, networks, values.url_fetch_timeout_s, values.max_upload_bytes)

    def host_allowed(self, host: str) -> bool:
        return host.lower().strip("[]") in self.allow_hosts

    def check_address(self, host: str, address: Address) -> None:
        """Refuse ``address``, which ``host`` resolved to, unless it is public or allowed."""
        address = _unmapped(address)
        if self.host_allowed(host) or any(address in net for net in self.allow_networks):
            return
        if why := _refused_because(address):
            shown = host if host == str(address) else f"{host} ({address})"
            raise Refused(
                "address",
                f"address refused: {shown} is a {why} address; only public addresses are "
                "fetched, unless the server's URL_FETCH_ALLOW lists the host",
            )

    def check_url(self, url: str | URL) -> URL:
        """``url`` parsed, if its scheme and, for an address, its address are allowed."""
        try:
            parsed = URL(url) if isinstance(url, str) else url
        except (ValueError, TypeError) as exc:
            raise Refused("url", f"not a valid URL: {exc}") from None
        host = parsed.host
        if parsed.scheme not in ("http", "https") or not host:
            raise Refused("url", "not an http(s) URL with a host")
        with contextlib.suppress(ValueError):
            # An address in the URL is never resolved, so it is checked here.
            self.check_address(host, ipaddress.ip_address(host.strip("[]")))
        if parsed.scheme == "http" and not (self.host_allowed(host) or _in(host, self)):
            raise Refused(
                "url", "http is refused: use https (http only to hosts URL_FETCH_ALLOW lists)"
            )
        if parsed.user or parsed.password:
            raise Refused("url", "a URL with a user name or password is refused")
        return parsed


def _in(host: str, policy: Policy) -> bool:
    """Whether ``host`` is an address inside one of the allowed networks."""
    try:
        address = _unmapped(ipaddress.ip_address(host.strip("[]")))
    except ValueError:
        return False
    return any(address in net for net in policy.allow_networks)


class _CheckedResolver(AbstractResolver):
    """The connection's resolver: every address of a name is checked, and only checked
    addresses are handed to the connector, which connects to them and to nothing else."""

    def __init__(self, policy: Policy) -> None:
        self.policy = policy
        self.resolver = aiohttp.ThreadedResolver()

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        results = await self.resolver.resolve(host, port, family)
        for result in results:
            self.policy.check_address(host, ipaddress.ip_address(result["host"]))
        return results

    async def close(self) -> None:
        await self.resolver.close()


@contextlib.asynccontextmanager
async def _session(policy: Policy) -> AsyncIterator[aiohttp.ClientSession]:
    connector = aiohttp.TCPConnector(resolver=_CheckedResolver(policy), use_dns_cache=False)
    timeout = aiohttp.ClientTimeout(total=policy.timeout_s, connect=policy.timeout_s)
    async with aiohttp.ClientSession(
        connector=connector,
        timeout=timeout,
        trust_env=False,  # no proxy from the environment: the connection is the one checked
        headers={"User-Agent": USER_AGENT},
        cookie_jar=aiohttp.DummyCookieJar(),
    ) as session:
        yield session


@contextlib.asynccontextmanager
async def _failures_refused(policy: Policy) -> AsyncIterator[None]:
    """What goes wrong on the network, as a Refused; the whole exchange within the time cap."""
    try:
        async with asyncio.timeout(policy.timeout_s):
            yield
    except Refused:
        raise
    except TimeoutError:
        raise Refused("timeout", f"timed out after {policy.timeout_s:g} s") from None
    except aiohttp.InvalidURL as exc:
        raise Refused("url", f"not a valid URL: {exc}") from None
    except aiohttp.ClientConnectorDNSError as exc:
        raise Refused("network", f"the host could not be resolved ({exc.os_error})") from None
    except (aiohttp.ClientError, OSError) as exc:
        raise Refused("network", f"could not be fetched ({type(exc).__name__}: {exc})") from None


def _redirect(policy: Policy, target: URL) -> URL:
    try:
        return policy.check_url(target)
    except Refused as exc:
        raise Refused(exc.kind, f"redirected to {target}: {exc.reason}") from None


def _too_large(policy: Policy) -> Refused:
    return Refused("too_large", f"too large: over {policy.max_bytes} bytes, this server's limit")


async def fetch(url: str, policy: Policy | None = None) -> bytes:
    """The body of ``url``, fetched under ``policy``, following up to MAX_REDIRECTS
    redirects; anything else than a 200 is refused."""
    policy = policy or POLICY
    target = policy.check_url(url)
    async with _session(policy) as session, _failures_refused(policy):
        for _ in range(MAX_REDIRECTS + 1):
            async with session.get(target, allow_redirects=False) as response:
                if response.status in REDIRECTS and "Location" in response.headers:
                    target = _redirect(policy, target.join(URL(response.headers["Location"])))
                    continue
                if response.status != 200:
                    raise Refused("status", f"the server answered {response.status}, not 200")
                if (response.content_length or 0) > policy.max_bytes:
                    raise _too_large(policy)
                body = bytearray()
                async for chunk in response.content.iter_chunked(CHUNK_BYTES):
                    body += chunk
                    if len(body) > policy.max_bytes:
                        raise _too_large(policy)
                return bytes(body)
    raise Refused("url", f"more than {MAX_REDIRECTS} redirects")


async def post(
    url: str, body: bytes, headers: t.Mapping[str, str], policy: Policy | None = None
) -> int:
    """POST ``body`` to ``url`` under ``policy``; the answer's status. Redirects are not
    followed: a webhook receiver answers at its own address."""
    policy = policy or POLICY
    target = policy.check_url(url)
    async with (
        _session(policy) as session,
        _failures_refused(policy),
        session.post(target, data=body, headers=headers, allow_redirects=False) as answer,
    ):
        await answer.content.read(CHUNK_BYTES)  # not needed: only its status
        return answer.status


POLICY = Policy.from_settings()
