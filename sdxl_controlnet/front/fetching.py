"""The outbound policy: every request the front makes to a URL a client gave (an image to
fetch, a webhook to deliver) goes through this module, and nowhere else.

- Two policies, each with its allow-list: ``URL_FETCH_ALLOW`` for images, ``WEBHOOK_ALLOW``
  for webhook receivers. ``https`` to public addresses only, unless the allow-list lists the
  host (by name or address) or a network holding its address, on any port or the one given:
  those may also be ``http`` and private.
- The host must be a DNS name or an address written the one standard way: a zone id, a
  percent sign, or an IPv4 address in decimal, octal, hex or short form is refused here,
  not left to the HTTP client's or the resolver's reading of it.
- The decision is taken on exactly what is connected to: every address a name resolves to
  is checked by the connection's only resolver, and the socket factory checks the address
  and port of every socket before it connects (an address in the URL never meets the
  resolver). A DNS rebinding finds nothing to rebind.
- Redirects, at most ``MAX_REDIRECTS``, are followed here, each checked like the first URL.
- A body is read as it streams and cut at ``max_bytes``; connecting and the whole exchange,
  redirects included, are held to ``timeout_s``.

Every failure is a ``Refused``: ``reason`` is what the client reads (the rule, never a name,
an address or whether a name exists); ``detail`` and the host go to the log, and each
failure is counted by kind (``sdxl_controlnet_outbound_failures``).
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import re
import socket
import typing as t
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import aiohttp
from aiohttp.abc import AbstractResolver, ResolveResult
from yarl import URL

from .. import logs
from ..metrics import OUTBOUND_FAILURES
from ..settings import AllowEntry, Settings, parse_allow_list, settings
from .addresses import Address, refused_because, unmapped

logger = logs.logger(__name__)

MAX_REDIRECTS = 3
REDIRECTS = {301, 302, 303, 307, 308}
CHUNK_BYTES = 64 * 1024
USER_AGENT = "sdxl-controlnet"
# Why a fetch can fail: the policy refused it, the URL is not one, or what came back.
Kind = t.Literal["policy", "url", "too_large", "timeout", "network", "status", "not_image"]
RETRYABLE: frozenset[Kind] = frozenset({"timeout", "network"})
# A host's last label: all digits, or 0x and hex, makes the whole host an IPv4 address to
# the C library (inet_aton), whatever the rest is.
NUMERIC_LABEL = re.compile(r"(0x[0-9a-f]*|[0-9]+)")
DNS_LABEL = re.compile(r"[a-z0-9_]([a-z0-9_-]{0,61}[a-z0-9_])?")


class Refused(Exception):
    """The policy refused a URL, or fetching it failed: ``reason`` for the client,
    ``detail`` (names, addresses, the library's error) for the log only."""

    def __init__(self, kind: Kind, reason: str, detail: str = "") -> None:
        super().__init__(reason)
        self.kind = kind
        self.reason = reason
        self.detail = detail


def _literal(host: str) -> Address | None:
    """``host`` as an address if it is one written the standard way; None for a DNS name;
    ``Refused`` for anything else (a zone id, a numeric IPv4 spelling, an invalid name)."""
    if "%" in host:
        raise Refused("url", "not a valid host: a zone id or a percent sign", host)
    if ":" in host:
        try:
            return ipaddress.IPv6Address(host)
        except ValueError:
            raise Refused("url", "not a valid host: not an IPv6 address", host) from None
    labels = host.lower().removesuffix(".").split(".")
    if NUMERIC_LABEL.fullmatch(labels[-1]):
        try:
            address = ipaddress.IPv4Address(host)
        except ValueError:
            address = None
        if address is None or str(address) != host:
            raise Refused(
                "url",
                "not a valid host: an IPv4 address is written as four decimal numbers",
                host,
            )
        return address
    if len(host) > 253 or not all(DNS_LABEL.fullmatch(label) for label in labels):
        raise Refused("url", "not a valid host name", host)
    return None


@dataclass(frozen=True)
class Policy:
    name: str  # the setting that holds its allow-list, named in refusals
    allow: tuple[AllowEntry, ...]
    timeout_s: float
    max_bytes: int

    @classmethod
    def from_settings(
        cls, values: Settings = settings, use: t.Literal["fetch", "webhook"] = "fetch"
    ) -> Policy:
        """The policy for images (``use="fetch"``) or for webhooks (``"webhook"``)."""
        if use == "webhook":
            name, entries, timeout_s = (
                "WEBHOOK_ALLOW",
                values.webhook_allow,
                values.webhook_timeout_s,
            )
        else:
            name, entries, timeout_s = (
                "URL_FETCH_ALLOW",
                values.url_fetch_allow,
                values.url_fetch_timeout_s,
            )
        allow = tuple(_as_network(entry) for entry in parse_allow_list(entries))
        return cls(name, allow, timeout_s, values.max_upload_bytes)

    def allowed(self, host: str | None, address: Address | None, port: int) -> bool:
        """Whether the allow-list lets a connection to ``host`` (a name), ``address``, on
        ``port``: what is then allowed even if private, and over http."""
        address = None if address is None else unmapped(address)
        for entry in self.allow:
            if entry.port is not None and entry.port != port:
                continue
            if entry.host is not None and host is not None and entry.host == host.lower():
                return True
            if entry.network is not None and address is not None and address in entry.network:
                return True
        return False

    def refused(self, why: str, detail: str) -> Refused:
        return Refused(
            "policy",
            f"refused by the outbound policy: {why} (only https to public addresses, "
            f"unless the server's {self.name} allows the destination)",
            detail,
        )

    def check_connection(self, host: str | None, address: Address, port: int, http: bool) -> None:
        """Refuse a connection to ``address``:``port`` (which ``host`` resolved to) unless
        it is public, or allowed; over ``http``, unless allowed."""
        if self.allowed(host, address, port):
            return
        shown = f"{host} ({address}):{port}" if host else f"{address}:{port}"
        if why := refused_because(address):
            raise self.refused("address", f"{shown} is a {why} address")
        if http:
            raise self.refused("http", f"http to {shown}, which {self.name} does not list")

    def check_url(self, url: str | URL) -> URL:
        """``url`` parsed, if it is one this policy may connect to: its scheme and, for an
        address, its address; a name's addresses are checked as it is resolved."""
        try:
            parsed = URL(url) if isinstance(url, str) else url
            host = parsed.raw_host
            port = parsed.port
        except (ValueError, TypeError, UnicodeError) as exc:
            raise Refused("url", "not a valid URL", str(exc)) from None
        if parsed.scheme not in ("http", "https") or not host or port is None:
            raise Refused("url", "not an http(s) URL with a host", str(url)[:200])
        if parsed.user or parsed.password:
            raise Refused("url", "a URL with a user name or password is refused", host)
        http = parsed.scheme == "http"
        if (address := _literal(host)) is not None:
            self.check_connection(None, address, port, http)
        elif http and not (self.allowed(host, None, port) or self._networks_on(port)):
            # Nothing it resolves to could be allowed: refused without asking DNS.
            raise self.refused("http", f"http to {host}:{port}, which {self.name} does not list")
        return parsed

    def _networks_on(self, port: int) -> bool:
        return any(e.network is not None and e.port in (None, port) for e in self.allow)


def _as_network(entry: AllowEntry) -> AllowEntry:
    """A host entry that is an address, as the one-address network it is."""
    try:
        address = ipaddress.ip_address(entry.host or "")
    except ValueError:
        return entry
    return AllowEntry(None, ipaddress.ip_network(unmapped(address)), entry.port)


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
        _literal(host)
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
    guard = _Guard(policy or FETCH_POLICY)
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
    guard = _Guard(policy or WEBHOOK_POLICY)
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


FETCH_POLICY = Policy.from_settings(use="fetch")
WEBHOOK_POLICY = Policy.from_settings(use="webhook")
