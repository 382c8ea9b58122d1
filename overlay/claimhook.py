"""The daemon's side of address claims: following every claim (ClaimFollower), deciding the
claims on addresses of our own subnet (ClaimGranter), keeping our own claims (ClaimKeeper), and
the CNI service's way into etcd to make and withdraw claims (ClaimHook).

ClaimFollower keeps the daemon's view of every claim as it keeps its view of the leases: a
listing, then a watch of `<prefix>/claims/` from the listing's revision + 1 on a stream of its
own, a re-listing after compaction or an interruption, and another every few minutes as a
safety net. Each change only calls `changed` (the daemon marks its state dirty); the reconcile
loop turns the view into /32 routes (overlay.moves) like everything else. It also wakes the CNI
service's threads that wait for an origin's decision (`wait_change`).

The CNI service (cni.service) runs on threads of its own in the daemon's process; etcd is
reached through the daemon's asyncio EtcdStore, on the daemon's event loop. ClaimHook carries a
call from a service thread onto that loop (`run_coroutine_threadsafe`) and waits for it, and
turns the store's domain errors into the CNI errors the runtime sees:

- a claim held by another host (or another container) -> AddressUnavailable (103), naming it;
- a claim the origin host refused (the address is in use there) -> AddressUnavailable (103),
  naming the origin and what has the address;
- an origin that does not decide within GRANT_TIMEOUT_S -> ServiceUnavailable (11);
- etcd unreachable, or our lease being re-acquired -> ServiceUnavailable (11, try again later).

Two phases (overlay.claims): `claim` writes the claim Pending when a live host holds the
subnet of the address (its origin), Granted when none does; `await_grant` then waits for the
origin's decision, woken by the follower's watch (no polling of etcd: the decision arrives on
the stream the daemon has open anyway; one fresh read a second is the safety net for a stalled
watch). The ADD thus costs one etcd round trip (the claim) plus the origin's reaction: its watch
event, one allocator update, one etcd transaction, our watch event.

ClaimGranter is the origin's half: woken on every claims change, it runs overlay.moves.
decide_claims under the allocator's lock (an AllocationStore of the CNI records of our run dir;
the file lock orders it with every ADD of the CNI service) and writes each decision on the claim
key with a compare on the revision it decided on. Level-triggered: on the first listing after
a restart it decides whatever is pending, and a reservation whose claim is gone (withdrawn, or
expired with its claimant's lease) is dropped in the next round.

Claims are bound to the etcd lease of this host's subnet key and carry its subnet, public IP
and VTEP MAC (overlay.claims): what peers need to route the address here. The daemon's own view
of every claim (kept current by its watch) answers `reserved()` without a round trip; `claim`,
`check_free` and `release` always go to etcd, which alone decides who holds an address.
"""

from __future__ import annotations

import asyncio
import logging
import random
import threading
import time
from ipaddress import IPv4Address, IPv4Network
from typing import Callable, Mapping

from cni.allocator import AllocationStore, store_dir
from cni.errors import AddressUnavailable, ServiceUnavailable, StateFailure

from .claims import Claim, ClaimAttrs, Grant
from .errors import LeaseLost, StoreError, StoreUnavailable, WatchCompacted
from .etcd import ClaimEvent, EtcdStore, listing_not_older
from .lease import Lease
from .moves import Decision, decide_claims, initial_grant, is_own_claim, origin_of, reserved_in

log = logging.getLogger("overlayd.claims")

CALL_TIMEOUT_S = 15.0   # above the store's own request budget (5 s): it gives up first
GRANT_TIMEOUT_S = 5.0   # how long an ADD waits for the origin's decision
GRANT_REREAD_S = 1.0    # a fresh read of the claim this often while waiting (a stalled watch)
_WITHDRAW_ATTEMPTS = 3


async def woken(wake: asyncio.Event, interval: float) -> bool:
    """Wait for `wake` or for `interval` (less up to a fifth, so hosts drift apart), then clear
    it: True when woken, False when the interval ran out."""
    try:
        await asyncio.wait_for(wake.wait(), interval * random.uniform(0.8, 1.0))
        woke = True
    except asyncio.TimeoutError:
        woke = False
    wake.clear()
    return woke


