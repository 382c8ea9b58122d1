"""EtcdStore against real etcd members on loopback (started and stopped by the fixtures).

What etcd holds is checked with etcdctl, an independent client. Faults are real: members are
SIGKILLed or SIGSTOPped. Waits poll with generous deadlines; nothing sleeps to wait.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import signal
import time
from ipaddress import IPv4Address, IPv4Network

import pytest

import overlay.etcd
from overlay.errors import LeaseLost, StoreUnavailable, WatchCompacted
from overlay.etcd import EtcdSettings, EtcdStore, LeaseEvent
from overlay.etcd_server import stop_cluster
from overlay.lease import DEFAULT_PREFIX, LeaseAttrs, parse_lease_value
from tests.support.etcd import (client_urls, etcd_pki, etcd_tls, etcdctl, lease_ids, leader_index,  # noqa: F401
                                raw_get)

PREFIX = DEFAULT_PREFIX
SUBNETS = f"{PREFIX}/subnets"


def run(coroutine, timeout: float = 30.0):
    """Run one test body in a fresh loop, failing (not hanging) after timeout."""
    return asyncio.run(asyncio.wait_for(coroutine, timeout))


def attrs(host: int, vni: int = 1) -> LeaseAttrs:
    return LeaseAttrs(IPv4Address(f"198.18.0.{host}"), vni, f"c6:d2:00:00:00:{host:02x}")


def settings(urls: str, **changes) -> EtcdSettings:
    return dataclasses.replace(EtcdSettings.from_flags(urls, PREFIX), **changes)


async def poll(predicate, timeout: float, what: str, interval: float = 0.05) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        await asyncio.sleep(interval)  # poll interval, not a wait for a condition


class Recorder:
    """Consumes watch_leases the way the daemon does: on StoreUnavailable it resumes from the
    last revision it saw + 1, so the events recorded are what a daemon would have applied."""

    def __init__(self, store: EtcdStore, start_revision: int):
        self.store = store
        self.next_revision = start_revision
        self.events: list[LeaseEvent] = []
        self.resumes = 0
        self.task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        while True:
            try:
                async for event in self.store.watch_leases(self.next_revision):
                    self.events.append(event)
                    self.next_revision = event.revision + 1
            except StoreUnavailable:
                self.resumes += 1

    def seen(self, revision: int) -> bool:
        if self.task.done():
            self.task.result()  # surface the watch's failure instead of timing out
        return bool(self.events) and self.events[-1].revision >= revision

    async def stop(self) -> None:
        self.task.cancel()
        await asyncio.gather(self.task, return_exceptions=True)


# -------------------------------------------------------------------- one member


def test_config_round_trip_also_by_host_name(etcd):
    async def body():
        store = EtcdStore(settings(etcd))
        by_name = EtcdStore(settings(etcd.replace("127.0.0.1", "localhost")))
        try:
            assert await store.get_config() is None
            config = b'{"Network":"10.244.0.0/16","Backend":{"Type":"vxlan"}}'
            await store.put_config(config)
            assert await store.get_config() == config
            assert await by_name.get_config() == config
        finally:
            await store.close()
            await by_name.close()
    run(body())
    assert raw_get(etcd, f"{PREFIX}/config")["value"] == '{"Network":"10.244.0.0/16","Backend":{"Type":"vxlan"}}'


def test_claim_and_list_in_flannels_format(etcd):
    # What a flanneld on another host would have written; and what a foreign writer might.
    foreign = ('{"PublicIP":"198.18.0.9","PublicIPv6":null,"BackendType":"vxlan",'
               '"BackendData":{"VNI":1,"VtepMAC":"aa:bb:cc:dd:ee:09"},"Extra":1}')
    etcdctl(etcd, "put", f"{SUBNETS}/10.244.9.0-24", foreign)
    etcdctl(etcd, "put", f"{SUBNETS}/not-a-subnet", foreign)
    etcdctl(etcd, "put", f"{SUBNETS}/10.244.8.0-24", '{"BackendType":"host-gw"}')

    async def body():
        store = EtcdStore(settings(etcd))
        try:
            claimed = await store.claim_subnet(IPv4Network("10.244.3.0/24"), attrs(3), ttl=600)
            assert claimed is not None and claimed.lease_id > 0 and claimed.mod_revision > 0
            leases, revision = await store.list_leases()
            ttl = await store.time_to_live(claimed.lease_id)
            return claimed, leases, revision, ttl
        finally:
            await store.close()
    claimed, leases, revision, ttl = run(body())

    raw = raw_get(etcd, f"{SUBNETS}/10.244.3.0-24")
    assert raw["value"] == ('{"PublicIP":"198.18.0.3","PublicIPv6":null,"BackendType":"vxlan",'
                            '"BackendData":{"VNI":1,"VtepMAC":"c6:d2:00:00:00:03"}}')
    assert raw["lease"] == claimed.lease_id and raw["mod_revision"] == claimed.mod_revision
    assert 590 <= ttl <= 600
    by_subnet = {lease.subnet: lease for lease in leases}
    assert set(by_subnet) == {IPv4Network("10.244.3.0/24"), IPv4Network("10.244.9.0/24")}  # bad keys skipped
    assert by_subnet[claimed.subnet] == claimed
    assert by_subnet[IPv4Network("10.244.9.0/24")].attrs == parse_lease_value(foreign)
    assert by_subnet[IPv4Network("10.244.9.0/24")].lease_id == 0
    assert revision >= claimed.mod_revision


def test_list_reads_pages_at_one_revision(etcd, monkeypatch):
    monkeypatch.setattr(overlay.etcd, "LIST_PAGE_SIZE", 3)

    async def body():
        store = EtcdStore(settings(etcd))
        try:
            for host in range(10):
                assert await store.create_if_absent(f"{SUBNETS}/10.244.{host}.0-24", attrs(host).to_json(), 0)
            leases, revision = await store.list_leases()
            assert sorted(lease.subnet for lease in leases) == [IPv4Network(f"10.244.{host}.0/24") for host in range(10)]
            assert max(lease.mod_revision for lease in leases) == revision
        finally:
            await store.close()
    run(body())


def test_twenty_concurrent_claims_have_one_winner_and_leave_no_lease_behind(etcd):
    subnet = IPv4Network("10.244.7.0/24")

    async def body():
        stores = [EtcdStore(settings(etcd)) for _ in range(20)]   # twenty hosts racing
        try:
            return await asyncio.gather(*(store.claim_subnet(subnet, attrs(host), ttl=600)
                                          for host, store in enumerate(stores, start=1)))
        finally:
            await asyncio.gather(*(store.close() for store in stores))
    results = run(body())
    winners = [lease for lease in results if lease is not None]
    assert len(winners) == 1
    assert raw_get(etcd, f"{SUBNETS}/10.244.7.0-24")["lease"] == winners[0].lease_id
    assert lease_ids(etcd) == {winners[0].lease_id}   # every loser revoked what it granted


def test_update_create_delete_and_lost_leases(etcd):
    async def body():
        store = EtcdStore(settings(etcd))
        try:
            subnet = IPv4Network("10.244.4.0/24")
            lease = await store.claim_subnet(subnet, attrs(4), ttl=600)
            updated = await store.update_lease_attrs(lease, attrs(4, vni=2))
            assert updated.lease_id == lease.lease_id and updated.mod_revision > lease.mod_revision
            assert raw_get(etcd, f"{SUBNETS}/10.244.4.0-24")["lease"] == lease.lease_id
            with pytest.raises(LeaseLost):               # written since `lease` was read
                await store.update_lease_attrs(lease, attrs(4, vni=3))
            (listed,), _ = await store.list_leases()
            assert listed == updated

            claim_key = f"{PREFIX}/claims/10.244.4.5"     # the shape of a later per-workload claim
            assert await store.create_if_absent(claim_key, "container-a", lease.lease_id)
            assert not await store.create_if_absent(claim_key, "container-b", lease.lease_id)
            assert raw_get(etcd, claim_key)["value"] == "container-a"
            await store.delete_key(claim_key)
            await store.delete_key(claim_key)            # already gone: still fine
            assert raw_get(etcd, claim_key) is None
            with pytest.raises(ValueError):
                await store.create_if_absent("/elsewhere/key", "x", 0)

            await store.delete_lease(subnet)
            leases, _ = await store.list_leases()
            assert leases == []
            with pytest.raises(LeaseLost):               # the key is gone
                await store.update_lease_attrs(updated, attrs(4))
            etcdctl(etcd, "lease", "revoke", f"{lease.lease_id:x}")
            with pytest.raises(LeaseLost):               # the etcd lease is gone
                await store.create_if_absent(claim_key, "container-c", lease.lease_id)
            assert await store.time_to_live(lease.lease_id) == -1
            assert await store.keepalive(lease.lease_id) <= 0
        finally:
            await store.close()
    run(body())


def test_keepalive_extends_a_lease_and_its_expiry_is_a_delete_event(etcd):
    async def body():
        store = EtcdStore(settings(etcd))
        watcher = EtcdStore(settings(etcd))
        try:
            lease = await store.claim_subnet(IPv4Network("10.244.5.0/24"), attrs(5), ttl=2)
            recorder = Recorder(watcher, lease.mod_revision)
            await poll(lambda: recorder.seen(lease.mod_revision), 10, "the watch to see the claim")
            # Renew past twice the TTL: the lease must still be alive at the end.
            renewed_until = time.monotonic() + 4.5
            while time.monotonic() < renewed_until:
                assert await store.keepalive(lease.lease_id) == 2
                await asyncio.sleep(0.5)  # the renewal cadence, not a wait for a condition
            assert await store.time_to_live(lease.lease_id) > 0
            assert [event.lease for event in recorder.events] == [lease]
            # Stop renewing: etcd expires the lease and the watch reports the key gone.
            await poll(lambda: len(recorder.events) == 2, 15, "the expiry to reach the watch")
            gone = recorder.events[1]
            assert gone.subnet == lease.subnet and gone.lease is None and gone.revision > lease.mod_revision
            assert await store.time_to_live(lease.lease_id) == -1
            assert await store.keepalive(lease.lease_id) <= 0
            await recorder.stop()
        finally:
            await store.close()
            await watcher.close()
    run(body(), timeout=40)


def test_watch_from_a_compacted_revision_raises_and_a_relist_recovers(etcd):
    async def body():
        store = EtcdStore(settings(etcd))
        try:
            first = await store.claim_subnet(IPv4Network("10.244.1.0/24"), attrs(1), ttl=600)
            await store.update_lease_attrs(first, attrs(1, vni=2))
            await store.claim_subnet(IPv4Network("10.244.2.0/24"), attrs(2), ttl=600)
            _, revision = await store.list_leases()
            etcdctl(etcd, "compact", str(revision))
            with pytest.raises(WatchCompacted) as caught:
                async for _ in store.watch_leases(first.mod_revision):
                    pass
            assert caught.value.compact_revision == revision
            leases, relisted_at = await store.list_leases()
            assert len(leases) == 2
            recorder = Recorder(store, relisted_at + 1)
            third = await store.claim_subnet(IPv4Network("10.244.3.0/24"), attrs(3), ttl=600)
            await poll(lambda: recorder.seen(third.mod_revision), 10, "the watch after the re-list")
            assert [event.lease for event in recorder.events] == [third]
            await recorder.stop()
        finally:
            await store.close()
    run(body())


def test_mutual_tls(etcd_tls):
    url, pki = etcd_tls

    async def body():
        good = EtcdStore(EtcdSettings.from_flags(url, PREFIX, pki.ca_cert, pki.client_cert, pki.client_key))
        # CA only: the server refuses a client without a certificate. A short budget: it will not change its mind.
        anonymous = EtcdStore(dataclasses.replace(EtcdSettings.from_flags(url, PREFIX, pki.ca_cert), request_timeout=1.5))
        try:
            lease = await good.claim_subnet(IPv4Network("10.244.6.0/24"), attrs(6), ttl=600)
            recorder = Recorder(good, lease.mod_revision)
            await poll(lambda: recorder.seen(lease.mod_revision), 10, "the watch over TLS")
            await recorder.stop()
            with pytest.raises(StoreUnavailable) as caught:
                await anonymous.get_config()
            return str(caught.value)
        finally:
            await good.close()
            await anonymous.close()
    message = run(body())
    assert url in message and "TLS refused" in message and "--etcd-certfile" in message
    assert raw_get(url, f"{SUBNETS}/10.244.6.0-24", tls=pki) is not None


# -------------------------------------------------------------------- three members, with faults


def test_requests_fail_over_when_the_leader_dies(etcd3):
    urls = client_urls(etcd3)
    leader = leader_index(etcd3)
    budget = 5.0

    async def body():
        store = EtcdStore(settings(urls, request_timeout=budget), start_at=leader)  # on the leader
        try:
            lease = await store.claim_subnet(IPv4Network("10.244.10.0/24"), attrs(10), ttl=600)
            timings: list[tuple[float, float]] = []   # (started, took) per round of requests
            killed_at = None
            index = 0
            # Rounds go on for 3 s after the kill; a fast machine runs hundreds of them, so the
            # subnets span two octets and the count is capped.
            while killed_at is None or (time.monotonic() < killed_at + 3.0 and index < 2000):
                if killed_at is None and index == 5:
                    killed_at = time.monotonic()
                    etcd3[leader].kill()
                started = time.monotonic()
                value = f'{{"round":{index}}}'.encode()
                await store.put_config(value)
                assert await store.get_config() == value
                assert await store.keepalive(lease.lease_id) > 0
                claimed = await store.claim_subnet(IPv4Network(f"10.{100 + index // 250}.{index % 250}.0/24"), attrs(20), ttl=600)
                assert claimed is not None
                timings.append((started, time.monotonic() - started))
                index += 1
            leases, _ = await store.list_leases()
            assert len(leases) == 1 + index
            return timings, killed_at, store.endpoint
        finally:
            await store.close()
    timings, killed_at, endpoint = run(body(), timeout=40)
    assert endpoint != etcd3[leader].member.client_url
    assert sum(1 for started, _ in timings if started > killed_at) >= 2, "requests kept flowing after the kill"
    # Timing is reported, not asserted (a noisy machine): a round is four requests, each with a
    # budget of its own; the round that met the dead leader shows what the failover cost.
    print(f"slowest round of four requests: {max(took for _, took in timings):.2f} s (budget per request {budget} s)")


def test_watch_loses_nothing_when_its_member_dies(etcd3):
    urls = client_urls(etcd3)
    leader = leader_index(etcd3)
    writes = 40

    async def body():
        watcher = EtcdStore(settings(urls), start_at=leader)         # watching on the leader
        writer = EtcdStore(settings(urls), start_at=leader + 1)
        try:
            _, start = await writer.list_leases()
            recorder = Recorder(watcher, start + 1)
            written = []
            for index in range(writes):
                if index == 10:
                    await poll(lambda: len(recorder.events) >= 5, 10, "the watch to deliver")
                    etcd3[leader].kill()
                lease = await writer.claim_subnet(IPv4Network(f"10.244.{index}.0/24"), attrs(index % 250 + 1), ttl=600)
                written.append(lease)
                if index % 3 == 0:   # updates too: the same key more than once
                    lease = await writer.update_lease_attrs(lease, attrs(index % 250 + 1, vni=7))
                    written.append(lease)
            await poll(lambda: recorder.seen(written[-1].mod_revision), 20, "the watch to catch up")
            await recorder.stop()
            return written, recorder.events, watcher.endpoint
        finally:
            await watcher.close()
            await writer.close()
    written, events, endpoint = run(body(), timeout=50)
    assert endpoint != etcd3[leader].member.client_url
    assert [(event.subnet, event.revision) for event in events] == [(lease.subnet, lease.mod_revision) for lease in written]
    assert [event.lease for event in events] == written


def test_watch_leaves_a_frozen_member_within_seconds(etcd3):
    """A member that stops answering without closing its connections (SIGSTOP, as a hung host
    or a black-holed network would) is noticed by the progress requests; requests fail over."""
    urls = client_urls(etcd3)
    frozen = (leader_index(etcd3) + 1) % 3   # a follower: the rest keep a leader

    async def body():
        watcher = EtcdStore(settings(urls), start_at=frozen)
        writer = EtcdStore(settings(urls), start_at=frozen)
        try:
            _, start = await writer.list_leases()
            recorder = Recorder(watcher, start + 1)
            before = await writer.claim_subnet(IPv4Network("10.244.30.0/24"), attrs(30), ttl=600)
            await poll(lambda: recorder.seen(before.mod_revision), 10, "the watch to deliver")
            os.kill(etcd3[frozen].pid, signal.SIGSTOP)
            try:
                started = time.monotonic()
                after = await writer.claim_subnet(IPv4Network("10.244.31.0/24"), attrs(31), ttl=600)
                took_write = time.monotonic() - started
                await poll(lambda: recorder.seen(after.mod_revision), 15, "the watch to leave the frozen member")
                took_watch = time.monotonic() - started
            finally:
                os.kill(etcd3[frozen].pid, signal.SIGCONT)
            await recorder.stop()
            return [before, after], recorder.events, took_write, took_watch, watcher.endpoint, writer.endpoint
        finally:
            await watcher.close()
            await writer.close()
    written, events, took_write, took_watch, watching, writing = run(body(), timeout=40)
    assert [event.lease for event in events] == written
    frozen_url = etcd3[frozen].member.client_url
    assert watching != frozen_url and writing != frozen_url, "both stores left the frozen member"
    # Reported, not asserted: a noisy machine decides the figures, the deadlines above the outcome.
    print(f"write while frozen {took_write:.2f} s (request budget {EtcdSettings.request_timeout} s); "
          f"watch caught up {took_watch:.2f} s (progress check {EtcdStore.stale_after} s)")


def test_watch_resumes_after_the_whole_cluster_restarts(etcd3):
    """Every member stopped, then all started again on their data (an etcd-wide outage). The
    watch gives up while nothing answers (StoreUnavailable, as the daemon sees it), and the watch
    resumed afterwards from the last revision seen + 1 delivers, in order and without a re-list,
    what changed once etcd was back: a delete (an operator removing a lost host's lease) and a
    lease's expiry. (No member keeps time while all are down: etcd restores the leases with their
    whole TTL when a new leader is elected, so an unrenewed lease expires a TTL after that.)"""
    urls = client_urls(etcd3)
    members = [process.member for process in etcd3]
    ttl = 3

    async def body():
        watcher = EtcdStore(settings(urls))
        writer = EtcdStore(settings(urls))
        try:
            _, start = await writer.list_leases()
            recorder = Recorder(watcher, start + 1)
            removed = await writer.claim_subnet(IPv4Network("10.244.40.0/24"), attrs(40), ttl=600)
            expiring = await writer.claim_subnet(IPv4Network("10.244.41.0/24"), attrs(41), ttl=ttl)
            await poll(lambda: recorder.seen(expiring.mod_revision), 10, "the watch to deliver")
            assert await writer.keepalive(expiring.lease_id) > 0
            await asyncio.to_thread(stop_cluster, etcd3)
            await poll(lambda: recorder.resumes >= 1, 30, "the watch to give up while etcd is down")
            for process in etcd3:
                process.start(members)
            deadline = time.monotonic() + 60
            for process in etcd3:
                await asyncio.to_thread(process.wait_healthy, deadline)
            await writer.delete_lease(removed.subnet)
            added = await writer.claim_subnet(IPv4Network("10.244.42.0/24"), attrs(42), ttl=600)
            await poll(lambda: recorder.seen(added.mod_revision), 30, "the watch to resume")
            await poll(lambda: any(event.subnet == expiring.subnet and event.lease is None
                                   for event in recorder.events), 60, "the unrenewed lease's expiry")
            await recorder.stop()
            return [removed, expiring, added], recorder.events, recorder.resumes
        finally:
            await watcher.close()
            await writer.close()
    (removed, expiring, added), events, resumes = run(body(), timeout=150)
    print(f"whole cluster restarted: the watch gave up {resumes} time(s) during the outage and resumed")
    assert [(event.subnet, event.lease) for event in events if event.subnet != expiring.subnet] == \
        [(removed.subnet, removed), (removed.subnet, None), (added.subnet, added)]
    assert [(event.subnet, event.lease) for event in events if event.subnet == expiring.subnet] == \
        [(expiring.subnet, expiring), (expiring.subnet, None)]
    assert [event.revision for event in events] == sorted({event.revision for event in events})
