"""Address claims: the etcd schema that lets a container keep its address on another host.

A container's address normally comes from its host's subnet, and every other host reaches it
through that subnet's route. When a workload moves, the host it moves to *claims* the address:

Key   `<prefix>/claims/10.244.6.3`                (one key per moved address)
Value `{"PublicIP":"198.18.0.12","VtepMAC":"1a:c7:..","Subnet":"10.244.58.0/24",
        "ContainerID":"4f1e..."}`                 (the claiming host, and what it attached)

- flanneld reads only `<prefix>/config` and `<prefix>/subnets/`, so a claims prefix beside them is
  invisible to it: a mixed fleet keeps working, its flanneld hosts just do not follow moves.
- The key is bound to the claiming host's etcd lease (the one its subnet key lives on), so a host
  that dies loses its claims together with its subnet, and every peer stops routing to it at the
  same moment.
- It is written with create-if-absent (a transaction `If(version==0) Then(put)`), so of two hosts
  claiming one address at once exactly one wins; the loser reads the winner's value back in the
  same transaction and can say who holds it.
- It is withdrawn with a transaction that deletes only the value this host wrote (`If(value==ours)
  Then(delete)`), so a late DEL on one host never removes a newer claim by another.
- `Subnet`, `PublicIP` and `VtepMAC` name the claimant the way its lease does: peers route the
  address through the claimant's VTEP only while a lease with that subnet and public IP exists,
  so a claim never points at a host we hold no neighbour or FDB entry for.

Parsing is strict about the fields we rely on and tolerant of extra ones, as for leases, so a
claim written by a newer daemon still routes. Version of this schema: 1 (the key component
`claims` is the version mark: a later incompatible schema gets a new prefix).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network

from .errors import ClaimParseError

_MAC = re.compile(r"[0-9a-f]{2}(:[0-9a-f]{2}){5}")
_DOTTED_QUAD = re.compile(r"(0|[1-9][0-9]{0,2})(\.(0|[1-9][0-9]{0,2})){3}")
_CONTAINER_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")


def claims_prefix(prefix: str) -> str:
    return f"{prefix.rstrip('/')}/claims/"


def claim_key(prefix: str, address: IPv4Address) -> str:
    return f"{claims_prefix(prefix)}{address}"


def parse_claim_key(key: str, prefix: str) -> IPv4Address:
    """`<prefix>/claims/10.244.6.3` -> IPv4Address('10.244.6.3'); exactly what claim_key writes."""
    head = claims_prefix(prefix)
    if not key.startswith(head):
        raise ClaimParseError(f"{key!r} is not under {head}")
    text = key[len(head):]
    if not _DOTTED_QUAD.fullmatch(text):
        raise ClaimParseError(f"{key!r}: expected an address claim key such as {head}10.244.6.3")
    try:
        return IPv4Address(text)
    except ValueError as exc:
        raise ClaimParseError(f"{key!r}: {exc}") from None


@dataclass(frozen=True)
class ClaimAttrs:
    """What a claim says: which host holds the address, and for which container."""
    public_ip: IPv4Address
    vtep_mac: str            # lower-case, colon-separated
    subnet: IPv4Network      # the claiming host's own subnet (its lease)
    container_id: str

    def to_json(self) -> str:
        return json.dumps({"PublicIP": str(self.public_ip), "VtepMAC": self.vtep_mac,
                           "Subnet": str(self.subnet), "ContainerID": self.container_id},
                          separators=(",", ":"))


@dataclass(frozen=True)
class Claim:
    address: IPv4Address
    attrs: ClaimAttrs
    lease_id: int = 0        # the etcd lease the key is bound to
    mod_revision: int = 0

    def describe(self) -> str:
        return (f"{self.address} is claimed by host {self.attrs.public_ip} (subnet {self.attrs.subnet}) "
                f"for container {self.attrs.container_id[:12]}")


def parse_claim_value(value: str | bytes) -> ClaimAttrs:
    try:
        raw = json.loads(value)
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        raise ClaimParseError(f"claim value is not JSON ({exc})") from None
    if not isinstance(raw, dict):
        raise ClaimParseError("claim value must be a JSON object")
    public_ip = raw.get("PublicIP")
    if not isinstance(public_ip, str) or not _DOTTED_QUAD.fullmatch(public_ip):
        raise ClaimParseError(f"PublicIP {public_ip!r} is not an IPv4 address")
    mac = raw.get("VtepMAC")
    if not isinstance(mac, str) or not _MAC.fullmatch(mac.lower()):
        raise ClaimParseError(f"VtepMAC {mac!r} is not a MAC address")
    subnet = raw.get("Subnet")
    try:
        if not isinstance(subnet, str):
            raise ValueError
        network = IPv4Network(subnet, strict=True)
    except ValueError:
        raise ClaimParseError(f"Subnet {subnet!r} is not an IPv4 network such as 10.244.3.0/24") from None
    container_id = raw.get("ContainerID")
    if not isinstance(container_id, str) or not _CONTAINER_ID.fullmatch(container_id):
        raise ClaimParseError(f"ContainerID {container_id!r} is not a container ID")
    try:
        address = IPv4Address(public_ip)
    except ValueError:
        raise ClaimParseError(f"PublicIP {public_ip!r} is not an IPv4 address") from None
    return ClaimAttrs(address, mac.lower(), network, container_id)
