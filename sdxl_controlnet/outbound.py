"""The outbound policy's rules: which URLs a client may make this server connect to.

- Two policies, each with its allow-list: ``URL_FETCH_ALLOW`` for images, ``WEBHOOK_ALLOW``
  for webhook receivers. ``https`` to public addresses only, unless the allow-list lists the
  host (by name or address) or a network holding its address, on any port or the one given:
  those may also be ``http`` and private.
- The host must be a DNS name or an address written the one standard way: a zone id, a
  percent sign, or an IPv4 address in decimal, octal, hex or short form is refused here,
  not left to the HTTP client's or the resolver's reading of it.

A URL is checked here where it is given (a job's webhook is refused at submit, in
``schemas.TaskParams``); the front's connections (``front/fetching.py``) check it again with
every address its name resolves to. Every refusal is a ``Refused``: ``reason`` is what the
client reads (the rule, never a name, an address or whether a name exists); ``detail`` goes
to the log.
"""

from __future__ import annotations

import ipaddress
import re
import typing as t
from dataclasses import dataclass

from yarl import URL

from .addresses import Address, refused_because, unmapped
from .settings import AllowEntry, Settings, parse_allow_list, settings

# Why a URL is refused: by the policy, or as no URL; or, once fetched (front/fetching.py),
# what came back.
Kind = t.Literal["policy", "url", "too_large", "timeout", "network", "status", "not_image"]
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


def literal(host: str) -> Address | None:
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
        if port == 0:  # nothing listens there: a webhook would only be retried
            raise Refused("url", "not a valid port: 0", host)
        if parsed.user or parsed.password:
            raise Refused("url", "a URL with a user name or password is refused", host)
        http = parsed.scheme == "http"
        if (address := literal(host)) is not None:
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


FETCH_POLICY = Policy.from_settings(use="fetch")
WEBHOOK_POLICY = Policy.from_settings(use="webhook")
