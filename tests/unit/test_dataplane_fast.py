"""The fast paths of overlay.dataplane and overlay.moves give exactly the plain computation.

desired_state(), vxlan_sources() and moved_routes() remember each lease's contribution per Lease
object, plan() works from set differences, and the values hash once: here each is checked
against the straightforward code it replaced (the `plain_*` functions below) on random inputs,
including calls that share most Lease objects with earlier ones, as the daemon's do.
"""

from __future__ import annotations

import random
from dataclasses import fields, replace
from ipaddress import IPv4Address, IPv4Network

import pytest

from overlay.claims import Claim, ClaimAttrs
from overlay.dataplane import (DataplaneState, FdbEntry, Neighbour, Route, desired_device,
                               desired_state, plan, vtep_mac, vxlan_sources)
from overlay.lease import Lease, LeaseAttrs

from overlay.moves import is_own_claim, moved_routes, with_moved_addresses

from tests.support.dataplane import CONFIGS, OWN, UNDERLAYS


# --- the plain computations, as they were before the fast paths ------------------------------

def plain_is_peer(peer, own, config):
    return (peer.subnet != own.subnet and peer.attrs.public_ip != own.attrs.public_ip
            and peer.attrs.vni == config.backend.vni and peer.subnet.subnet_of(config.network)
            and not peer.subnet.overlaps(own.subnet))


def plain_desired_state(own, peers, config, underlay):
    device = desired_device(own.subnet, config, underlay)
    usable = [peer for peer in peers if plain_is_peer(peer, own, config)]
    newest_by_mac, neighbours, routes = {}, set(), set()
    # The newest write has the FDB entry of its MAC; of writes in one transaction, the higher public IP.
    for peer in sorted(usable, key=lambda lease: (lease.mod_revision, int(lease.attrs.public_ip))):
        gateway = peer.subnet.network_address
        if (config.backend.direct_routing and underlay.network is not None
                and peer.attrs.public_ip in underlay.network):
            routes.add(Route(peer.subnet, peer.attrs.public_ip, underlay.iface, onlink=False))
            continue
        newest_by_mac[peer.attrs.vtep_mac] = peer
        neighbours.add(Neighbour(gateway, peer.attrs.vtep_mac))
        routes.add(Route(peer.subnet, gateway, device.name, onlink=True))
    fdb = {FdbEntry(mac, lease.attrs.public_ip) for mac, lease in newest_by_mac.items()}
    return DataplaneState(device, frozenset(neighbours), frozenset(fdb), frozenset(routes))


def plain_vxlan_sources(own, peers, config):
    return frozenset(peer.attrs.public_ip for peer in peers if plain_is_peer(peer, own, config))


def plain_plan_sets(desired, actual):
    """plan()'s route and neighbour changes, computed over whole states by their keys."""
    routes_by_dst = {route.dst: route for route in actual.routes}
    neighbours_by_ip = {n.ip: n for n in actual.neighbours}
    desired_route_dsts = {route.dst for route in desired.routes}
    desired_neighbour_ips = {n.ip for n in desired.neighbours}
    return dict(
        delete_routes=tuple(sorted(r for r in actual.routes if r.dst not in desired_route_dsts)),
        delete_fdb=tuple(sorted(actual.fdb - desired.fdb)),
        delete_neighbours=tuple(sorted(n for n in actual.neighbours if n.ip not in desired_neighbour_ips)),
        replace_neighbours=tuple(sorted(n for n in desired.neighbours if neighbours_by_ip.get(n.ip) != n)),
        replace_fdb=tuple(sorted(desired.fdb - actual.fdb)),
        replace_routes=tuple(sorted(r for r in desired.routes if routes_by_dst.get(r.dst) != r)),
    )


def plain_moved_routes(routes, own, peers, claims):
    route_to = {route.dst: route for route in routes}
    holder = {peer.subnet: peer for peer in peers}
    wanted = set()
    for claim in claims:
        if is_own_claim(claim, own):
            continue
        subnet = claim.attrs.subnet
        peer, via = holder.get(subnet), route_to.get(subnet)
        if peer is None or via is None or peer.attrs.public_ip != claim.attrs.public_ip:
            continue
        if claim.address in subnet:
            continue
        wanted.add(replace(via, dst=IPv4Network((claim.address, 32))))
    return frozenset(wanted)


# --- random inputs -----------------------------------------------------------------------------

MACS = [vtep_mac(IPv4Address(f"198.18.0.{i}"), 1) for i in range(1, 6)]


def random_lease(rng: random.Random) -> Lease:
    # Small pools, so that subnets, public IPs, MACs and revisions collide often; some leases are
    # outside the network, wider than a /24, of another VNI, or overlap our own.
    subnet = rng.choice([IPv4Network((f"10.0.{rng.randrange(8)}.0", 24)),
                         IPv4Network((f"10.0.{rng.randrange(8)}.0", 24)),
                         IPv4Network("10.0.0.0/23"), IPv4Network("10.9.0.0/24")])
    public_ip = IPv4Address(f"198.18.0.{rng.randrange(1, 40, rng.choice([1, 13]))}")
    mac = rng.choice(MACS + [vtep_mac(public_ip, 1)] * 3)
    return Lease(subnet, LeaseAttrs(public_ip, rng.choice([1, 1, 1, 2]), mac), 7, rng.randrange(5))


def random_claim(rng: random.Random, leases: list[Lease]) -> Claim:
    holder = rng.choice(leases)
    address = IPv4Address(f"10.0.{rng.randrange(8)}.{rng.randrange(2, 250)}")
    public_ip = holder.attrs.public_ip if rng.random() < 0.8 else IPv4Address("198.18.0.99")
    return Claim(address, ClaimAttrs(public_ip, holder.attrs.vtep_mac, holder.subnet, "c"), 9, 5)