class ClaimHook:
    def __init__(self, loop: asyncio.AbstractEventLoop, store: EtcdStore, own: Callable[[], Lease | None],
                 follower: "ClaimFollower", changed: Callable[[], None] = lambda: None, *,
                 leases: Callable[[], Mapping[IPv4Network, Lease]]):
        self._loop = loop
        self._store = store
        self._own = own            # our lease, or None while it is being (re-)acquired
        self._follower = follower  # the daemon's view of every claim, by address
        self._changed = changed    # called on the loop after we claimed or withdrew something
        self._leases = leases      # the peers' leases by subnet: who is the origin of an address

    def reserved(self, pool: IPv4Network) -> frozenset[IPv4Address]:
        own = self._own()
        return reserved_in(pool, (claim for claim in self._follower.claims.values()
                                  if own is None or not is_own_claim(claim, own)))

    def check_free(self, address: IPv4Address) -> None:
        claim = self._call(self._store.get_claim(address), f"read the claim on {address}")
        own = self._own()
        # A refused claim never takes effect (its claimant withdraws it): it does not hold the address.
        if (claim is not None and claim.attrs.grant is not Grant.REFUSED
                and (own is None or not is_own_claim(claim, own))):
            raise AddressUnavailable(f"{claim.describe()}: it is free again once that container is deleted "
                                     "there (CNI DEL) or that host's lease expires")

    def claim(self, address: IPv4Address, container_id: str) -> Claim:
        """Write our claim (Pending when a live origin must decide, else Granted); the claim as
        etcd holds it. AddressUnavailable naming the holder when another claim holds it."""
        own = self._lease()
        grant = initial_grant(address, own, self._leases())
        attrs = self._attrs(own, container_id, grant)
        won, holder = self._call(self._store.claim_address(address, attrs, own.lease_id), f"claim {address}")
        if not won:
            who = holder.describe() if holder is not None else f"{address} is claimed by another host"
            raise AddressUnavailable(f"{who}: it is free again once that container is deleted there (CNI DEL) "
                                     "or that host's lease expires")
        log.info("claimed %s for container %s (%s)", address, container_id[:12], holder.attrs.grant.value.lower())
        self._loop.call_soon_threadsafe(self._changed)
        return holder

    def await_grant(self, claim: Claim) -> None:
        """Return once the origin granted `claim`; AddressUnavailable when it refused,
        ServiceUnavailable when it did not answer in time or the claim vanished. The caller
        withdraws the claim (after undoing its records: see cni.service)."""
        address = claim.address
        origin = origin_of(address, self._lease(), self._leases())
        where = (f"origin host {origin.attrs.public_ip} (subnet {origin.subnet})" if origin is not None
                 else "its origin host")
        started = time.monotonic()
        deadline = started + GRANT_TIMEOUT_S
        reread_at = started + GRANT_REREAD_S
        version = self._follower.version   # before looking: a change after the look wakes us
        seen = claim
        outcome = self._decided(claim, seen, True)   # decided already: written granted, or a repeated ADD
        if outcome is None:
            seen, current = self._in_view(claim)
            outcome = self._decided(claim, seen, current)
        while outcome is None:
            now = time.monotonic()
            if now >= min(deadline, reread_at):
                seen = self._call(self._store.get_claim(address), f"read the claim on {address}")
                reread_at = now + GRANT_REREAD_S
                outcome = self._decided(claim, seen, True)
                if outcome is not None:
                    break
                if now >= deadline:
                    raise ServiceUnavailable(f"{where} did not answer the claim on {address} within "
                                             f"{GRANT_TIMEOUT_S:.0f} s; is overlayd running there?")
            version = self._follower.wait_change(version, max(0.0, min(deadline, reread_at) - time.monotonic()))
            seen, current = self._in_view(claim)
            outcome = self._decided(claim, seen, current)
        if outcome is Grant.REFUSED:
            raise AddressUnavailable(f"{address} is in use on {where}: {seen.attrs.reason or 'it refused the claim'}; "
                                     "it can move here once it is deleted there (CNI DEL)")
        if outcome == "gone":
            raise ServiceUnavailable(f"the claim on {address} vanished while {where} was deciding on it "
                                     "(withdrawn, or our etcd lease was lost); try again later")
        if seen is not claim:
            log.info("%s granted the claim on %s in %.1f ms", where, address, (time.monotonic() - started) * 1e3)

    def _in_view(self, ours: Claim) -> tuple[Claim | None, bool]:
        """The follower's claim on the address, and whether the view is at least as new as ours.
        The revision first: the follower sets it after the claims (see ClaimFollower.apply)."""
        current = self._follower.revision >= ours.mod_revision
        return self._follower.claims.get(ours.address), current

    @staticmethod
    def _decided(ours: Claim, seen: Claim | None, current: bool):
        """Grant.GRANTED / Grant.REFUSED when the origin decided on our claim; "gone" when it is
        no longer there (`current`: the view is at least as new as our claim); else None."""
        if seen is not None and seen.lease_id == ours.lease_id and seen.attrs.same_attachment(ours.attrs):
            return None if seen.attrs.grant is Grant.PENDING else seen.attrs.grant
        return "gone" if current else None

    def release(self, address: IPv4Address, container_id: str) -> None:
        """Withdraw our claim on `address` for `container_id`, whatever the origin decided on it."""
        own = self._lease()
        done = self._call(self._withdraw(address, self._attrs(own, container_id, Grant.GRANTED)),
                          f"withdraw the claim on {address}")
        if done:
            log.info("withdrew the claim on %s (container %s)", address, container_id[:12])
        else:
            log.info("the claim on %s is no longer ours (container %s): left alone", address, container_id[:12])
        self._loop.call_soon_threadsafe(self._changed)

    async def _withdraw(self, address: IPv4Address, granted: ClaimAttrs) -> bool:
        # Usually the claim is granted, and one compare on its value does it (as version 1 did).
        if await self._store.release_claim(address, granted):
            return True
        for _ in range(_WITHDRAW_ATTEMPTS):
            claim = await self._store.get_claim(address)
            if claim is None:
                return True
            if not claim.attrs.same_attachment(granted):
                return False   # another host's or container's claim: not ours to delete
            if await self._store.settle_claim(claim, None):
                return True
        return False

    def _lease(self) -> Lease:
        own = self._own()
        if own is None:
            raise ServiceUnavailable("the overlay daemon is re-acquiring its lease; try again later")
        return own

    @staticmethod
    def _attrs(own: Lease, container_id: str, grant: Grant) -> ClaimAttrs:
        return ClaimAttrs(own.attrs.public_ip, own.attrs.vtep_mac, own.subnet, container_id, grant)

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
        # For the CNI service's threads waiting on a decision: bumped (and waiters woken) each
        # time the view or its revision moves.
        self.version = 0
        self._moved = threading.Condition()

    def wait_change(self, version: int, timeout: float) -> int:
        """Block (a service thread, never the loop) until the view moved past `version` or the
        timeout passed; the current version."""
        with self._moved:
            self._moved.wait_for(lambda: self.version != version, timeout)
            return self.version

    def _moved_on(self) -> None:
        with self._moved:
            self.version += 1
            self._moved.notify_all()

    async def relist(self) -> None:
        # Not older than what the watch applied meanwhile (the timer's re-list runs beside it).
        claims, revision = await listing_not_older(self.store.list_claims, lambda: self.revision)
        fresh = {claim.address: claim for claim in claims}
        changed = fresh != self.claims
        if changed:
            self.claims = fresh
        self.revision = max(self.revision, revision)
        self.listed_revision = revision
        self._moved_on()
        if changed:
            self.changed()

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
                if not await self._relist_quietly():   # else the same revision is compacted again at once
                    await asyncio.sleep(pause * random.uniform(0.8, 1.2))
                    pause = min(5.0, pause * 2)
            except (StoreUnavailable, StoreError) as exc:
                # StoreError: etcd refused the watch itself (say, permissions): retry, say why,
                # as the lease watch does; no reason to end the daemon.
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
        # Copy on write: the CNI service's threads read `claims` while this runs on the loop, and
        # `revision` only after `claims`: a reader that sees the new revision and then reads
        # `claims` sees this event applied (ClaimHook._in_view).
        changed = False
        if event.claim is None:
            if event.address in self.claims:
                self.claims = {a: c for a, c in self.claims.items() if a != event.address}
                log.info("address %s: claim withdrawn", event.address)
                changed = True
        elif self.claims.get(event.address) != event.claim:
            self.claims = {**self.claims, event.address: event.claim}
            log.info("address %s: claimed by %s (subnet %s), %s", event.address, event.claim.attrs.public_ip,
                     event.claim.attrs.subnet, event.claim.attrs.grant.value.lower())
            changed = True
        self.revision = max(self.revision, event.revision)
        self._moved_on()   # also when only the revision moved: a waiter may now tell "gone" from "not seen yet"
        if changed:
            self.changed()

    async def _relist_quietly(self) -> bool:
        """Whether the claims could be listed."""
        try:
            await self.relist()
            return True
        except StoreUnavailable:
            return False   # the watch's own retry says so
        except StoreError as exc:
            log.warning("re-listing the claims failed: %s; the watch will try again", exc)
            return False


