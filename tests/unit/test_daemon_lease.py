"""Unit tests of how the daemon holds its own lease: adopting renews it, a renewal's answer about
a lease no longer held is dropped, a loss found outside the watch wakes the watch, a lease of
our subnet announcing another host is a loss, a compacted watch backs off; and of its shutdown,
which leaves the loop free for CNI calls in flight. The store is a stand-in answering from a
script (real etcd is in the integration tests)."""

from __future__ import annotations

import asyncio
from dataclasses import replace
from ipaddress import IPv4Address
from pathlib import Path

from overlay.config import parse_config
from overlay.daemon import Backoff, Daemon, DaemonSettings
from overlay.dataplane import Underlay
from overlay.errors import LeaseLost
from overlay.etcd import EtcdSettings, LeaseEvent
from overlay.lease import Lease

from tests.support.stores import CompactedAndUnreachable, requests_in_a_second

from .test_daemon_relist import OWN, lease

REACQUIRED = replace(OWN, lease_id=99, mod_revision=9)


def daemon_with(store) -> Daemon:
    daemon = Daemon(DaemonSettings(etcd=EtcdSettings(endpoints=("http://127.0.0.1:2379",)), lease_ttl=3600))
    daemon.store = store
    daemon.own = OWN
    daemon.underlay = Underlay("eth0", OWN.attrs.public_ip, 1500)
    return daemon


def run(daemon: Daemon, coroutine):
    try:
        return asyncio.run(asyncio.wait_for(coroutine, 30))
    finally:
        daemon._netlink_thread.shutdown(wait=False)


class KeepaliveStore:
    def __init__(self, answer):
        self.answer = answer          # a TTL, or an exception to raise
        self.renewed: list[int] = []

    async def keepalive(self, lease_id: int, attempt_timeout: float | None = None) -> int:
        self.renewed.append(lease_id)
        if isinstance(self.answer, Exception):
            raise self.answer
        return self.answer


def test_adopting_a_lease_renews_it_and_keeps_the_ttl_etcd_granted():
    store = KeepaliveStore(7)
    daemon = daemon_with(store)
    assert run(daemon, daemon._adopt(OWN, OWN.attrs)) == (OWN, 7)
    assert store.renewed == [OWN.lease_id]
    daemon._set_own(OWN, "adopted", 7)
    assert daemon.own_ttl == 7 and 6 < daemon.status.lease_seconds_left() <= 7


def test_a_lease_that_cannot_be_renewed_is_not_adopted():
    for answer in (0, -1, LeaseLost("requested lease not found")):
        daemon = daemon_with(KeepaliveStore(answer))
        assert run(daemon, daemon._adopt(OWN, OWN.attrs)) == (None, 0)


class ReacquiredDuringRenewal:
    """The first renewal is answered "expired" after the daemon has already re-acquired (its
    answer is about the old lease); later ones are answered for the new lease."""

    def __init__(self, daemon_ref: list):
        self.daemon_ref = daemon_ref
        self.renewed: list[int] = []
        self.second = asyncio.Event()

    async def keepalive(self, lease_id: int, attempt_timeout: float | None = None) -> int:
        self.renewed.append(lease_id)
        if len(self.renewed) == 1:
            self.daemon_ref[0].own = REACQUIRED
            return 0
        self.second.set()
        return 2


def test_a_renewal_answer_about_a_lease_no_longer_held_is_dropped():
    holder: list[Daemon] = []
    store = ReacquiredDuringRenewal(holder)
    daemon = daemon_with(store)
    holder.append(daemon)
    daemon.own_ttl = 1   # renew every 0.5 s

    async def scenario():
        renewing = asyncio.create_task(daemon._renew_loop())
        try:
            await store.second.wait()
        finally:
            renewing.cancel()
            await asyncio.gather(renewing, return_exceptions=True)
    run(daemon, scenario())
    assert store.renewed[:2] == [OWN.lease_id, REACQUIRED.lease_id]
    assert not daemon.lease_lost.is_set()


class SilentWatch:
    """A watch on which nothing happens (a quiet cluster); notes when it is closed."""

    def __init__(self):
        self.started = asyncio.Event()
        self.closed = False

    async def watch_leases(self, start_revision: int):
        self.started.set()
        try:
            await asyncio.Event().wait()
            yield   # never reached: makes this an async generator
        finally:
            self.closed = True


def test_a_loss_found_outside_the_watch_ends_the_wait_on_a_silent_watch():
    store = SilentWatch()
    daemon = daemon_with(store)

    async def scenario():
        watching = asyncio.create_task(daemon._watch_until_lease_lost(Backoff()))
        await store.started.wait()
        daemon._mark_lease_lost()   # as the renewal or a re-listing does
        await watching
    run(daemon, scenario())
    assert store.closed


def test_our_subnet_announced_by_another_host_is_a_lost_lease():
    daemon = daemon_with(None)
    daemon._on_lease_event(LeaseEvent(OWN.subnet, replace(OWN, mod_revision=5), 5))   # ours, again
    assert not daemon.lease_lost.is_set()
    usurper = replace(OWN, attrs=replace(lease(7, 6).attrs), mod_revision=6)
    assert usurper.attrs.public_ip == IPv4Address("198.18.0.7")
    daemon._on_lease_event(LeaseEvent(OWN.subnet, usurper, 6))
    assert daemon.lease_lost.is_set()


def test_a_compacted_lease_watch_whose_relisting_fails_backs_off():
    store = CompactedAndUnreachable()
    daemon = daemon_with(store)
    calls = run(daemon, requests_in_a_second(daemon._watch_loop, store))
    assert 2 <= calls <= 20, f"{calls} requests in a second: no backing off"


class CallNeedingTheLoop:
    """A CNI service whose close() waits for a call in flight that, like a claim, runs its etcd
    request on the daemon's event loop."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop
        self.finished = False

    def close(self) -> None:
        async def etcd_request():
            await asyncio.sleep(0)
            return "answered"
        self.finished = asyncio.run_coroutine_threadsafe(etcd_request(), self.loop).result(10) == "answered"


def test_closing_the_cni_service_leaves_the_loop_free_for_calls_in_flight():
    daemon = daemon_with(None)

    async def scenario():
        daemon.cni = CallNeedingTheLoop(asyncio.get_running_loop())
        await daemon._close_cni_service()
        return daemon.cni.finished
    assert run(daemon, scenario())


class ClaimLosesItsFirstLease:
    """etcd in which the first claim's fresh lease expires before the claim lands."""

    def __init__(self):
        self.claims = 0

    async def list_leases(self):
        return [], 7

    async def claim_subnet(self, subnet, attrs, ttl):
        self.claims += 1
        if self.claims == 1:
            raise LeaseLost("etcdserver: requested lease not found")
        return Lease(subnet, attrs, lease_id=42, mod_revision=8)


def test_a_claim_whose_new_lease_expired_before_it_landed_is_made_again():
    store = ClaimLosesItsFirstLease()
    daemon = daemon_with(store)
    daemon.own = None
    daemon.config = parse_config('{"Network": "10.244.0.0/16", "Backend": {"Type": "vxlan"}}')
    daemon.settings = replace(daemon.settings, run_dir=Path("/nonexistent/ovl-test"))
    run(daemon, daemon._acquire_lease())
    assert store.claims == 2 and daemon.own.lease_id == 42 and daemon.revision == 7
