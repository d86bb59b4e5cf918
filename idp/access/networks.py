"""Named networks (policy 4.2.5, 5.1): which of the school's networks an address is in.

The school names its networks in the settings (``IDP_NETWORKS``, a JSON object of name ->
list of CIDR blocks, e.g. ``{"school": ["10.0.0.0/8"], "lab": ["10.20.0.0/16"]}``). Every
named network is part of the school; an address in none of them is ``outside``. A
restriction's allowed networks may mix CIDR blocks and these names. Pure functions only:
no settings object, no request."""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

OUTSIDE = "outside"
NETWORK_NAME = re.compile(r"^[a-z][a-z0-9_-]{0,31}$")

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


class NetworkError(ValueError):
    """A network name or CIDR block that cannot be used; the message says why."""


def parse_ip(value: str | None) -> IPAddress | None:
    """The address in ``value`` or None. An IPv4-mapped IPv6 address counts as its IPv4
    address (a dual-stack proxy reports ``::ffff:10.0.0.5``); a zone id is ignored."""
    if not value:
        return None
    text = value.strip().split("%", 1)[0]
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def parse_cidr(value: str) -> IPNetwork:
    """A CIDR block (a single address is its /32 or /128), or NetworkError. Host bits
    must be zero: ``10.0.0.5/8`` is refused rather than silently widened."""
    text = value.strip()
    try:
        return ipaddress.ip_network(text, strict=True)
    except ValueError as exc:
        try:
            loose = ipaddress.ip_network(text, strict=False)
        except ValueError:
            raise NetworkError(f"{text!r} is not an IP address or CIDR block") from exc
        raise NetworkError(f"{text!r} has host bits set; did you mean {loose}?") from exc


def is_cidr(value: str) -> bool:
    """Whether ``value`` looks like an address or CIDR block rather than a network name."""
    return ":" in value or any(ch.isdigit() for ch in value[:1]) or "/" in value


def validate_networks(value: Any) -> dict[str, list[str]]:
    """Check the named-networks setting; returns it normalised (CIDR text as Python
    prints it) or raises NetworkError with a message naming the bad entry."""
    if not isinstance(value, Mapping):
        raise NetworkError('must be a JSON object of name -> list of CIDR blocks, e.g. {"school": ["10.0.0.0/8"]}')
    result: dict[str, list[str]] = {}
    for name, blocks in value.items():
        if not isinstance(name, str) or not NETWORK_NAME.match(name) or name == OUTSIDE:
            raise NetworkError(
                f"network name {name!r} must be 1-32 lower-case latin letters, digits, _ or -, starting with a "
                f"letter, and not {OUTSIDE!r}"
            )
        if isinstance(blocks, str) or not isinstance(blocks, Sequence) or not blocks:
            raise NetworkError(f"network {name!r} must list at least one CIDR block")
        parsed: list[str] = []
        for block in blocks:
            if not isinstance(block, str):
                raise NetworkError(f"network {name!r}: {block!r} is not a CIDR block")
            try:
                parsed.append(str(parse_cidr(block)))
            except NetworkError as exc:
                raise NetworkError(f"network {name!r}: {exc}") from exc
        result[name] = parsed
    return result


def network_of(ip: str | None, networks: Mapping[str, Sequence[str]]) -> str:
    """The name of the named network holding ``ip``; when several hold it, the most
    specific (longest prefix) wins, ties by name. ``outside`` when none does."""
    address = parse_ip(ip)
    if address is None:
        return OUTSIDE
    best: tuple[int, str] | None = None
    for name, blocks in networks.items():
        for block in blocks:
            try:
                network = parse_cidr(block)
            except NetworkError:
                continue
            if address.version == network.version and address in network:
                candidate = (-network.prefixlen, name)
                if best is None or candidate < best:
                    best = candidate
    return OUTSIDE if best is None else best[1]


def is_inside(ip: str | None, networks: Mapping[str, Sequence[str]]) -> bool:
    """Whether ``ip`` is in one of the school's named networks."""
    return network_of(ip, networks) != OUTSIDE


def in_any(ip: str | None, entries: Iterable[str], networks: Mapping[str, Sequence[str]]) -> bool:
    """Whether ``ip`` is in one of ``entries`` (CIDR blocks or names of networks). A name
    covers every block of that network, so "school" also holds a lab nested inside it.
    An unknown name or a bad block matches nothing."""
    address = parse_ip(ip)
    if address is None:
        return False
    for entry in entries:
        blocks = networks.get(entry, ()) if not is_cidr(entry) else (entry,)
        for block in blocks:
            try:
                network = parse_cidr(block)
            except NetworkError:
                continue
            if address.version == network.version and address in network:
                return True
    return False


def split_entries(text: str) -> list[str]:
    """Entries typed by a person, separated by commas, spaces or new lines."""
    return [item for item in re.split(r"[\s,;]+", text or "") if item]


def check_entries(entries: Iterable[str], networks: Mapping[str, Sequence[str]]) -> list[str]:
    """Normalised entries for a restriction's allowed networks, or NetworkError naming
    the first one that is neither a CIDR block nor a known network name."""
    result: list[str] = []
    for entry in entries:
        if is_cidr(entry):
            result.append(str(parse_cidr(entry)))
        elif entry in networks:
            result.append(entry)
        else:
            known = ", ".join(sorted(networks)) or "none"
            raise NetworkError(f"{entry!r} is neither a CIDR block nor a named network (known: {known})")
    return list(dict.fromkeys(result))