@pytest.mark.parametrize("seed", range(40))
def test_desired_state_sources_and_moves_equal_the_plain_computation(seed):
    rng = random.Random(seed)
    pool = [random_lease(rng) for _ in range(30)]
    peers: list[Lease] = []
    for _ in range(12):
        # Each round keeps most Lease objects of the one before (memo hits), drops some and adds
        # new ones, some equal in value to ones seen before (same answer, other object).
        peers = [p for p in peers if rng.random() < 0.8]
        peers += [rng.choice(pool) if rng.random() < 0.5 else random_lease(rng) for _ in range(rng.randrange(6))]
        rng.shuffle(peers)
        config, underlay = rng.choice(CONFIGS), rng.choice(UNDERLAYS)
        own = OWN if rng.random() < 0.8 else rng.choice(pool)
        expected = plain_desired_state(own, peers, config, underlay)
        got = desired_state(own, iter(peers), config, underlay)  # any iterable, read once
        assert got == expected
        assert vxlan_sources(own, iter(peers), config) == plain_vxlan_sources(own, peers, config)
        claims = [random_claim(rng, pool + [own]) for _ in range(rng.randrange(4))] if peers else []
        assert moved_routes(got.routes, own, peers, claims) == plain_moved_routes(got.routes, own, peers, claims)
        moved = with_moved_addresses(got, own, peers, claims)
        # (From got.routes, not expected.routes: equal sets, but when two routes share a
        # destination, which one a claim follows goes by the set's iteration order.)
        assert moved == replace(got, routes=got.routes | plain_moved_routes(got.routes, own, peers, claims))


def random_state(rng: random.Random, device) -> DataplaneState:
    """A state as a kernel might report it: two routes to one destination, or two neighbour
    entries for one IP, can happen here, unlike in a desired state."""
    dsts = [IPv4Network((f"10.0.{i}.0", 24)) for i in range(6)] + [IPv4Network("10.0.2.7/32")]
    gateways = [IPv4Address(f"10.0.{i}.0") for i in range(3)] + [IPv4Address("198.18.0.5")]
    routes = {Route(rng.choice(dsts), rng.choice(gateways), rng.choice(["flannel.1", "eth0"]), rng.random() < 0.7)
              for _ in range(rng.randrange(8))}
    neighbours = {Neighbour(rng.choice(gateways), rng.choice(MACS)) for _ in range(rng.randrange(6))}
    fdb = {FdbEntry(rng.choice(MACS), rng.choice(gateways)) for _ in range(rng.randrange(5))}
    return DataplaneState(device, frozenset(neighbours), frozenset(fdb), frozenset(routes))


def copied(state: DataplaneState) -> DataplaneState:
    """The same values in new objects, as read back from the kernel."""
    return DataplaneState(state.device, frozenset(Neighbour(n.ip, n.mac) for n in state.neighbours),
                          frozenset(FdbEntry(f.mac, f.dst) for f in state.fdb),
                          frozenset(Route(r.dst, r.gateway, r.device, r.onlink) for r in state.routes))


@pytest.mark.parametrize("seed", range(200))
def test_plan_equals_the_plain_computation(seed):
    rng = random.Random(seed)
    device = desired_device(OWN.subnet, CONFIGS[0], UNDERLAYS[0])
    desired, actual = random_state(rng, device), random_state(rng, device)
    if rng.random() < 0.3:  # states that share objects, as the daemon's fast path compares them
        actual = replace(actual, routes=actual.routes | frozenset(rng.sample(sorted(desired.routes), len(desired.routes) // 2)),
                         neighbours=actual.neighbours | frozenset(list(desired.neighbours)[:2]))
    for actual_seen in (actual, copied(actual), desired, copied(desired)):
        changes = plan(desired, actual_seen)
        assert {name: getattr(changes, name) for name in plain_plan_sets(desired, actual_seen)} == \
            plain_plan_sets(desired, actual_seen)
    if len({r.dst for r in desired.routes}) == len(desired.routes) and \
            len({n.ip for n in desired.neighbours}) == len(desired.neighbours):
        assert plan(desired, desired).empty and plan(desired, copied(desired)).empty


@pytest.mark.parametrize("value", [
    Route(IPv4Network("10.0.2.0/24"), IPv4Address("10.0.2.0"), "flannel.1"),
    Route(IPv4Network("10.0.2.0/24"), IPv4Address("198.18.0.2"), "eth0", onlink=False),
    Neighbour(IPv4Address("10.0.2.0"), MACS[1]),
    FdbEntry(MACS[1], IPv4Address("198.18.0.2")),
])
def test_values_hash_once_as_the_dataclass_would(value):
    field_values = tuple(getattr(value, f.name) for f in fields(value))
    assert hash(value) == hash(field_values)  # what @dataclass(frozen=True) computes
    twin = type(value)(*field_values)
    assert twin == value and hash(twin) == hash(value) and twin is not value
    assert [f.name for f in fields(value)] == list(type(value).__dataclass_fields__)  # no new fields
    assert "_hash" not in repr(value)
    first = fields(value)[-1].name
    changed = replace(value, **{first: not value.onlink} if first == "onlink" else {first: IPv4Address("10.0.3.9")})
    assert hash(changed) == hash(tuple(getattr(changed, f.name) for f in fields(changed)))
    with pytest.raises(AttributeError):
        value.no_such_attribute
