"""The daemon's side of address claims: following every claim (ClaimFollower), and the CNI
service's way into etcd to make and withdraw claims (ClaimHook).

ClaimFollower keeps the daemon's view of every claim as it keeps its view of the leases: a
listing, then a watch of `<prefix>/claims/` from the listing's revision + 1 on a stream of its
own, a re-listing after compaction or an interruption, and another every few minutes as a
safety net. Each change only calls `changed` (the daemon marks its state dirty); the reconcile
loop turns the view into /32 routes (overlay.moves) like everything else.

The CNI service (cni.service) runs on threads of its own in the daemon's process; etcd is
reached through the daemon's asyncio EtcdStore, on the daemon's event loop. ClaimHook carries a
call from a service thread onto that loop (`run_coroutine_threadsafe`) and waits for it, and
turns the store's domain errors into the CNI errors the runtime sees:

- a claim held by another host (or another container) -> AddressUnavailable (103), naming it;
- etcd unreachable, or our lease being re-acquired -> ServiceUnavailable (11, try again later).

Claims are bound to the etcd lease of this host's subnet key and carry its subnet, public IP
and VTEP MAC (overlay.claims): what peers need to route the address here. The daemon's own view
of every claim (kept current by its watch) answers `reserved()` without a round trip; `claim`,
`check_free` and `release` always go to etcd, which alone decides who holds an address.
"""

from __future__ import annotations

import asyncio
import logging
import random
from ipaddress import IPv4Address, IPv4Network
from typing import Callable, Mapping

from cni.errors import AddressUnavailable, ServiceUnavailable, StateFailure

from .claims import Claim, ClaimAttrs
from .errors import LeaseLost, StoreError, StoreUnavailable, WatchCompacted
from .etcd import ClaimEvent, EtcdStore
from .lease import Lease
from .moves import is_own_claim

log = logging.getLogger("overlayd.claims")

CALL_TIMEOUT_S = 15.0   # above the store's own request budget (5 s): it gives up first


class ClaimHook:
    def __init__(self, loop: asyncio.AbstractEventLoop, store: EtcdStore, own: Callable[[], Lease | None],
                 claims: Callable[[], Mapping[IPv4Address, Claim]], changed: Callable[[], None] = lambda: None):
        self._loop = loop
        self._store = store
        self._own = own          # our lease, or None while it is being (re-)acquired
        self._claims = claims    # the daemon's view of every claim, by address
        self._changed = changed  # called on the loop after we claimed or withdrew something

    def reserved(self, pool: IPv4Network) -> frozenset[IPv4Address]:
        own = self._own()
        return frozenset(address for address, claim in self._claims().items()
                         if address in pool and (own is None or not is_own_claim(claim, own)))

    def check_free(self, address: IPv4Address) -> None:
        claim = self._call(self._store.get_claim(address), f"read the claim on {address}")
        own = self._own()
        if claim is not None and (own is None or not is_own_claim(claim, own)):
            raise AddressUnavailable(f"{claim.describe()}: it is free again once that container is deleted "
                                     "there (CNI DEL) or that host's lease expires")

    def claim(self, address: IPv4Address, container_id: str) -> None:
        own = self._lease()
        won, holder = self._call(self._store.claim_address(address, self._attrs(own, container_id), own.lease_id),
                                 f"claim {address}")
        if not won:
            who = holder.describe() if holder is not None else f"{address} is claimed by another host"
            raise AddressUnavailable(f"{who}: it is free again once that container is deleted there (CNI DEL) "
                                     "or that host's lease expires")
        log.info("claimed %s for container %s", address, container_id[:12])
        self._loop.call_soon_threadsafe(self._changed)

    def release(self, address: IPv4Address, container_id: str) -> None:
        own = self._lease()
        if self._call(self._store.release_claim(address, self._attrs(own, container_id)), f"withdraw the claim on {address}"):
            log.info("withdrew the claim on %s (container %s)", address, container_id[:12])
        else:
            log.info("the claim on %s is no longer ours (container %s): left alone", address, container_id[:12])
        self._loop.call_soon_threadsafe(self._changed)

    def _lease(self) -> Lease:
        own = self._own()
        if own is None:
            raise ServiceUnavailable("the overlay daemon is re-acquiring its lease; try again later")
        return own

    @staticmethod
    def _attrs(own: Lease, container_id: str) -> ClaimAttrs:
        return ClaimAttrs(own.attrs.public_ip, own.attrs.vtep_mac, own.subnet, container_id)

    def _call(self, coroutine, what: str):
        future = asyncio.run_coroutine_threadsafe(coroutine, self._loop)
        try:
            return future.result(CALL_TIMEOUT_S)
        except (StoreUnavailable, LeaseLost, TimeoutError) as exc:
            future.cancel()
            raise ServiceUnavailable(f"could not {what} in etcd ({exc or 'timed out'}); try again later") from None
        except StoreError as exc:
            raise StateFailure(f"could not {what} in etcd: {exc}") from None


