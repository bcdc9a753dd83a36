"""Which addresses a client may make this server connect to: public ones only.

Python's ``ipaddress`` tables differ between versions (3.11 calls 6to4 and site-local IPv6
global), so the special-purpose ranges that matter here are this module's own: refused
outright, or judged by the IPv4 address they carry. It imports nothing but ``ipaddress``,
so that its test runs on every Python the project supports."""

from __future__ import annotations

import ipaddress

Address = ipaddress.IPv4Address | ipaddress.IPv6Address
IPv6 = ipaddress.IPv6Network

# IPv6 ranges refused whatever ipaddress says of them (IANA's special-purpose registry).
REFUSED_IPV6 = {
    IPv6("fec0::/10"): "site-local",  # deprecated, still routed inside some sites
    IPv6("64:ff9b:1::/48"): "local-use NAT64",
    IPv6("100::/64"): "discard-only",
    IPv6("::ffff:0:0:0/96"): "IPv4-translated",
}
# IPv6 ranges that carry an IPv4 address, which is where a packet ends up: judged by it.
SIX_TO_FOUR = IPv6("2002::/16")
TEREDO = IPv6("2001::/32")
NAT64 = IPv6("64:ff9b::/96")


def unmapped(address: Address) -> Address:
    """An IPv4-mapped IPv6 address (``::ffff:a.b.c.d``) as the IPv4 address it is."""
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
        return address.ipv4_mapped
    return address


def carried_ipv4(address: ipaddress.IPv6Address) -> list[ipaddress.IPv4Address] | None:
    """The IPv4 addresses a 6to4, Teredo (server and client) or NAT64 address carries;
    None for any other address."""
    if address in SIX_TO_FOUR:
        return [address.sixtofour] if address.sixtofour else []
    if address in TEREDO:
        return list(address.teredo or ())
    if address in NAT64:
        return [ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)]
    return None


def refused_because(address: Address) -> str | None:
    """What makes ``address`` one a client must not reach through this server, if anything."""
    address = unmapped(address)
    if isinstance(address, ipaddress.IPv6Address):
        for network, name in REFUSED_IPV6.items():
            if address in network:
                return name
        if (carried := carried_ipv4(address)) is not None:
            inner = next(filter(None, map(refused_because, carried)), None)
            return None if inner is None else f"{inner} (inside {address})"
    for name in ("loopback", "link_local", "multicast", "unspecified", "reserved", "private"):
        if getattr(address, f"is_{name}"):
            return name.replace("_", "-")
    return None if address.is_global else "non-public"
