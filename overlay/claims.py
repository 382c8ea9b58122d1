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

The origin decides (schema change of version 1.1, `Grant` and `Reason`)
-----------------------------------------------------------------------
Only the origin host (the live lease owner of the subnet that contains the address) knows
whether one of its containers still has the address, so a claim is made in two phases:

    {"PublicIP":..,"VtepMAC":..,"Subnet":..,"ContainerID":..,"Grant":"Pending"}   the claimant
    {..same..,"Grant":"Granted"}                                                  the origin: free
    {..same..,"Grant":"Refused","Reason":"allocated to container 4f1e.. eth0"}    the origin: in use

- The claimant creates the key Pending (create-if-absent, as before). The origin sees it through
  its claims watch and decides under its allocator's lock: an address allocated to one of its
  containers is refused; any other is reserved in its allocator (never handed out while the
  claim exists) and granted. It writes the decision on the claim key itself, in a transaction
  `If(mod_revision == the one it decided on) Then(put, bound to the claimant's lease)`, so a
  decision never lands on a newer claim and the key still dies with the claimant's lease.
- The claimant's ADD waits for the decision (a few seconds at most): Granted -> attached;
  Refused -> it withdraws the claim and fails with code 103 naming the origin; no answer -> it
  withdraws and fails with code 11 ("is overlayd running there?").
- Routes follow only Granted claims: while a claim is Pending or Refused every host, the
  origin included, keeps routing the address to the origin's subnet.
- No live lease holds the subnet of the address (its origin is gone): nobody can answer, and
  nobody there can use it, so the claim is written Granted at once.
- A claim without `Grant` was written by the previous version (1), which knew no grants: it
  reads as Granted. An unknown `Grant` makes the claim unreadable (treated as absent), as any
  other field we rely on. A mixed fleet routes as before, but a move *out of* a host that runs
  the previous version waits in vain for its grant: upgrade every host before moving workloads.

Parsing is strict about the fields we rely on and tolerant of extra ones, as for leases, so a
claim written by a newer daemon still routes. Version of this schema: 1.1 (the key component
`claims` is the version mark: a later incompatible schema gets a new prefix; adding `Grant`
kept it compatible, see above).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, replace
from enum import Enum
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


class Grant(Enum):
    """The origin host's decision on a claim (the `Grant` field)."""
    PENDING = "Pending"      # written by the claimant; the origin has not decided yet
    GRANTED = "Granted"      # the origin reserved the address for the claimant (or no origin lives)
    REFUSED = "Refused"      # the address is in use on the origin; `Reason` says by what


_GRANTS = {grant.value: grant for grant in Grant}
_REASON_MAX = 200


@dataclass(frozen=True)
class ClaimAttrs:
    """What a claim says: which host holds the address, for which container, and the origin's
    decision on it."""
    public_ip: IPv4Address
    vtep_mac: str            # lower-case, colon-separated
    subnet: IPv4Network      # the claiming host's own subnet (its lease)
    container_id: str
    grant: Grant = Grant.GRANTED
    reason: str = ""         # why the origin refused it (empty otherwise)

    def to_json(self) -> str:
        raw = {"PublicIP": str(self.public_ip), "VtepMAC": self.vtep_mac, "Subnet": str(self.subnet),
               "ContainerID": self.container_id, "Grant": self.grant.value}
        if self.reason:
            raw["Reason"] = self.reason
        return json.dumps(raw, separators=(",", ":"))

    def decided(self, grant: Grant, reason: str = "") -> "ClaimAttrs":
        """The same claim with the origin's decision on it."""
        return replace(self, grant=grant, reason=reason[:_REASON_MAX] if grant is Grant.REFUSED else "")

    def same_attachment(self, other: "ClaimAttrs") -> bool:
        """Whether both name one host and one container, whatever the origin decided."""
        return (self.public_ip, self.subnet, self.container_id) == (other.public_ip, other.subnet,
                                                                    other.container_id)


@dataclass(frozen=True)
class Claim:
    address: IPv4Address
    attrs: ClaimAttrs
    lease_id: int = 0        # the etcd lease the key is bound to
    mod_revision: int = 0

    @property
    def granted(self) -> bool:
        return self.attrs.grant is Grant.GRANTED

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
    # No Grant: written by version 1, which knew no grants; its claims were always in force.
    grant_text = raw.get("Grant", Grant.GRANTED.value)
    grant = _GRANTS.get(grant_text) if isinstance(grant_text, str) else None
    if grant is None:
        raise ClaimParseError(f"Grant {grant_text!r} is none of {', '.join(_GRANTS)}")
    reason = raw.get("Reason", "")
    if not isinstance(reason, str):
        raise ClaimParseError(f"Reason {reason!r} is not a string")
    return ClaimAttrs(address, mac.lower(), network, container_id, grant,
                      reason[:_REASON_MAX] if grant is Grant.REFUSED else "")
