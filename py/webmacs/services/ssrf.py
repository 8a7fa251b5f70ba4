"""SSRF guard for outgoing requests to user-supplied URLs (webhooks, OTA downloads): vet and pin the address."""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from collections.abc import Iterable
from dataclasses import dataclass
from urllib.parse import urlsplit

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

# Ranges `is_global` does not already exclude on every Python we support, listed so the intent is explicit.
_BLOCKED_V4 = [
    ipaddress.ip_network(n)
    for n in (
        "0.0.0.0/8",
        "10.0.0.0/8",
        "100.64.0.0/10",
        "127.0.0.0/8",
        "169.254.0.0/16",
        "172.16.0.0/12",
        "192.0.0.0/24",
        "192.168.0.0/16",
        "198.18.0.0/15",
        "224.0.0.0/4",
        "240.0.0.0/4",
    )
]
_NAT64 = ipaddress.ip_network("64:ff9b::/96")
_METADATA = ipaddress.ip_address("169.254.169.254")
_LOOPBACK = ipaddress.ip_address("127.0.0.1")
_RESOLVE_TIMEOUT_S = 5.0


class Refused(Exception):
    """The URL's host is (or resolves to) an address outgoing requests must not reach."""


class Unresolvable(Exception):
    """The host name did not resolve (a transport failure, not a policy decision)."""


@dataclass(frozen=True)
class Target:
    """Where to connect: the URL's `host` (for the Host header and TLS) and the vetted `ip` to dial."""

    scheme: str
    host: str
    port: int
    ip: IPAddress | None  # None: an allow-listed host, dialled by name as usual


def why_blocked(ip: IPAddress) -> str | None:
    """A short reason when `ip` must not be contacted, else None."""
    if isinstance(ip, ipaddress.IPv6Address):
        # Embedded IPv4 forms reach the IPv4 host they carry, so judge that host.
        embedded = ip.ipv4_mapped or ip.sixtofour
        if embedded is None and ip in _NAT64:
            embedded = ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
        if embedded is not None:
            reason = why_blocked(embedded)
            return f"{reason} (embedded in {ip})" if reason else None
    if ip == _METADATA:
        return "cloud metadata address"
    checks = (
        ("loopback", ip.is_loopback),
        ("private", ip.is_private),
        ("link-local", ip.is_link_local),
        ("multicast", ip.is_multicast),
        ("unspecified", ip.is_unspecified),
        ("reserved", ip.is_reserved),
    )
    for name, hit in checks:
        if hit:
            return f"{name} address"
    if isinstance(ip, ipaddress.IPv4Address) and any(ip in n for n in _BLOCKED_V4):
        return "non-public address"
    if not ip.is_global:
        return "non-public address"
    return None


def _host_allowed(host: str, allow: Iterable[str]) -> bool:
    host = host.lower().rstrip(".")
    return any(host == a.strip().lower().strip("[]").rstrip(".") for a in allow)


def _ip_allowed(ip: IPAddress, allow: Iterable[str]) -> bool:
    for entry in allow:
        try:
            if ip in ipaddress.ip_network(entry.strip().strip("[]"), strict=False):
                return True
        except ValueError:
            continue  # a host name, matched by _host_allowed
    return False


def split_url(url: str) -> tuple[str, str, int]:
    """(scheme, host, port) of an http(s) URL; ValueError when it has no usable host."""
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https"):
        raise ValueError("URL must start with http:// or https://")
    host = parts.hostname  # lower-cased, brackets of IPv6 literals removed
    if not host:
        raise ValueError("URL has no host")
    port = parts.port or (443 if scheme == "https" else 80)  # .port raises ValueError when out of range
    return scheme, host, port


async def resolve(host: str, port: int) -> list[IPAddress]:
    """All addresses `host` resolves to (an IP literal resolves to itself)."""
    try:
        return [ipaddress.ip_address(host)]
    except ValueError:
        pass
    loop = asyncio.get_running_loop()
    try:
        infos = await asyncio.wait_for(
            loop.getaddrinfo(host, port, type=socket.SOCK_STREAM), timeout=_RESOLVE_TIMEOUT_S
        )
    except (OSError, TimeoutError) as e:
        raise Unresolvable(f"cannot resolve {host}: {e}") from e
    seen: list[IPAddress] = []
    for info in infos:
        # Drop an IPv6 scope id ("fe80::1%eth0"); the address alone decides.
        ip = ipaddress.ip_address(str(info[4][0]).split("%", 1)[0])
        if ip not in seen:
            seen.append(ip)
    if not seen:
        raise Unresolvable(f"cannot resolve {host}: no addresses")
    return seen


async def vet(url: str, allow: Iterable[str]) -> Target:
    """Resolve the URL's host and check every address; raise Refused, Unresolvable or ValueError.

    Every resolved address must pass (an attacker's DNS could hand out a good and a bad one in turn); the
    caller then dials `Target.ip`, the address that was checked, so a second lookup cannot swap it."""
    allow = list(allow)
    scheme, host, port = split_url(url)
    if _host_allowed(host, allow):
        return Target(scheme, host, port, None)
    name = host.rstrip(".")  # "localhost." is the same name, fully qualified
    if name == "localhost" or name.endswith(".localhost"):
        # Loopback by definition (RFC 6761), whatever a resolver says.
        addresses: list[IPAddress] = [_LOOPBACK]
    else:
        addresses = await resolve(host, port)
    for ip in addresses:
        if _ip_allowed(ip, allow):
            continue
        reason = why_blocked(ip)
        if reason:
            shown = host if host == str(ip) else f"{host} ({ip})"
            raise Refused(f"{shown} is a {reason}")
    return Target(scheme, host, port, addresses[0])


async def vet_for_config(url: str, allow: Iterable[str]) -> str | None:
    """Check a URL when it is configured: a reason string when refused, else None. A name that does not
    resolve now is accepted (it is checked again before every request, when it must resolve)."""
    try:
        await vet(url, allow)
    except Refused as e:
        return str(e)
    except ValueError as e:
        return str(e)
    except Unresolvable:
        return None
    return None


def pinned_request_args(url: str, target: Target) -> tuple[str, dict[str, str], dict[str, str]]:
    """(url, extra headers, httpx extensions) that dial `target.ip` while keeping the original Host header
    and TLS server name (SNI and certificate check use the name, not the IP). This closes the gap between
    vetting an address and connecting (DNS rebinding): no second lookup happens."""
    if target.ip is None:
        return url, {}, {}
    parts = urlsplit(url)
    ip_text = f"[{target.ip}]" if target.ip.version == 6 else str(target.ip)
    netloc = f"{ip_text}:{target.port}"
    if "@" in parts.netloc:  # keep credentials in the URL (httpx turns them into Basic auth)
        netloc = parts.netloc.rsplit("@", 1)[0] + "@" + netloc
    pinned = parts._replace(netloc=netloc).geturl()
    default_port = 443 if target.scheme == "https" else 80
    host_header = f"[{target.host}]" if ":" in target.host else target.host
    if target.port != default_port:
        host_header = f"{host_header}:{target.port}"
    headers = {"Host": host_header}
    extensions: dict[str, str] = {}
    if target.scheme == "https":
        extensions["sni_hostname"] = target.host
        # The connection pool is keyed by the dialled IP: without this, another host name on the same IP
        # could reuse a TLS session whose certificate was checked for this name.
        headers["Connection"] = "close"
    return pinned, headers, extensions
