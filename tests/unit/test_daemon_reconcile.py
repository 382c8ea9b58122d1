"""The daemon's reconcile, fast path and full path, against a stateful fake kernel.

Random sequences of lease events (joins, changes, leaves), re-listings, resync ticks and drift
made behind the daemon's back: after every reconcile the fake kernel holds exactly
desired_state() of the daemon's leases and the VXLAN filter exactly vxlan_sources(); lease
events alone never read the kernel back, and a resync repairs drift.
"""

from __future__ import annotations

import asyncio
import random
from dataclasses import replace
from ipaddress import IPv4Address, IPv4Network

import pytest

from overlay.config import parse_config
from overlay.daemon import Daemon, DaemonSettings
from overlay.dataplane import DataplaneState, Plan, Underlay, desired_state, vtep_mac, vxlan_sources
from overlay.etcd import EtcdSettings, LeaseEvent
from overlay.lease import Lease, LeaseAttrs

CONFIG = parse_config('{"Network": "10.0.0.0/16", "SubnetLen": 24, "Backend": {"Type": "vxlan"}}')
UNDERLAY = Underlay("eth0", IPv4Address("198.18.0.1"), 1500)
OWN = Lease(IPv4Network("10.0.1.0/24"), LeaseAttrs(IPv4Address("198.18.0.1"), 1,
                                                   vtep_mac(IPv4Address("198.18.0.1"), 1)), 7, 1)


class FakeKernel:
    """Holds routes (one per destination), neighbours (one per address) and FDB entries (one
    per MAC), and carries out plans the way the kernel's replace and delete do."""

    def __init__(self):
        self.state = DataplaneState(None)
        self.reads = 0

    def read_state(self, device_name: str, known: DataplaneState | None = None) -> DataplaneState:
        self.reads += 1
        return self.state

    def apply(self, plan: Plan) -> None:
        state = self.state
        if plan.create_device is not None:
            state = DataplaneState(plan.create_device)
        elif plan.update_device is not None:
            state = replace(state, device=plan.update_device)
        routes = {route.dst: route for route in state.routes}
        neighbours = {neighbour.ip: neighbour for neighbour in state.neighbours}
        fdb = {entry.mac: entry for entry in state.fdb}
        for route in plan.delete_routes:
            routes.pop(route.dst, None)
        for entry in plan.delete_fdb:
            if fdb.get(entry.mac) == entry:
                del fdb[entry.mac]
        for neighbour in plan.delete_neighbours:
            neighbours.pop(neighbour.ip, None)
        neighbours.update((n.ip, n) for n in plan.replace_neighbours)
        fdb.update((entry.mac, entry) for entry in plan.replace_fdb)
        routes.update((route.dst, route) for route in plan.replace_routes)
        self.state = DataplaneState(state.device, frozenset(neighbours.values()), frozenset(fdb.values()),
                                    frozenset(routes.values()))

    def announce_moved(self, addresses, gateway) -> int:
        return 0


def random_lease(rng: random.Random, revision: int) -> Lease:
    # Subnets that never overlap each other (the kernel holds one neighbour per address); MACs
    # and public IPs from small pools, so that they are shared now and then; a few leases of
    # another VNI or outside the network.
    subnet = IPv4Network((f"10.{0 if rng.random() < 0.95 else 9}.{rng.choice([0, 2, 3, 4, 5, 6, 7, 8])}.0", 24))
    ip = IPv4Address(f"198.18.0.{rng.randrange(2, 12)}")
    mac = vtep_mac(IPv4Address(f"198.18.0.{rng.randrange(2, 9)}"), 1)
    return Lease(subnet, LeaseAttrs(ip, 1 if rng.random() < 0.95 else 2, mac), 0, revision)


def make_daemon(kernel: FakeKernel, sources: dict) -> Daemon:
    daemon = Daemon(DaemonSettings(etcd=EtcdSettings(endpoints=("http://127.0.0.1:2379",))))
    daemon.kernel, daemon.config, daemon.underlay, daemon.own = kernel, CONFIG, UNDERLAY, OWN
    daemon.status.data_plane_ready = True
    # Host settings and the VXLAN filter are the firewall's, tested elsewhere: recorded here.
    daemon._apply_host_settings = lambda: None
    daemon._host_settings_present = lambda: True

    def sync(wanted):
        sources["now"] = set(wanted)
        sources["syncs"] += 1

    def update(tracker, added, removed):
        assert not (added & removed)
        sources["now"] = (sources["now"] | added) - removed

    daemon._sync_vxlan_filter, daemon._update_vxlan_filter = sync, update
    return daemon


@pytest.mark.parametrize("seed", range(30))
def test_kernel_holds_the_desired_state_after_every_reconcile(seed):
    rng = random.Random(seed)

    async def scenario():
        kernel = FakeKernel()
        sources = {"now": set(), "syncs": 0}
        daemon = make_daemon(kernel, sources)
        revision = 10
        try:
            daemon.peers = {lease.subnet: lease for lease in (random_lease(rng, 2) for _ in range(4))}
            await daemon._reconcile_once()
            for _ in range(40):
                reads = kernel.reads
                action = rng.random()
                if action < 0.6:
                    for _ in range(rng.randrange(1, 4)):   # one reconcile may see several events
                        revision += 1
                        if rng.random() < 0.3 and daemon.peers:
                            subnet = rng.choice(sorted(daemon.peers))
                            daemon._on_lease_event(LeaseEvent(subnet, None, revision))
                        else:
                            lease = random_lease(rng, revision)
                            daemon._on_lease_event(LeaseEvent(lease.subnet, lease, revision))
                    expect_read = not daemon._kernel_known
                elif action < 0.7:
                    revision += 1   # a re-listing: a whole new map, some leases the same objects
                    listed = {s: l for s, l in daemon.peers.items() if rng.random() < 0.8}
                    listed.update((l.subnet, l) for l in (random_lease(rng, revision) for _ in range(2)))
                    daemon.peers = listed
                    expect_read = not daemon._kernel_known
                elif action < 0.85:
                    daemon._mark_kernel_suspect()   # the resync timer
                    expect_read = True
                else:
                    # Drift behind our back: a route or neighbour gone, then the netlink event.
                    state = kernel.state
                    if state.routes and rng.random() < 0.5:
                        state = replace(state, routes=state.routes - {rng.choice(sorted(state.routes))})
                    elif state.neighbours:
                        state = replace(state, neighbours=state.neighbours - {rng.choice(sorted(state.neighbours))})
                    kernel.state = state
                    daemon._on_kernel_changes(None)
                    expect_read = True
                await daemon._reconcile_once()
                assert daemon.status.in_sync
                assert (kernel.reads > reads) == expect_read
                wanted = desired_state(OWN, daemon.peers.values(), CONFIG, UNDERLAY)
                assert kernel.state == wanted
                assert sources["now"] == vxlan_sources(OWN, daemon.peers.values(), CONFIG)
                assert daemon.status.peers == len(wanted.routes)
        finally:
            daemon._netlink_thread.shutdown(wait=False)

    asyncio.run(scenario())
