"""Moved workload addresses as pure data: which /32 routes follow the claims, and which
addresses a host must not hand out.

A claim (overlay.claims) says "host C holds address A now". Every host other than C programs

    route  A/32 via <C's subnet network address>, onlink, dev <vxlan device>

which is the route it already has to C's subnet, narrowed to one address: it goes through the
neighbour and FDB entry of C that exist anyway, so a claim adds one route and nothing else, and
it is taken (or dropped) exactly when C's subnet route is (a claim of a host we do not route to
is not followed). With DirectRouting the route to C goes over the underlay, and so does the /32.

The origin host, whose subnet holds A, follows the same rule, and that is what moves A away from
its bridge: the /32 beats the bridge's connected /24 by longest prefix. Its own containers, which
see A as on-link in their /24, ARP for it on the bridge; the bridge answers for addresses it
routes elsewhere (proxy ARP, set by the CNI service), so their packets go up to the host and on
to C. Containers that held an ARP entry for A (its old MAC) are told by a gratuitous ARP from
the bridge, sent when A first appears in `moved_away`. The origin's allocator keeps A out of its
pool while the claim exists (`reserved_in`).

Only **granted** claims are followed (overlay.claims: the origin decides). A pending claim
changes no route anywhere: the origin keeps A on its bridge and every peer keeps sending A to the
origin's subnet, until the origin has made sure no container of its own has A and reserved it.
`decide_claims` is that decision, as pure data over the origin's allocation records; the daemon
(overlay.claimhook.ClaimGranter) runs it under the allocator's lock and writes the outcome to
etcd. `initial_grant` is the claimant's side: whether there is an origin to ask at all.

On C itself nothing comes from here: the CNI service routes A/32 to the container's veth when it
attaches it. That route lives and dies with the veth (the kernel removes a device's routes with
it), so a DEL, a crashed ADD or a GC can never leave it pointing at nothing, and the container is
reachable from its host the moment ADD returns, not one reconcile later. The daemon owns the
routes over the VXLAN device, the CNI service those over container veths.

`placement()` is the CNI service's decision for a requested address: from this host's pool, or
to be claimed from elsewhere in the overlay network.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from enum import Enum
from ipaddress import IPv4Address, IPv4Network
from typing import Iterable, Mapping

from cni.allocator import PoolState, reserve, unreserve

from .claims import Claim, Grant
from .dataplane import DataplaneState, Route, _network_key, _per_lease
from .lease import Lease


def is_own_claim(claim: Claim, own: Lease) -> bool:
    return claim.attrs.public_ip == own.attrs.public_ip and claim.attrs.subnet == own.subnet


def moved_routes(routes: Iterable[Route], own: Lease, peers: Iterable[Lease],
                 claims: Iterable[Claim]) -> frozenset[Route]:
    """The /32 routes for addresses claimed by other hosts, derived from the subnet routes."""
    followed = [claim for claim in claims if claim.granted and not is_own_claim(claim, own)]
    if not followed:
        return frozenset()  # the usual case: no need to index thousands of routes and peers
    # Index only the subnets claimants hold, by a key equal for equal networks that hashes in C
    # (Route keeps its own; a lease's is memoized per Lease object, as desired_state does).
    claimed = {_network_key(claim.attrs.subnet) for claim in followed}
    route_to = {route._key: route for route in routes if route._key in claimed}
    holder = {key: peer for peer, key in _per_lease(("subnet key",), peers, _subnet_key) if key in claimed}
    wanted = set()
    for claim in followed:
        subnet = claim.attrs.subnet
        peer = holder.get(_network_key(subnet))
        via = route_to.get(_network_key(subnet))
        if peer is None or via is None or peer.attrs.public_ip != claim.attrs.public_ip:
            continue  # a claimant we do not route to (gone, not a peer, or a stale claim)
        if claim.address in subnet:
            continue  # already reached through the claimant's subnet route
        wanted.add(replace(via, dst=IPv4Network((claim.address, 32))))
    return frozenset(wanted)


def _subnet_key(lease: Lease):
    return _network_key(lease.subnet)


def with_moved_addresses(base: DataplaneState, own: Lease, peers: Iterable[Lease],
                         claims: Iterable[Claim]) -> DataplaneState:
    """`base` (the subnet data plane from desired_state) plus a /32 route per followed claim."""
    extra = moved_routes(base.routes, own, peers, claims)
    if not extra:
        return base
    return replace(base, routes=base.routes | extra)


def moved_away(routes: Iterable[Route], own_subnet: IPv4Network) -> frozenset[IPv4Address]:
    """Addresses of our own subnet that are routed to another host: to be announced on the
    bridge (gratuitous ARP from the bridge's MAC, see Kernel.announce_moved) when they appear."""
    return frozenset(route.dst.network_address for route in routes
                     if route.dst.prefixlen == 32 and route.dst.network_address in own_subnet)


def reserved_in(pool: IPv4Network, claims: Iterable[Claim]) -> frozenset[IPv4Address]:
    """Addresses of `pool` that are claimed (by any host, pending or granted): never to be
    allocated from it. A refused claim reserves nothing: it never takes effect."""
    return frozenset(claim.address for claim in claims
                     if claim.address in pool and claim.attrs.grant is not Grant.REFUSED)


# --------------------------------------------------------------------------- the origin decides

def origin_of(address: IPv4Address, own: Lease, leases: Mapping[IPv4Network, Lease]) -> Lease | None:
    """The live lease whose subnet holds `address` (ours included), None when no host holds it.
    Every subnet of the network has the config's SubnetLen, which is our own subnet's length."""
    if address in own.subnet:
        return own
    return leases.get(IPv4Network((address, own.subnet.prefixlen), strict=False))


def initial_grant(address: IPv4Address, own: Lease, leases: Mapping[IPv4Network, Lease]) -> Grant:
    """How a claimant writes its claim: Pending when a live origin must decide; Granted when
    the address is of our own subnet or no live host holds its subnet (nobody can be using it,
    and nobody could answer)."""
    origin = origin_of(address, own, leases)
    return Grant.PENDING if origin is not None and origin is not own else Grant.GRANTED


@dataclass(frozen=True)
class Decision:
    """The origin's answer to one pending claim, to be written on the claim's key."""
    claim: Claim
    grant: Grant
    reason: str = ""


@dataclass(frozen=True)
class GrantRound:
    state: PoolState                  # the allocation records with reservations brought in line
    decisions: tuple[Decision, ...]   # for the pending claims of our subnet
    conflicts: tuple[Claim, ...]      # granted claims of addresses a container here has


def decide_claims(state: PoolState, own: Lease, claims: Iterable[Claim]) -> GrantRound:
    """The origin's round, under its allocator's lock: every pending claim of another host on an
    address of our subnet is refused when a container here has the address, else the address
    is reserved and the claim granted. Granted claims keep (or, after a restart or a claim made
    while we were gone, get) their reservation; a reservation no claim needs any more is dropped.

    A claim we granted before is pending no longer, and the decision is idempotent: a claim
    seen pending again (our write was lost, or we restarted before the watch showed it) finds
    its address reserved already and is granted again."""
    decisions, conflicts, wanted = [], [], set()
    for claim in sorted(claims, key=lambda c: c.address):
        if claim.address not in own.subnet or is_own_claim(claim, own) or claim.attrs.grant is Grant.REFUSED:
            continue
        state, holder = reserve(state, claim.address)
        if holder is None:
            wanted.add(claim.address)
            if claim.attrs.grant is Grant.PENDING:
                decisions.append(Decision(claim, Grant.GRANTED))
        elif claim.attrs.grant is Grant.PENDING:
            decisions.append(Decision(claim, Grant.REFUSED,
                                      f"allocated to container {holder.key.container_id[:12]} {holder.key.ifname} "
                                      f"on network {holder.key.network}"))
        else:
            conflicts.append(claim)
    state = unreserve(state, state.reserved - wanted)
    return GrantRound(state, tuple(decisions), tuple(conflicts))


class Placement(Enum):
    LOCAL = "local"      # from this host's own subnet: allocate it here
    MOVED_IN = "moved"   # from elsewhere in the overlay network: claim it


class UnusableAddress(ValueError):
    """A requested address that no container may have; the message says why."""


def placement(address: IPv4Address, own_subnet: IPv4Network, network: IPv4Network) -> Placement:
    """Where a requested address comes from; UnusableAddress when no container may have it.

    Every subnet's network address is a VTEP's, its first address a bridge's, its last the
    broadcast: none of these can belong to a container, whichever host's subnet it is in.
    """
    if address not in network:
        raise UnusableAddress(f"{address} is outside the overlay network {network}")
    if address in own_subnet:
        if address in (own_subnet.network_address, own_subnet.network_address + 1, own_subnet.broadcast_address):
            raise UnusableAddress(f"{address} is the VTEP, gateway or broadcast address of this host's "
                                  f"subnet {own_subnet}")
        return Placement.LOCAL
    home = IPv4Network((address, own_subnet.prefixlen), strict=False)
    if address in (home.network_address, home.network_address + 1, home.broadcast_address):
        raise UnusableAddress(f"{address} is the VTEP, gateway or broadcast address of subnet {home}")
    return Placement.MOVED_IN
