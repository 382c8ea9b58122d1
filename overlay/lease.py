"""Leases as flannel writes them in etcd, and the choice of a subnet to claim.

Key   `<prefix>/subnets/10.244.3.0-24`
Value `{"PublicIP":"198.18.0.3","PublicIPv6":null,"BackendType":"vxlan",
        "BackendData":{"VNI":1,"VtepMAC":"c6:d2:..."}}`

Parsing is strict about what we rely on (the subnet, PublicIP, VNI, VtepMAC) and tolerant of
extra fields, so a lease written by a newer flanneld still makes that host our peer.
"""

from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network
from typing import Iterable

from .config import NetworkConfig
from .errors import LeaseParseError, SubnetsExhausted

DEFAULT_PREFIX = "/coreos.com/network"
# Used with fullmatch: `$` would let a trailing newline through, `\d` any Unicode digit. A key must
# be exactly what subnet_key() writes, so an unpadded prefix length only.
_MAC = re.compile(r"[0-9a-f]{2}(:[0-9a-f]{2}){5}")
_SUBNET_KEY = re.compile(r"([0-9]{1,3}(?:\.[0-9]{1,3}){3})-(0|[1-9][0-9]?)")
_BROADCAST = IPv4Address("255.255.255.255")


def config_key(prefix: str) -> str:
    return f"{prefix.rstrip('/')}/config"


def subnets_prefix(prefix: str) -> str:
    return f"{prefix.rstrip('/')}/subnets/"


def subnet_key(prefix: str, subnet: IPv4Network) -> str:
    return f"{subnets_prefix(prefix)}{subnet.network_address}-{subnet.prefixlen}"


def parse_subnet_key(key: str, prefix: str) -> IPv4Network:
    """`<prefix>/subnets/10.244.3.0-24` -> IPv4Network('10.244.3.0/24')."""
    head = subnets_prefix(prefix)
    if not key.startswith(head):
        raise LeaseParseError(f"{key!r} is not under {head}")
    match = _SUBNET_KEY.fullmatch(key[len(head):])
    if not match:
        raise LeaseParseError(f"{key!r}: expected a subnet key such as 10.244.3.0-24")
    try:
        return IPv4Network(f"{match[1]}/{match[2]}", strict=True)
    except ValueError as exc:
        raise LeaseParseError(f"{key!r}: {exc}") from None


@dataclass(frozen=True)
class LeaseAttrs:
    """What a host announces about itself in its lease value."""
    public_ip: IPv4Address
    vni: int
    vtep_mac: str  # lower-case, colon-separated

    def to_json(self) -> str:
        return json.dumps({
            "PublicIP": str(self.public_ip),
            "PublicIPv6": None,
            "BackendType": "vxlan",
            "BackendData": {"VNI": self.vni, "VtepMAC": self.vtep_mac},
        }, separators=(",", ":"))


@dataclass(frozen=True)
class Lease:
    subnet: IPv4Network
    attrs: LeaseAttrs
    lease_id: int = 0       # the etcd lease the key is bound to (0: none, e.g. a reservation)
    mod_revision: int = 0   # etcd revision of the last write to the key


def parse_lease_value(value: str | bytes) -> LeaseAttrs:
    try:
        raw = json.loads(value)
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        raise LeaseParseError(f"lease value is not JSON ({exc})") from None
    if not isinstance(raw, dict):
        raise LeaseParseError("lease value must be a JSON object")
    if raw.get("BackendType") != "vxlan":
        raise LeaseParseError(f"BackendType {raw.get('BackendType')!r} is not vxlan")
    try:
        # IPv4Address() would also take an integer; flanneld writes a dotted-quad string.
        if not isinstance(raw.get("PublicIP"), str):
            raise ValueError
        public_ip = IPv4Address(raw["PublicIP"])
    except ValueError:
        raise LeaseParseError(f"PublicIP {raw.get('PublicIP')!r} is not an IPv4 address") from None
    if public_ip.is_unspecified or public_ip.is_loopback or public_ip.is_multicast or public_ip == _BROADCAST:
        raise LeaseParseError(f"PublicIP {public_ip} cannot be a host's underlay address")
    data = raw.get("BackendData")
    if not isinstance(data, dict):
        raise LeaseParseError("BackendData must be an object with VNI and VtepMAC")
    vni = data.get("VNI", 1)
    if not isinstance(vni, int) or isinstance(vni, bool) or not 0 < vni < (1 << 24):
        raise LeaseParseError(f"BackendData.VNI {vni!r} is not a VNI")
    mac = data.get("VtepMAC")
    if not isinstance(mac, str) or not _MAC.fullmatch(mac.lower()):
        raise LeaseParseError(f"BackendData.VtepMAC {mac!r} is not a MAC address")
    # The kernel refuses a multicast or all-zero MAC as a VXLAN FDB entry: one such lease would
    # fail every host's programming, so it is not a lease.
    if int(mac[:2], 16) & 1 or mac.strip("0:") == "":
        raise LeaseParseError(f"BackendData.VtepMAC {mac} is not a unicast MAC address")
    return LeaseAttrs(public_ip, vni, mac.lower())


def choose_subnet(config: NetworkConfig, taken: Iterable[IPv4Network],
                  preferred: Iterable[IPv4Network] = (), rng: random.Random | None = None,
                  spread: int = 100) -> IPv4Network:
    """Pick the subnet to try to claim next.

    A preferred subnet (the one this host held before) wins when it is valid and free. Otherwise
    pick at random among the first `spread` free subnets, as flannel does, so that hosts starting
    together rarely race for the same one.
    """
    # Like flannel, a candidate is taken when it overlaps any lease, whatever that lease's length
    # (leases from an older config with another SubnetLen still own their addresses). Leases as
    # long as ours or longer block the one subnet of ours that holds them; the rare wider ones are
    # checked one by one.
    blocked: set[IPv4Network] = set()
    wider: list[IPv4Network] = []
    for held in taken:
        if held.prefixlen >= config.subnet_len:
            blocked.add(held.supernet(new_prefix=config.subnet_len))
        else:
            wider.append(held)

    def is_free(subnet: IPv4Network) -> bool:
        return subnet not in blocked and not any(subnet.subnet_of(held) for held in wider)

    for subnet in preferred:
        if config.holds(subnet) and is_free(subnet):
            return subnet
    free: list[IPv4Network] = []
    for index in range(config.subnet_count):
        subnet = config.subnet_at(index)
        if is_free(subnet):
            free.append(subnet)
            if len(free) == spread:
                break
    if not free:
        raise SubnetsExhausted(
            f"out of subnets: all {config.subnet_count} /{config.subnet_len} subnets from "
            f"{config.subnet_min} to {config.subnet_max} in {config.network} are leased")
    return (rng or random).choice(free)