class ClaimGranter:
    """The origin's decisions on claims of addresses of our subnet (see the design note).

    Runs when the claims change and every `interval`; a round that could not write a decision
    (etcd unreachable) is retried a second later. Reading the records costs a file read under
    the allocator's lock, so a round with no claim on our subnet and no reservation to drop
    does nothing at all.
    """

    interval = 10.0
    retry_after = 1.0

    def __init__(self, store: EtcdStore, follower: ClaimFollower, run_dir, own: Callable[[], Lease | None]):
        self.store = store
        self.follower = follower
        self.records = AllocationStore(store_dir(run_dir))
        self.own = own
        self.wake = asyncio.Event()
        self._reservations: frozenset[IPv4Address] | None = None   # as of our last round; None: unknown
        self._decided_on: frozenset | None = None   # the claims on our subnet our last complete round saw
        self._reported: set[tuple[IPv4Address, int]] = set()

    async def run(self) -> None:
        while True:
            if not await woken(self.wake, self.interval):
                self._reservations = self._decided_on = None   # the safety net reads the records again
            try:
                complete = await self.sync_once()
            except (StoreUnavailable, StoreError, StateFailure) as exc:
                log.warning("could not decide on the claims of this host's addresses: %s", exc)
                complete = False
            if not complete:
                asyncio.get_running_loop().call_later(self.retry_after * random.uniform(0.8, 1.2), self.wake.set)

    async def sync_once(self) -> bool:
        """One round; False when something is left to retry."""
        own = self.own()
        if own is None:
            return True
        claims = list(self.follower.claims.values())
        ours = [c for c in claims if c.address in own.subnet and not is_own_claim(c, own)]
        seen = frozenset((c.address, c.mod_revision) for c in ours)
        if (not ours and self._reservations == frozenset()) or seen == self._decided_on:
            return True   # nothing of ours changed since a complete round: the records need no visit
        self._decided_on = None
        round_ = await asyncio.get_running_loop().run_in_executor(
            None, self.records.update, lambda state: self._round(state, own, claims))
        self._reservations = round_.state.reserved
        for claim in round_.conflicts:
            if (claim.address, claim.mod_revision) not in self._reported:
                self._reported.add((claim.address, claim.mod_revision))
                log.warning("%s, but a container here has it too (granted while this host was away, or a "
                            "move home that our watch has not seen withdrawn yet)", claim.describe())
        outcomes = await asyncio.gather(*(self._write(decision) for decision in round_.decisions),
                                        return_exceptions=True)
        complete = True
        for decision, outcome in zip(round_.decisions, outcomes):
            if isinstance(outcome, BaseException):
                log.warning("could not write the decision on %s: %s", decision.claim.address, outcome)
                complete = False
        if complete:
            self._decided_on = seen
        return complete

    @staticmethod
    def _round(state, own: Lease, claims):
        round_ = decide_claims(state, own, claims)
        return round_.state, round_

    async def _write(self, decision: Decision) -> None:
        claim = decision.claim
        try:
            written = await self.store.settle_claim(claim, claim.attrs.decided(decision.grant, decision.reason))
        except LeaseLost:
            written = False   # the claimant's lease is gone, and its claim with it
        if written:
            log.info("%s the claim of host %s on %s (container %s)%s", decision.grant.value.lower(),
                     claim.attrs.public_ip, claim.address, claim.attrs.container_id[:12],
                     f": {decision.reason}" if decision.reason else "")
        else:
            log.info("the claim on %s changed before our decision landed: deciding again on what it is now",
                     claim.address)


