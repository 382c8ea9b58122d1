"""Unit tests of overlay.dataplane: the desired VXLAN state and the plan that reaches it.

No kernel here: actual states are built by hand, the way the netlink layer reports them.
"""

from __future__ import annotations

from dataclasses import replace
from ipaddress import IPv4Address, IPv4Interface, IPv4Network

import pytest

from overlay.config import parse_config
from overlay.dataplane import (VXLAN_OVERHEAD, DataplaneState, FdbEntry, Neighbour, Route, Underlay,
                               desired_device, desired_state, plan, vtep_mac, vxlan_sources)
from overlay.lease import Lease, LeaseAttrs

CONFIG = parse_config('{"Network": "10.244.0.0/16", "Backend": {"Type": "vxlan"}}')
UNDERLAY = Underlay("eth0", IPv4Address("198.18.0.11"), 1500, IPv4Network("198.18.0.0/24"))


def lease(subnet: str, public_ip: str, mac: str | None = None, revision: int = 1, vni: int = 1) -> Lease:
    ip = IPv4Address(public_ip)
    return Lease(IPv4Network(subnet), LeaseAttrs(ip, vni, mac or vtep_mac(ip, vni)), lease_id=7,
                 mod_revision=revision)


OWN = lease("10.244.1.0/24", "198.18.0.11")
PEER_A = lease("10.244.2.0/24", "198.18.0.12")
PEER_B = lease("10.244.3.0/24", "198.18.0.13")


# --- the VTEP MAC ------------------------------------------------------------------------------

def test_vtep_mac_is_stable_unicast_and_locally_administered():
    mac = vtep_mac(IPv4Address("198.18.0.11"), 1)
    assert mac == vtep_mac(IPv4Address("198.18.0.11"), 1)
    first = int(mac.split(":")[0], 16)
    assert first & 0x01 == 0, "multicast bit must be clear"
    assert first & 0x02 == 0x02, "locally administered bit must be set"


def test_vtep_mac_differs_per_host_and_vni():
    macs = {vtep_mac(IPv4Address(f"198.18.0.{i}"), vni) for i in range(1, 200) for vni in (1, 2)}
    assert len(macs) == 398


# --- the desired state -------------------------------------------------------------------------

def test_device_follows_flannels_layout():
    device = desired_device(OWN.subnet, CONFIG, UNDERLAY)
    assert device.name == "flannel.1"
    assert (device.vni, device.port) == (1, 8472)
    assert device.local_ip == UNDERLAY.public_ip
    assert device.underlay_iface == "eth0"
    assert device.mtu == 1500 - VXLAN_OVERHEAD == 1450
    assert device.address == IPv4Interface("10.244.1.0/32")
    assert device.up


def test_each_peer_gets_a_neighbour_an_fdb_entry_and_an_onlink_route():
    state = desired_state(OWN, [PEER_A, PEER_B], CONFIG, UNDERLAY)
    assert state.neighbours == {Neighbour(IPv4Address("10.244.2.0"), PEER_A.attrs.vtep_mac),
                                Neighbour(IPv4Address("10.244.3.0"), PEER_B.attrs.vtep_mac)}
    assert state.fdb == {FdbEntry(PEER_A.attrs.vtep_mac, IPv4Address("198.18.0.12")),
                         FdbEntry(PEER_B.attrs.vtep_mac, IPv4Address("198.18.0.13"))}
    assert state.routes == {Route(IPv4Network("10.244.2.0/24"), IPv4Address("10.244.2.0"), "flannel.1", True),
                            Route(IPv4Network("10.244.3.0/24"), IPv4Address("10.244.3.0"), "flannel.1", True)}


@pytest.mark.parametrize("not_a_peer", [
    OWN,                                                      # our own lease
    lease("10.244.9.0/24", "198.18.0.11"),                    # an older lease of this host
    lease("10.244.4.0/24", "198.18.0.14", vni=2),             # another VNI
    lease("10.99.0.0/24", "198.18.0.15"),                     # outside the network
    lease("10.244.1.0/25", "198.18.0.16"),                    # overlaps our subnet
])
def test_leases_that_are_not_peers_are_ignored(not_a_peer):
    state = desired_state(OWN, [PEER_A, not_a_peer], CONFIG, UNDERLAY)
    assert {route.dst for route in state.routes} == {PEER_A.subnet}
    assert len(state.neighbours) == len(state.fdb) == 1


def test_two_leases_with_one_mac_keep_one_fdb_entry_the_newest():
    old = lease("10.244.5.0/24", "198.18.0.20", mac="02:00:00:00:00:01", revision=5)
    new = lease("10.244.6.0/24", "198.18.0.21", mac="02:00:00:00:00:01", revision=9)
    state = desired_state(OWN, [new, old], CONFIG, UNDERLAY)
    assert state.fdb == {FdbEntry("02:00:00:00:00:01", IPv4Address("198.18.0.21"))}
    assert len(state.routes) == 2


