"""Unit tests of the daemon's lease map when a re-listing and the watch overlap.

The periodic re-list (the safety net against a missed event) runs beside the watch. A listing is
read at one revision and arrives a moment later; the watch may apply a newer event in between.
Applying that older listing would undo the event, and the watch, already past it, never repeats
it: the lease map would stay wrong until the next re-list, minutes later.
"""

from __future__ import annotations

import asyncio
from ipaddress import IPv4Address, IPv4Network

from overlay.daemon import Daemon, DaemonSettings
from overlay.dataplane import Underlay
from overlay.etcd import EtcdSettings, LeaseEvent
from overlay.lease import Lease, LeaseAttrs
from tests.support.stores import HeldBackListing


def lease(host: int, revision: int) -> Lease:
    attrs = LeaseAttrs(IPv4Address(f"198.18.0.{host}"), 1, f"02:00:00:00:00:{host:02x}")
    return Lease(IPv4Network(f"10.244.{host}.0/24"), attrs, lease_id=host, mod_revision=revision)


OWN, STAYS, LEAVES = lease(1, 2), lease(2, 3), lease(3, 4)


def daemon_with(store: HeldBackListing) -> Daemon:
    daemon = Daemon(DaemonSettings(etcd=EtcdSettings(endpoints=("http://127.0.0.1:2379",))))
    daemon.store = store
    daemon.own = OWN
    daemon.underlay = Underlay("eth0", OWN.attrs.public_ip, 1500)
    daemon.peers = {STAYS.subnet: STAYS, LEAVES.subnet: LEAVES}
    daemon.revision = daemon.listed_revision = 4
    return daemon


def test_a_listing_older_than_an_event_the_watch_applied_meanwhile_does_not_undo_it():
    async def scenario() -> Daemon:
        # Read at revision 4, before the lost host's lease was deleted at revision 5; then a
        # fresh listing that reflects the delete.
        store = HeldBackListing(([OWN, STAYS, LEAVES], 4), ([OWN, STAYS], 5))
        daemon = daemon_with(store)
        try:
            relist = asyncio.create_task(daemon._relist())
            await store.read.wait()
            daemon._on_lease_event(LeaseEvent(LEAVES.subnet, None, 5))   # the watch: the lease is gone
            store.deliver.set()
            await relist
            return daemon
        finally:
            daemon._netlink_thread.shutdown(wait=False)
    daemon = asyncio.run(scenario())
    assert daemon.peers == {STAYS.subnet: STAYS}
    assert daemon.revision == 5
    assert not daemon.lease_lost.is_set()


def test_a_listing_at_least_as_new_as_the_watch_is_applied():
    async def scenario() -> Daemon:
        joined = lease(4, 6)
        store = HeldBackListing(([OWN, STAYS, joined], 6))
        daemon = daemon_with(store)
        try:
            relist = asyncio.create_task(daemon._relist())
            await store.read.wait()
            daemon._on_lease_event(LeaseEvent(LEAVES.subnet, None, 5))   # also in the listing
            store.deliver.set()
            await relist
            assert store.calls == 1
            return daemon
        finally:
            daemon._netlink_thread.shutdown(wait=False)
    daemon = asyncio.run(scenario())
    assert daemon.peers == {STAYS.subnet: STAYS, lease(4, 6).subnet: lease(4, 6)}
    assert daemon.revision == daemon.listed_revision == 6
