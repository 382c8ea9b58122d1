"""Unit tests of overlay.claims (the etcd schema of moved addresses) and overlay.moves (the /32
routes that follow claims, the addresses an origin host keeps out of its pool, and where a
requested address comes from). Pure: no kernel, no etcd."""

from __future__ import annotations

import json
from dataclasses import replace
from ipaddress import IPv4Address, IPv4Network

import pytest

from overlay.claims import Claim, ClaimAttrs, claim_key, claims_prefix, parse_claim_key, parse_claim_value
from overlay.config import parse_config
from overlay.dataplane import Route, Underlay, desired_state, plan, vtep_mac
from overlay.errors import ClaimParseError
from overlay.lease import Lease, LeaseAttrs
from overlay.moves import Placement, UnusableAddress, moved_routes, placement, reserved_in, with_moved_addresses

PREFIX = "/coreos.com/network"
CONFIG = parse_config('{"Network": "10.244.0.0/16", "Backend": {"Type": "vxlan"}}')
UNDERLAY = Underlay("eth0", IPv4Address("198.18.0.11"), 1500, IPv4Network("198.18.0.0/24"))


def lease(subnet: str, public_ip: str) -> Lease:
    ip = IPv4Address(public_ip)
    return Lease(IPv4Network(subnet), LeaseAttrs(ip, 1, vtep_mac(ip, 1)), lease_id=7, mod_revision=1)


OWN = lease("10.244.1.0/24", "198.18.0.11")
PEER_A = lease("10.244.2.0/24", "198.18.0.12")
PEER_B = lease("10.244.3.0/24", "198.18.0.13")


def claim(address: str, holder: Lease, container: str = "c0ffee") -> Claim:
    attrs = ClaimAttrs(holder.attrs.public_ip, holder.attrs.vtep_mac, holder.subnet, container)
    return Claim(IPv4Address(address), attrs, lease_id=9, mod_revision=5)


# --- the key schema ----------------------------------------------------------------------------

def test_claim_key_round_trips_and_sits_beside_flannels_keys():
    key = claim_key(PREFIX, IPv4Address("10.244.3.7"))
    assert key == "/coreos.com/network/claims/10.244.3.7"
    assert claims_prefix(PREFIX + "/") == "/coreos.com/network/claims/"
    assert parse_claim_key(key, PREFIX) == IPv4Address("10.244.3.7")


@pytest.mark.parametrize("tail", ["10.244.3", "10.244.3.07", "10.244.3.7/32", "10.244.3.7\n", "10.244.3.256",
                                  "", "a.b.c.d", "10.244.3.7 "])
def test_claim_key_is_exactly_what_we_write(tail):
    with pytest.raises(ClaimParseError):
        parse_claim_key(claims_prefix(PREFIX) + tail, PREFIX)


def test_claim_key_under_another_prefix_is_refused():
    with pytest.raises(ClaimParseError, match="not under"):
        parse_claim_key("/other/claims/10.244.3.7", PREFIX)


# --- the value ---------------------------------------------------------------------------------

def test_claim_value_round_trips():
    attrs = ClaimAttrs(IPv4Address("198.18.0.12"), "1a:c7:2f:de:68:06", IPv4Network("10.244.2.0/24"), "abc123")
    assert parse_claim_value(attrs.to_json()) == attrs
    assert json.loads(attrs.to_json()) == {"PublicIP": "198.18.0.12", "VtepMAC": "1a:c7:2f:de:68:06",
                                           "Subnet": "10.244.2.0/24", "ContainerID": "abc123", "Grant": "Granted"}


def test_claim_value_tolerates_new_fields_and_upper_case_mac():
    raw = {"PublicIP": "198.18.0.12", "VtepMAC": "1A:C7:2F:DE:68:06", "Subnet": "10.244.2.0/24",
           "ContainerID": "abc", "Future": 1}
    assert parse_claim_value(json.dumps(raw)).vtep_mac == "1a:c7:2f:de:68:06"


@pytest.mark.parametrize("change, field", [
    ({"PublicIP": 3232235521}, "PublicIP"), ({"PublicIP": "198.18.0"}, "PublicIP"),
    ({"VtepMAC": "1a:c7"}, "VtepMAC"), ({"Subnet": "10.244.2.1/24"}, "Subnet"), ({"Subnet": None}, "Subnet"),
    ({"ContainerID": ""}, "ContainerID"), ({"ContainerID": "-x"}, "ContainerID"),
])
def test_claim_value_refuses_what_it_cannot_use(change, field):
    raw = {"PublicIP": "198.18.0.12", "VtepMAC": "1a:c7:2f:de:68:06", "Subnet": "10.244.2.0/24",
           "ContainerID": "abc", **change}
    with pytest.raises(ClaimParseError, match=field):
        parse_claim_value(json.dumps(raw))


@pytest.mark.parametrize("value", [b"", b"[]", b"{", b"\xff", b"null"])
def test_claim_value_that_is_not_an_object_is_refused(value):
    with pytest.raises(ClaimParseError):
        parse_claim_value(value)


