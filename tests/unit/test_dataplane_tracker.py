"""DesiredTracker, kept up to date lease by lease, agrees with the whole computation.

On random sequences of lease events (joins, changes of public IP, MAC, VNI or revision, leaves;
subnets that overlap each other or ours, MACs shared between hosts, direct routing), with
commits in between as the daemon makes them after each successful reconcile, the tracker's
state and sources equal desired_state() and vxlan_sources() of the same leases, and its pending
plan, made from the touched keys alone, equals plan() of the whole current state against the
whole state at the last commit.
"""

from __future__ import annotations

from ipaddress import IPv4Address, IPv4Network

from hypothesis import given, settings
from hypothesis import strategies as st

from overlay.dataplane import (DesiredTracker, FdbEntry, Neighbour, Route, desired_state, plan,
                               vtep_mac, vxlan_sources)
from overlay.lease import Lease, LeaseAttrs

from tests.support.dataplane import CONFIGS, OWN, UNDERLAYS

MACS = [vtep_mac(IPv4Address(f"198.18.0.{i}"), 1) for i in range(1, 5)]
# Small pools, so that public IPs, MACs and revisions collide; subnets that overlap each other
# (10.0.4.0/23 and 10.0.4.0/24 share a network address: two neighbours at one address), ours,
# or lie outside the network.
SUBNETS = [IPv4Network(f"10.0.{i}.0/24") for i in (0, 2, 3, 4, 5, 6)] + [
    IPv4Network("10.0.4.0/23"), IPv4Network("10.0.0.0/23"), IPv4Network("10.9.0.0/24"), OWN.subnet]

leases = st.builds(
    lambda subnet, ip, mac, vni, revision: Lease(subnet, LeaseAttrs(IPv4Address(f"198.18.0.{ip}"), vni, mac), 7,
                                                 revision),
    st.sampled_from(SUBNETS), st.sampled_from([1, 2, 3, 5, 9, 20, 21]), st.sampled_from(MACS),
    st.sampled_from([1, 1, 1, 2]), st.integers(0, 4))
# An event: a lease written (joins or changes), a subnet's lease deleted, or a commit.
events = st.one_of(leases, st.sampled_from(SUBNETS), st.just("commit"))


def check(tracker: DesiredTracker, peers: dict, committed: dict, config, underlay) -> None:
    now = desired_state(OWN, peers.values(), config, underlay)
    then = desired_state(OWN, committed.values(), config, underlay)
    assert tracker.state() == now
    assert tracker.sources() == vxlan_sources(OWN, peers.values(), config)
    assert len(tracker) == len(now.routes)
    assert tracker.committed_state() == then
    sources_then = vxlan_sources(OWN, committed.values(), config)
    assert tracker.pending_sources() == (tracker.sources() - sources_then, sources_then - tracker.sources())
    crowded = any(len({n for n in state.neighbours if n.ip == neighbour.ip}) > 1
                  for state in (now, then) for neighbour in state.neighbours)
    pending = tracker.pending_plan()
    if crowded:
        assert pending is None
    else:
        assert pending == plan(now, then)
        assert pending.device_name == now.device.name
    for route in now.routes | then.routes:
        assert tracker.wants(route) == (route in now.routes)
    for neighbour in now.neighbours | then.neighbours:
        assert tracker.wants(neighbour) == (neighbour in now.neighbours)
        assert tracker.wants_neighbour_at(neighbour.ip) == any(n.ip == neighbour.ip for n in now.neighbours)
    for entry in now.fdb | then.fdb:
        assert tracker.wants(entry) == (entry in now.fdb)


@settings(max_examples=300, deadline=None)
@given(st.lists(leases, max_size=6), st.lists(events, max_size=40), st.sampled_from(CONFIGS),
       st.sampled_from(UNDERLAYS))
def test_tracker_equals_the_whole_computation(initial, sequence, config, underlay):
    peers = {lease.subnet: lease for lease in initial}
    tracker = DesiredTracker(OWN, config, underlay, peers.values())
    committed = dict(peers)
    check(tracker, peers, committed, config, underlay)
    for event in sequence:
        if event == "commit":
            tracker.commit()
            committed = dict(peers)
        elif isinstance(event, Lease):
            peers[event.subnet] = event
            tracker.update(event.subnet, event)
        else:
            peers.pop(event, None)
            tracker.update(event, None)
        check(tracker, peers, committed, config, underlay)


def test_one_lease_event_plans_only_its_objects():
    config, underlay = CONFIGS[0], UNDERLAYS[1]
    peers = [Lease(IPv4Network((f"10.0.{i}.0", 24)), LeaseAttrs(IPv4Address(f"198.19.{i // 200}.{i % 200 + 1}"), 1,
                                                                  vtep_mac(IPv4Address(f"198.19.0.{i % 250}"), i)), 0, i)
              for i in range(2, 250)]
    tracker = DesiredTracker(OWN, config, underlay, peers)
    assert tracker.pending_plan().empty
    newcomer = Lease(IPv4Network("10.0.250.0/24"), LeaseAttrs(IPv4Address("198.18.3.3"), 1, MACS[3]), 0, 999)
    tracker.update(newcomer.subnet, newcomer)
    changes = tracker.pending_plan()
    assert changes.replace_routes == (Route(newcomer.subnet, IPv4Address("10.0.250.0"), "flannel.1"),)
    assert changes.replace_neighbours == (Neighbour(IPv4Address("10.0.250.0"), MACS[3]),)
    assert changes.replace_fdb == (FdbEntry(MACS[3], IPv4Address("198.18.3.3")),)
    assert not (changes.delete_routes or changes.delete_neighbours or changes.delete_fdb or changes.create_device)
    assert tracker.pending_sources() == (frozenset({IPv4Address("198.18.3.3")}), frozenset())
    tracker.commit()
    tracker.update(newcomer.subnet, None)
    changes = tracker.pending_plan()
    assert changes.delete_routes and changes.delete_neighbours and changes.delete_fdb
    assert not (changes.replace_routes or changes.replace_neighbours or changes.replace_fdb)
    assert tracker.pending_sources() == (frozenset(), frozenset({IPv4Address("198.18.3.3")}))
