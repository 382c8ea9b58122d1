"""Address claims in a real etcd: create-if-absent bound to the claimant's lease (exactly one of
two racing hosts wins), withdrawal that only ever deletes our own value, the origin's decision
written on the claim only if it is still the claim decided on (and still bound to the claimant's
lease), a claim of the previous version (no Grant) read as granted, listing and a watch that
sees claims come, go and expire with their lease. etcd's own client checks what it holds."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import time
from ipaddress import IPv4Address, IPv4Network

from overlay.claims import ClaimAttrs, Grant, claim_key
from overlay.etcd import EtcdSettings, EtcdStore
from overlay.lease import DEFAULT_PREFIX, LeaseAttrs
from tests.support.etcd import etcdctl, raw_get

PREFIX = DEFAULT_PREFIX
ADDRESS = IPv4Address("10.244.3.7")


def run(coroutine, timeout: float = 30.0):
    return asyncio.run(asyncio.wait_for(coroutine, timeout))


def store(urls: str) -> EtcdStore:
    return EtcdStore(dataclasses.replace(EtcdSettings.from_flags(urls, PREFIX)))


def host_attrs(host: int, container: str = "c1") -> ClaimAttrs:
    return ClaimAttrs(IPv4Address(f"198.18.0.{host}"), f"c6:d2:00:00:00:{host:02x}",
                      IPv4Network(f"10.244.{host}.0/24"), container)


async def host_lease(db: EtcdStore, host: int, ttl: int = 60):
    lease = await db.claim_subnet(IPv4Network(f"10.244.{host}.0/24"),
                                  LeaseAttrs(IPv4Address(f"198.18.0.{host}"), 1, f"c6:d2:00:00:00:{host:02x}"), ttl)
    assert lease is not None
    return lease


def test_claim_is_created_once_bound_to_the_lease_and_read_back(etcd):
    async def body():
        db = store(etcd)
        try:
            lease = await host_lease(db, 12)
            won, claim = await db.claim_address(ADDRESS, host_attrs(12), lease.lease_id)
            assert won and claim.attrs == host_attrs(12) and claim.lease_id == lease.lease_id
            # A repeated claim of the same container on the same lease is ours already.
            again, same = await db.claim_address(ADDRESS, host_attrs(12), lease.lease_id)
            assert again and same.attrs == host_attrs(12)
            assert (await db.get_claim(ADDRESS)).attrs == host_attrs(12)
            claims, revision = await db.list_claims()
            assert [c.address for c in claims] == [ADDRESS] and revision > 0
            # Another container of the same host does not get it either: one claim, one workload.
            other, holder = await db.claim_address(ADDRESS, host_attrs(12, "c2"), lease.lease_id)
            assert not other and holder.attrs.container_id == "c1"
        finally:
            await db.close()
    run(body())
    kv = raw_get(etcd, claim_key(PREFIX, ADDRESS))
    assert json.loads(kv["value"]) == {"PublicIP": "198.18.0.12", "VtepMAC": "c6:d2:00:00:00:0c",
                                       "Subnet": "10.244.12.0/24", "ContainerID": "c1", "Grant": "Granted"}
    assert int(kv["lease"]) != 0


def test_two_hosts_racing_for_an_address_exactly_one_wins(etcd):
    async def body():
        hosts = [store(etcd) for _ in range(8)]
        try:
            leases = [await host_lease(db, 20 + i) for i, db in enumerate(hosts)]
            outcomes = await asyncio.gather(*(db.claim_address(ADDRESS, host_attrs(20 + i), lease.lease_id)
                                              for i, (db, lease) in enumerate(zip(hosts, leases))))
            winners = [i for i, (won, _) in enumerate(outcomes) if won]
            assert len(winners) == 1
            winner = host_attrs(20 + winners[0])
            # Every loser learns who holds it, in the same transaction.
            assert all(holder.attrs == winner for won, holder in outcomes if not won)
        finally:
            for db in hosts:
                await db.close()
    run(body())


def test_release_deletes_only_our_own_claim(etcd):
    async def body():
        db = store(etcd)
        try:
            lease_a, lease_b = await host_lease(db, 31), await host_lease(db, 32)
            assert (await db.claim_address(ADDRESS, host_attrs(31), lease_a.lease_id))[0]
            # A stale DEL on another host (or for another container) leaves the claim alone.
            assert not await db.release_claim(ADDRESS, host_attrs(32))
            assert not await db.release_claim(ADDRESS, host_attrs(31, "other"))
            assert (await db.get_claim(ADDRESS)).attrs == host_attrs(31)
            assert await db.release_claim(ADDRESS, host_attrs(31))
            assert await db.get_claim(ADDRESS) is None
            assert await db.release_claim(ADDRESS, host_attrs(31))      # idempotent
            # Now the other host may take it.
            assert (await db.claim_address(ADDRESS, host_attrs(32), lease_b.lease_id))[0]
        finally:
            await db.close()
    run(body())


def test_watch_sees_claims_made_withdrawn_and_expired_with_the_lease(etcd):
    async def body():
        db, watcher = store(etcd), store(etcd)
        events = []

        async def follow(start):
            async for event in watcher.watch_claims(start):
                events.append(event)
        try:
            _, revision = await watcher.list_claims()
            task = asyncio.create_task(follow(revision + 1))
            short = await host_lease(db, 41, ttl=2)
            other = IPv4Address("10.244.3.8")
            assert (await db.claim_address(ADDRESS, host_attrs(41), short.lease_id))[0]
            assert (await db.claim_address(other, host_attrs(41, "c2"), short.lease_id))[0]
            assert await db.release_claim(other, host_attrs(41, "c2"))
            # A foreign key under the prefix is skipped, not fatal.
            etcdctl(etcd, "put", f"{PREFIX}/claims/not-an-address", "x")
            deadline = time.monotonic() + 15
            # The lease is not renewed: the remaining claim goes with it (etcd expires it in ~2 s).
            while len(events) < 4:
                assert time.monotonic() < deadline, f"events so far: {events}"
                await asyncio.sleep(0.05)   # poll interval
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            assert [(e.address, e.claim is not None) for e in events] == [
                (ADDRESS, True), (other, True), (other, False), (ADDRESS, False)]
            assert events[0].claim.attrs == host_attrs(41)
            assert [e.revision for e in events] == sorted(e.revision for e in events)
        finally:
            await db.close()
            await watcher.close()
    run(body())


def test_decision_lands_only_on_the_claim_it_was_made_for_and_keeps_the_claimants_lease(etcd):
    async def body():
        db = store(etcd)
        try:
            claimant, origin = await host_lease(db, 51, ttl=3), await host_lease(db, 52)
            pending = dataclasses.replace(host_attrs(51), grant=Grant.PENDING)
            won, claim = await db.claim_address(ADDRESS, pending, claimant.lease_id)
            assert won and claim.attrs.grant is Grant.PENDING
            # The origin grants what it saw; a second decision on the same (now stale) revision fails.
            assert await db.settle_claim(claim, claim.attrs.decided(Grant.GRANTED))
            assert not await db.settle_claim(claim, claim.attrs.decided(Grant.REFUSED, "in use"))
            granted = await db.get_claim(ADDRESS)
            assert granted.attrs.grant is Grant.GRANTED and granted.lease_id == claimant.lease_id
            assert granted.attrs.same_attachment(pending)
            # Our own withdrawal of a granted claim works on its value as before (one round trip).
            assert await db.release_claim(ADDRESS, pending.decided(Grant.GRANTED))
            # A refused one is withdrawn by revision.
            won, claim = await db.claim_address(ADDRESS, pending, claimant.lease_id)
            assert await db.settle_claim(claim, claim.attrs.decided(Grant.REFUSED, "allocated to container c9 eth0"))
            refused = await db.get_claim(ADDRESS)
            assert refused.attrs.grant is Grant.REFUSED and refused.attrs.reason == "allocated to container c9 eth0"
            assert await db.settle_claim(refused, None)
            assert await db.get_claim(ADDRESS) is None
            # The granted claim still dies with the claimant's lease (not renewed: expires in ~3 s).
            won, claim = await db.claim_address(ADDRESS, pending, claimant.lease_id)
            assert await db.settle_claim(claim, claim.attrs.decided(Grant.GRANTED))
            deadline = time.monotonic() + 15
            while await db.get_claim(ADDRESS) is not None:
                assert time.monotonic() < deadline, "the granted claim outlived the claimant's lease"
                await asyncio.sleep(0.1)   # poll interval
            assert origin.lease_id != claimant.lease_id
        finally:
            await db.close()
    run(body())


def test_claim_written_by_the_previous_version_reads_as_granted(etcd):
    old = {"PublicIP": "198.18.0.61", "VtepMAC": "c6:d2:00:00:00:3d", "Subnet": "10.244.61.0/24",
           "ContainerID": "c1"}
    etcdctl(etcd, "put", claim_key(PREFIX, ADDRESS), json.dumps(old))

    async def body():
        db = store(etcd)
        try:
            claim = await db.get_claim(ADDRESS)
            assert claim.granted and claim.attrs.public_ip == IPv4Address("198.18.0.61")
        finally:
            await db.close()
    run(body())