class ClaimKeeper:
    """Keeps this host's own claims equal to the moved-in attachments the CNI service recorded.

    Level-triggered, like the kernel side: wanted = every `claimed` allocation in the CNI store
    of our run dir; held = every claim in the follower's view that names us (our public IP and
    subnet). A wanted address not held is claimed (again): our lease was lost and re-acquired
    (its claims went with the old etcd lease), or someone deleted the key by hand; the claim is
    made as the CNI service makes it (Pending when a live origin must decide: meanwhile the
    origin may have given the address to a container of its own). A held claim nobody wants is
    withdrawn: a DEL whose withdrawal did not reach etcd, or a refused or unanswered ADD whose
    withdrawal did not. It runs when the claims change, when the CNI service claimed or withdrew
    something, and every `interval`. A wanted address another host holds, or that its origin
    refused, is reported once and left alone: etcd and the origin decide.
    """

    interval = 10.0

    def __init__(self, store: EtcdStore, follower: ClaimFollower, run_dir, own: Callable[[], Lease | None],
                 leases: Callable[[], Mapping[IPv4Network, Lease]]):
        self.store = store
        self.follower = follower
        self.run_dir = run_dir
        self.own = own
        self.leases = leases
        self.wake = asyncio.Event()
        self._reported: set[IPv4Address] = set()

    async def run(self) -> None:
        while True:
            await woken(self.wake, self.interval)
            try:
                await self.sync_once()
            except (StoreUnavailable, StoreError) as exc:
                # StoreError too (etcd out of space refuses writes): the next round tries again.
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
                if claim.attrs.grant is Grant.REFUSED and address not in self._reported:
                    self._reported.add(address)
                    log.error("container %s here has %s, but its origin host refused our claim: %s",
                              container_id[:12], address, claim.attrs.reason or "in use there")
                continue
            grant = initial_grant(address, own, self.leases())
            attrs = ClaimAttrs(own.attrs.public_ip, own.attrs.vtep_mac, own.subnet, container_id, grant)
            try:
                won, holder = await self.store.claim_address(address, attrs, own.lease_id)
            except LeaseLost:
                return   # our lease is going; the daemon re-acquires it and we come back
            if won:
                log.info("claimed %s again for container %s (its claim was missing; %s)", address,
                         container_id[:12], grant.value.lower())
                self._reported.discard(address)
            elif address not in self._reported:
                self._reported.add(address)
                log.error("container %s here has %s, but %s: its traffic goes there", container_id[:12], address,
                          holder.describe() if holder else "another host claims it")
        for address, claim in held.items():
            if address not in wanted:
                # By revision, not by value: the origin rewrites the value with its decision.
                if await self.store.settle_claim(claim, None):
                    log.info("withdrew the claim on %s: no container here has it any more", address)

    def _recorded(self) -> dict[IPv4Address, str] | None:
        try:
            state = AllocationStore(store_dir(self.run_dir)).read()
        except Exception as exc:   # StateFailure and anything else: the records are not usable
            log.warning("cannot read the CNI records to check this host's claims: %s", exc)
            return None
        return {a.address: a.key.container_id for a in state.allocations if a.claimed}