# --- routes that follow claims -----------------------------------------------------------------

def base_state():
    return desired_state(OWN, [PEER_A, PEER_B], CONFIG, UNDERLAY)


def test_address_moved_to_a_peer_is_routed_through_that_peers_vtep():
    moved = claim("10.244.3.5", PEER_A)  # from B's subnet to A
    routes = moved_routes(base_state().routes, OWN, [PEER_A, PEER_B], [moved])
    assert routes == {Route(IPv4Network("10.244.3.5/32"), IPv4Address("10.244.2.0"), "flannel.1", onlink=True)}


def test_origin_routes_its_own_moved_address_to_the_claimant():
    moved = claim("10.244.1.9", PEER_B)  # out of our own subnet
    state = with_moved_addresses(base_state(), OWN, [PEER_A, PEER_B], [moved])
    assert Route(IPv4Network("10.244.1.9/32"), IPv4Address("10.244.3.0"), "flannel.1") in state.routes
    # Only a route is added: the claimant's neighbour and FDB entry are those of its subnet.
    assert state.neighbours == base_state().neighbours and state.fdb == base_state().fdb


def test_own_claims_get_no_vxlan_route():
    mine = claim("10.244.2.7", OWN)
    assert moved_routes(base_state().routes, OWN, [PEER_A, PEER_B], [mine]) == frozenset()


def test_claims_of_hosts_we_do_not_route_to_are_not_followed():
    gone = lease("10.244.9.0/24", "198.18.0.19")            # no lease in the peer list
    impostor = replace(claim("10.244.3.5", PEER_A),         # says A's subnet, another public IP
                       attrs=replace(claim("10.244.3.5", PEER_A).attrs, public_ip=IPv4Address("198.18.0.99")))
    assert moved_routes(base_state().routes, OWN, [PEER_A, PEER_B], [claim("10.244.3.5", gone), impostor]) == frozenset()


def test_claim_of_an_address_in_the_claimants_own_subnet_adds_nothing():
    assert moved_routes(base_state().routes, OWN, [PEER_A, PEER_B], [claim("10.244.2.9", PEER_A)]) == frozenset()


def test_direct_routing_routes_the_moved_address_over_the_underlay():
    direct = parse_config('{"Network": "10.244.0.0/16", "Backend": {"Type": "vxlan", "DirectRouting": true}}')
    base = desired_state(OWN, [PEER_A], direct, UNDERLAY)
    routes = moved_routes(base.routes, OWN, [PEER_A], [claim("10.244.3.5", PEER_A)])
    assert routes == {Route(IPv4Network("10.244.3.5/32"), IPv4Address("198.18.0.12"), "eth0", onlink=False)}


def test_withdrawn_claim_is_planned_away_and_a_move_replaces_the_route():
    with_claim = with_moved_addresses(base_state(), OWN, [PEER_A, PEER_B], [claim("10.244.4.5", PEER_A)])
    changes = plan(base_state(), with_claim)
    assert [route.dst for route in changes.delete_routes] == [IPv4Network("10.244.4.5/32")]
    moved_on = with_moved_addresses(base_state(), OWN, [PEER_A, PEER_B], [claim("10.244.4.5", PEER_B)])
    changes = plan(moved_on, with_claim)
    assert changes.delete_routes == ()
    assert [(r.dst, r.gateway) for r in changes.replace_routes] == [(IPv4Network("10.244.4.5/32"),
                                                                     IPv4Address("10.244.3.0"))]


def test_reserved_addresses_are_the_claimed_ones_of_the_pool():
    claims = [claim("10.244.1.9", PEER_A), claim("10.244.3.5", PEER_A), claim("10.244.1.20", PEER_B)]
    assert reserved_in(OWN.subnet, claims) == {IPv4Address("10.244.1.9"), IPv4Address("10.244.1.20")}


# --- where a requested address comes from ------------------------------------------------------

def test_placement_of_requested_addresses():
    own, network = OWN.subnet, CONFIG.network
    assert placement(IPv4Address("10.244.1.7"), own, network) is Placement.LOCAL
    assert placement(IPv4Address("10.244.3.7"), own, network) is Placement.MOVED_IN
    assert placement(IPv4Address("10.244.200.2"), own, network) is Placement.MOVED_IN   # an unleased subnet


@pytest.mark.parametrize("address, why", [
    ("10.245.0.5", "outside the overlay network"), ("10.244.1.0", "VTEP, gateway or broadcast"),
    ("10.244.1.1", "VTEP, gateway or broadcast"), ("10.244.1.255", "VTEP, gateway or broadcast"),
    ("10.244.3.0", "subnet 10.244.3.0/24"), ("10.244.3.1", "subnet 10.244.3.0/24"),
    ("10.244.3.255", "subnet 10.244.3.0/24"),
])
def test_placement_refuses_addresses_no_container_may_have(address, why):
    with pytest.raises(UnusableAddress, match=why):
        placement(IPv4Address(address), OWN.subnet, CONFIG.network)