def test_direct_routing_uses_the_underlay_for_peers_on_link():
    config = parse_config('{"Network": "10.244.0.0/16", "Backend": {"Type": "vxlan", "DirectRouting": true}}')
    far = lease("10.244.7.0/24", "198.19.5.5")
    state = desired_state(OWN, [PEER_A, far], config, UNDERLAY)
    assert Route(PEER_A.subnet, IPv4Address("198.18.0.12"), "eth0", onlink=False) in state.routes
    assert Route(far.subnet, IPv4Address("10.244.7.0"), "flannel.1", onlink=True) in state.routes
    assert {n.ip for n in state.neighbours} == {IPv4Address("10.244.7.0")}


# --- the plan ----------------------------------------------------------------------------------

def desired(*peers: Lease) -> DataplaneState:
    return desired_state(OWN, peers, CONFIG, UNDERLAY)


def test_from_nothing_the_plan_creates_everything():
    want = desired(PEER_A, PEER_B)
    changes = plan(want, DataplaneState(None))
    assert changes.create_device == want.device and not changes.recreate_device
    assert set(changes.replace_neighbours) == want.neighbours
    assert set(changes.replace_fdb) == want.fdb
    assert set(changes.replace_routes) == want.routes
    assert not (changes.delete_routes or changes.delete_fdb or changes.delete_neighbours)


def test_matching_state_gives_an_empty_plan():
    want = desired(PEER_A, PEER_B)
    changes = plan(want, want)
    assert changes.empty
    assert changes.describe() == []


def test_a_route_deleted_by_hand_is_planned_back():
    want = desired(PEER_A, PEER_B)
    lost = next(iter(want.routes))
    changes = plan(want, replace(want, routes=want.routes - {lost}))
    assert changes.replace_routes == (lost,)
    assert not changes.create_device and not changes.update_device
    assert changes.describe() == [f"route {lost.dst} via {lost.gateway} dev flannel.1: set"]


def test_a_departed_peer_is_removed_routes_first():
    actual = desired(PEER_A, PEER_B)
    changes = plan(desired(PEER_A), actual)
    assert [r.dst for r in changes.delete_routes] == [PEER_B.subnet]
    assert [f.mac for f in changes.delete_fdb] == [PEER_B.attrs.vtep_mac]
    assert [n.ip for n in changes.delete_neighbours] == [PEER_B.subnet.network_address]
    lines = changes.describe()
    assert lines[0].startswith("route") and "remove" in lines[0]


def test_a_peer_whose_mac_changed_leaves_no_stale_fdb_entry():
    moved = replace(PEER_A, attrs=replace(PEER_A.attrs, vtep_mac="02:aa:bb:cc:dd:ee"), mod_revision=3)
    changes = plan(desired(moved), desired(PEER_A))
    assert changes.delete_fdb == (FdbEntry(PEER_A.attrs.vtep_mac, PEER_A.attrs.public_ip),)
    assert changes.replace_fdb == (FdbEntry("02:aa:bb:cc:dd:ee", PEER_A.attrs.public_ip),)
    assert changes.replace_neighbours == (Neighbour(PEER_A.subnet.network_address, "02:aa:bb:cc:dd:ee"),)
    assert not changes.delete_neighbours, "the neighbour is replaced in place, not deleted"


def test_foreign_routes_are_not_in_the_actual_state_so_never_deleted():
    # The netlink layer reports only routes carrying our protocol number; a plan can therefore
    # only delete what we made. Here: nothing extra reported, nothing deleted.
    want = desired(PEER_A)
    assert plan(want, want).delete_routes == ()


@pytest.mark.parametrize("change", [{"port": 4789}, {"vni": 2}, {"local_ip": IPv4Address("198.18.0.99")},
                                    {"underlay_iface": "eth1"}])
def test_settings_the_kernel_cannot_change_recreate_the_device(change):
    want = desired(PEER_A)
    actual = replace(want, device=replace(want.device, **change))
    changes = plan(want, actual)
    assert changes.create_device == want.device and changes.recreate_device
    # A new device starts empty: every peer is programmed again.
    assert set(changes.replace_routes) == want.routes
    assert set(changes.replace_fdb) == want.fdb


@pytest.mark.parametrize("change", [{"mtu": 1400}, {"mac": "02:00:00:00:00:99"}, {"up": False},
                                    {"address": IPv4Interface("10.244.1.7/32")}])
def test_settings_the_kernel_can_change_are_updated_in_place(change):
    want = desired(PEER_A)
    actual = replace(want, device=replace(want.device, **change))
    changes = plan(want, actual)
    assert changes.update_device == want.device
    assert changes.create_device is None
    assert not changes.replace_routes, "peers stay programmed on an updated device"


# --- the VXLAN source filter's allowed set --------------------------------------------------------

def test_vxlan_sources_are_the_peers_public_ips():
    own_older = lease("10.244.9.0/24", "198.18.0.11")           # our own old lease: not a peer
    other_vni = lease("10.244.4.0/24", "198.18.0.14", vni=2)    # another overlay on this etcd
    outside = lease("10.9.1.0/24", "198.18.0.15")               # not in our network
    assert vxlan_sources(OWN, [OWN, PEER_A, PEER_B, own_older, other_vni, outside], CONFIG) == {
        IPv4Address("198.18.0.12"), IPv4Address("198.18.0.13")}
    assert vxlan_sources(OWN, [PEER_A], CONFIG) == {IPv4Address("198.18.0.12")}   # B left
    assert vxlan_sources(OWN, [], CONFIG) == frozenset()
