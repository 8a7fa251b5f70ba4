"""The SSRF guard: which addresses are refused, the allow-list, and the pinned request it produces."""

from __future__ import annotations

import asyncio
import ipaddress

import pytest
from hypothesis import given
from hypothesis import strategies as st

from webmacs.services import ssrf

BLOCKED = [
    "127.0.0.1",
    "127.255.0.9",
    "10.1.2.3",
    "172.16.0.1",
    "172.31.255.254",
    "192.168.10.10",
    "169.254.1.1",
    "169.254.169.254",
    "100.64.0.1",
    "100.127.255.254",
    "0.0.0.0",
    "224.0.0.251",
    "239.1.1.1",
    "240.0.0.1",
    "255.255.255.255",
    "192.0.2.5",
    "198.18.0.1",
    "::1",
    "::",
    "fc00::1",
    "fd12:3456::1",
    "fe80::1",
    "ff02::1",
    "::ffff:127.0.0.1",
    "::ffff:10.0.0.1",
    "::ffff:169.254.169.254",
    "2002:a00:1::1",
    "64:ff9b::a9fe:a9fe",
    "::127.0.0.1",
]
ALLOWED = ["8.8.8.8", "1.1.1.1", "93.184.215.14", "2606:4700:4700::1111", "::ffff:8.8.8.8", "2002:808:808::1"]


@pytest.mark.parametrize("addr", BLOCKED)
def test_blocked_addresses(addr: str) -> None:
    assert ssrf.why_blocked(ipaddress.ip_address(addr)) is not None


@pytest.mark.parametrize("addr", ALLOWED)
def test_public_addresses(addr: str) -> None:
    assert ssrf.why_blocked(ipaddress.ip_address(addr)) is None


def test_metadata_reason_is_explicit() -> None:
    assert ssrf.why_blocked(ipaddress.ip_address("169.254.169.254")) == "cloud metadata address"
    reason = ssrf.why_blocked(ipaddress.ip_address("::ffff:127.0.0.1")) or ""
    assert reason.startswith("loopback address (embedded in")


@given(
    st.sampled_from(
        ["10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "127.0.0.0/8", "169.254.0.0/16", "100.64.0.0/10"]
    ),
    st.integers(min_value=0),
)
def test_every_address_of_a_private_range_is_blocked(net: str, n: int) -> None:
    network = ipaddress.ip_network(net)
    ip = network[n % network.num_addresses]
    assert ssrf.why_blocked(ip) is not None
    assert ssrf.why_blocked(ipaddress.IPv6Address(f"::ffff:{ip}")) is not None


def vet(url: str, allow: list[str] | None = None) -> ssrf.Target:
    return asyncio.run(ssrf.vet(url, allow or []))


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1/",
        "http://localhost/",
        "http://sub.localhost/",
        "http://[::1]:81/",
        "https://169.254.169.254/",
        "http://0x7f.1/",
        "http://017700000001/",
    ],
)
def test_vet_refuses(url: str) -> None:
    with pytest.raises((ssrf.Refused, ssrf.Unresolvable)):
        vet(url)


def test_vet_resolves_names_and_refuses_what_they_point_at() -> None:
    # "localhost" is refused by name; a name from /etc/hosts that is not literally "localhost" is refused by address.
    with pytest.raises(ssrf.Refused, match="loopback"):
        asyncio.run(ssrf.vet("http://vm:8080/", []))


def test_vet_rejects_bad_urls() -> None:
    for url, message in (
        ("ftp://example.com/", "must start with http"),
        ("http:///nohost", "no host"),
        ("http://example.com:99999/", "(?i)port"),  # urllib's own message
    ):
        with pytest.raises(ValueError, match=message):
            vet(url)


def test_unresolvable_name_is_not_a_refusal() -> None:
    with pytest.raises(ssrf.Unresolvable):
        vet("https://no-such-host.invalid/")
    assert asyncio.run(ssrf.vet_for_config("https://no-such-host.invalid/", [])) is None


def test_allow_list_by_name_ip_and_network() -> None:
    assert vet("http://localhost:9/x", ["LOCALHOST"]).ip is None
    # Allowed by network: still dialled at the vetted address.
    assert vet("http://localhost:9/x", ["127.0.0.0/8"]).ip == ipaddress.ip_address("127.0.0.1")
    assert vet("http://127.0.0.1:9/x", ["127.0.0.1"]).ip is None
    assert vet("http://10.2.3.4/x", ["10.0.0.0/8"]).ip == ipaddress.ip_address("10.2.3.4")
    assert vet("http://[::1]/x", ["::1"]).ip is None
    with pytest.raises(ssrf.Refused):
        vet("http://10.2.3.4/x", ["10.9.0.0/16", "example.org"])


def test_public_ip_is_pinned() -> None:
    target = vet("https://user:pw@8.8.8.8:8443/p?q=1")
    assert target == ssrf.Target("https", "8.8.8.8", 8443, ipaddress.ip_address("8.8.8.8"))


def test_pinned_request_keeps_host_and_tls_name() -> None:
    target = ssrf.Target("https", "hooks.example.com", 443, ipaddress.ip_address("93.184.215.14"))
    url, headers, ext = ssrf.pinned_request_args("https://user:pw@hooks.example.com/a/b?x=1#f", target)
    assert url == "https://user:pw@93.184.215.14:443/a/b?x=1#f"
    assert headers == {"Host": "hooks.example.com", "Connection": "close"}
    assert ext == {"sni_hostname": "hooks.example.com"}
    target6 = ssrf.Target("http", "v6.example.com", 8080, ipaddress.ip_address("2606:4700:4700::1111"))
    url, headers, ext = ssrf.pinned_request_args("http://v6.example.com:8080/", target6)
    assert url == "http://[2606:4700:4700::1111]:8080/" and headers == {"Host": "v6.example.com:8080"} and ext == {}


def test_allow_listed_host_is_not_rewritten() -> None:
    target = ssrf.Target("http", "localhost", 9, None)
    assert ssrf.pinned_request_args("http://localhost:9/x", target) == ("http://localhost:9/x", {}, {})