class ClaimFollower:
    """Every address claim in etcd, by address, kept current; `changed()` after each change."""

    relist_interval = 300.0

    def __init__(self, store: EtcdStore, changed: Callable[[], None]):
        self.store = store
        self.changed = changed
        self.claims: dict[IPv4Address, Claim] = {}
        self.revision = 0           # etcd revision the view reflects
        self.listed_revision = 0    # of the last listing: older events are stale

    async def relist(self) -> None:
        claims, revision = await self.store.list_claims()
        fresh = {claim.address: claim for claim in claims}
        if fresh != self.claims:
            self.claims = fresh
            self.changed()
        self.revision = max(self.revision, revision)
        self.listed_revision = revision

    async def run(self) -> None:
        """Watch forever (a task of the daemon's); the first listing must be done."""
        pause = 0.2
        while True:
            try:
                async for event in self.store.watch_claims(self.revision + 1):
                    pause = 0.2
                    self.apply(event)
            except WatchCompacted:
                log.warning("claims watch from revision %d compacted: re-listing the claims", self.revision + 1)
                await self._relist_quietly()
            except StoreUnavailable as exc:
                log.warning("etcd watch of the claims interrupted: %s; resuming from revision %d", exc,
                            self.revision + 1)
                await asyncio.sleep(pause * random.uniform(0.8, 1.2))
                pause = min(5.0, pause * 2)
                await self._relist_quietly()

    async def relist_now_and_then(self) -> None:
        while True:
            await asyncio.sleep(self.relist_interval * random.uniform(0.8, 1.0))
            await self._relist_quietly()

    def apply(self, event: ClaimEvent) -> None:
        if event.revision <= self.listed_revision:
            return  # already reflected by a listing taken after it
        self.revision = max(self.revision, event.revision)
        # Copy on write: the CNI service's threads read `claims` while this runs on the loop.
        if event.claim is None:
            if event.address in self.claims:
                self.claims = {a: c for a, c in self.claims.items() if a != event.address}
                log.info("address %s: claim withdrawn", event.address)
                self.changed()
        elif self.claims.get(event.address) != event.claim:
            self.claims = {**self.claims, event.address: event.claim}
            log.info("address %s: claimed by %s (subnet %s)", event.address, event.claim.attrs.public_ip,
                     event.claim.attrs.subnet)
            self.changed()

    async def _relist_quietly(self) -> None:
        try:
            await self.relist()
        except StoreUnavailable:
            pass


class ClaimKeeper:
    """Keeps this host's own claims equal to the moved-in attachments the CNI service recorded.

    Level-triggered, like the kernel side: wanted = every `claimed` allocation in the CNI store
    of our run dir; held = every claim in the follower's view that names us (our public IP and
    subnet). A wanted address not held is claimed (again): our lease was lost and re-acquired
    (its claims went with the old etcd lease), or someone deleted the key by hand. A held claim
    nobody wants is withdrawn: a DEL whose withdrawal did not reach etcd. It runs when the
    claims change, when the CNI service claimed or withdrew something, and every `interval`.
    A wanted address another host holds is reported once and left alone: etcd decides.
    """

    interval = 10.0

    def __init__(self, store: EtcdStore, follower: ClaimFollower, run_dir, own: Callable[[], Lease | None]):
        self.store = store
        self.follower = follower
        self.run_dir = run_dir
        self.own = own
        self.wake = asyncio.Event()
        self._reported: set[IPv4Address] = set()

    async def run(self) -> None:
        while True:
            try:
                await asyncio.wait_for(self.wake.wait(), self.interval * random.uniform(0.8, 1.0))
            except asyncio.TimeoutError:
                pass
            self.wake.clear()
            try:
                await self.sync_once()
            except StoreUnavailable as exc:
                log.warning("could not bring this host's claims in line: %s", exc)

    async def sync_once(self) -> None:
        own = self.own()
        if own is None:
            return
        wanted = await asyncio.get_running_loop().run_in_executor(None, self._recorded)
        if wanted is None:
            return   # the records cannot be read: never withdraw on a guess
        self._reported &= set(wanted)
        held = {address: claim for address, claim in self.follower.claims.items() if is_own_claim(claim, own)}
        for address, container_id in wanted.items():
            claim = held.get(address)
            if claim is not None and claim.attrs.container_id == container_id:
                continue
            attrs = ClaimAttrs(own.attrs.public_ip, own.attrs.vtep_mac, own.subnet, container_id)
            try:
                won, holder = await self.store.claim_address(address, attrs, own.lease_id)
            except LeaseLost:
                return   # our lease is going; the daemon re-acquires it and we come back
            if won:
                log.info("claimed %s again for container %s (its claim was missing)", address, container_id[:12])
                self._reported.discard(address)
            elif address not in self._reported:
                self._reported.add(address)
                log.error("container %s here has %s, but %s: its traffic goes there", container_id[:12], address,
                          holder.describe() if holder else "another host claims it")
        for address, claim in held.items():
            if address not in wanted:
                if await self.store.release_claim(address, claim.attrs):
                    log.info("withdrew the claim on %s: no container here has it any more", address)

    def _recorded(self) -> dict[IPv4Address, str] | None:
        from cni.allocator import AllocationStore, store_dir
        try:
            state = AllocationStore(store_dir(self.run_dir)).read()
        except Exception as exc:   # StateFailure and anything else: the records are not usable
            log.warning("cannot read the CNI records to check this host's claims: %s", exc)
            return None
        return {a.address: a.key.container_id for a in state.allocations if a.claimed}
