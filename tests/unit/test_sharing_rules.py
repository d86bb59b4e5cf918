"""When two sessions' places count as far apart for the account-sharing signal
(policy 5.2.1), from addresses and the school's named networks alone (no geo-IP)."""

from __future__ import annotations

import pytest

from idp.sessions.signals import far_apart

NETWORKS = {
    "school": ["10.0.0.0/8", "fd00:5c::/32"],
    "lab": ["10.20.0.0/16"],  # the computer lab, inside the school network
    "library": ["192.168.50.0/24"],  # the town library the school uses, elsewhere
}


@pytest.mark.parametrize(("a", "b", "expected"), [
    # Named networks: the same one, a nested one, or two that are elsewhere.
    (("10.1.1.1", "school"), ("10.2.2.2", "school"), None),
    (("10.20.1.1", "lab"), ("10.1.1.1", "school"), None),
    (("10.1.1.1", "school"), ("10.20.1.1", "lab"), None),
    (("10.1.1.1", "school"), ("192.168.50.7", "library"), "different-networks"),
    (("10.20.1.1", "lab"), ("192.168.50.7", "library"), "different-networks"),
    # One inside, one outside.
    (("10.1.1.1", "school"), ("203.0.113.7", "outside"), "inside-and-outside"),
    (("203.0.113.7", "outside"), ("192.168.50.7", "library"), "inside-and-outside"),
    (("203.0.113.7", None), ("10.1.1.1", "school"), "inside-and-outside"),
    # Both outside: IPv4 /16 and IPv6 /32 prefixes.
    (("203.0.113.7", "outside"), ("203.0.200.9", "outside"), None),
    (("203.0.113.7", "outside"), ("198.51.100.7", "outside"), "different-prefixes"),
    (("::ffff:203.0.113.7", "outside"), ("203.0.1.1", "outside"), None),
    (("2001:db8:1::1", "outside"), ("2001:db8:ffff::2", "outside"), None),
    (("2001:db8:1::1", "outside"), ("2001:db9:1::1", "outside"), "different-prefixes"),
    # An IPv4 and an IPv6 address, or a missing one, cannot be compared.
    (("203.0.113.7", "outside"), ("2001:db8::1", "outside"), None),
    ((None, "outside"), ("203.0.113.7", "outside"), None),
    (("not an address", "outside"), ("203.0.113.7", "outside"), None),
])
def test_far_apart(a, b, expected):
    assert far_apart(a[0], a[1], b[0], b[1], NETWORKS) == expected
    assert far_apart(b[0], b[1], a[0], a[1], NETWORKS) == expected
