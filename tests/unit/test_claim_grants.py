"""Two-phase claims, the origin decides (overlay.claims `Grant`, overlay.moves.decide_claims,
overlay.claimhook's ClaimGranter and ClaimHook.await_grant). No kernel, no etcd: the pure
decision over allocation records, which claims are routed, the schema's new field, and the
daemon's two halves against a fake store (an in-memory claim key with etcd's compare rules)
and real allocation records in a temporary directory."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from dataclasses import replace
from ipaddress import IPv4Address, IPv4Network

import pytest

from cni.allocator import AllocationStore, AttachmentKey, PoolState, allocate, store_dir
from cni.errors import AddressUnavailable, PoolExhausted, ServiceUnavailable
from overlay import claimhook
from overlay.claimhook import ClaimFollower, ClaimGranter, ClaimHook
from overlay.claims import Claim, ClaimAttrs, Grant, parse_claim_value
from overlay.config import parse_config
from overlay.dataplane import Underlay, desired_state, vtep_mac
from overlay.errors import ClaimParseError, StoreError
from overlay.etcd import ClaimEvent
from overlay.lease import Lease, LeaseAttrs
from overlay.moves import decide_claims, initial_grant, moved_routes, origin_of, reserved_in
from tests.support.stores import CompactedAndUnreachable, HeldBackListing, requests_in_a_second

CONFIG = parse_config('{"Network": "10.244.0.0/16", "Backend": {"Type": "vxlan"}}')
UNDERLAY = Underlay("eth0", IPv4Address("198.18.0.11"), 1500, IPv4Network("198.18.0.0/24"))


def lease(subnet: str, public_ip: str, lease_id: int = 7) -> Lease:
    ip = IPv4Address(public_ip)
    return Lease(IPv4Network(subnet), LeaseAttrs(ip, 1, vtep_mac(ip, 1)), lease_id=lease_id, mod_revision=1)


OWN = lease("10.244.1.0/24", "198.18.0.11")        # the origin in most tests
PEER_A = lease("10.244.2.0/24", "198.18.0.12", 8)
PEER_B = lease("10.244.3.0/24", "198.18.0.13", 9)
LEASES = {PEER_A.subnet: PEER_A, PEER_B.subnet: PEER_B}


def claim(address: str, holder: Lease, grant: Grant = Grant.GRANTED, container: str = "c0ffee",
          revision: int = 5) -> Claim:
    attrs = ClaimAttrs(holder.attrs.public_ip, holder.attrs.vtep_mac, holder.subnet, container, grant)
    return Claim(IPv4Address(address), attrs, lease_id=holder.lease_id, mod_revision=revision)


def records(*addresses: str) -> PoolState:
    """Allocation records of OWN's pool with a container on each address."""
    state = PoolState()
    for n, address in enumerate(addresses):
        state, _, _ = allocate(state, AttachmentKey("net", f"local{n}", "eth0"), OWN.subnet,
                               OWN.subnet.network_address + 1, f"ovlv{n}", "/x", requested=IPv4Address(address))
    return state


# --- the schema's new field ----------------------------------------------------------------------

BASE = {"PublicIP": "198.18.0.12", "VtepMAC": "1a:c7:2f:de:68:06", "Subnet": "10.244.2.0/24", "ContainerID": "abc"}


def test_a_claim_without_grant_is_of_the_previous_version_and_in_force():
    assert parse_claim_value(json.dumps(BASE)).grant is Grant.GRANTED


@pytest.mark.parametrize("grant", list(Grant))
def test_every_decision_round_trips(grant):
    attrs = parse_claim_value(json.dumps({**BASE, "Grant": grant.value}))
    assert attrs.grant is grant and parse_claim_value(attrs.to_json()) == attrs


def test_a_refusal_carries_its_reason_and_nothing_else_does():
    pending = parse_claim_value(json.dumps({**BASE, "Grant": "Pending"}))
    refused = pending.decided(Grant.REFUSED, "allocated to container 4f1e eth0")
    assert json.loads(refused.to_json())["Reason"] == "allocated to container 4f1e eth0"
    assert parse_claim_value(refused.to_json()) == refused
    assert "Reason" not in json.loads(pending.decided(Grant.GRANTED, "ignored").to_json())
    assert parse_claim_value(json.dumps({**BASE, "Reason": "stray"})).reason == ""
    # The decision is the origin's; the attachment it decides on stays the claimant's.
    assert refused.same_attachment(pending) and not refused.same_attachment(replace(pending, container_id="x"))


@pytest.mark.parametrize("grant", ["granted", "Maybe", 1, None, ""])
def test_a_grant_we_do_not_know_is_refused(grant):
    with pytest.raises(ClaimParseError, match="Grant"):
        parse_claim_value(json.dumps({**BASE, "Grant": grant}))


def test_a_reason_that_is_not_text_is_refused():
    with pytest.raises(ClaimParseError, match="Reason"):
        parse_claim_value(json.dumps({**BASE, "Grant": "Refused", "Reason": 7}))


# --- which claims are routed -----------------------------------------------------------------------

def test_only_granted_claims_are_routed_so_a_pending_address_stays_with_its_origin():
    routes = desired_state(OWN, [PEER_A, PEER_B], CONFIG, UNDERLAY).routes
    out_of_b = [claim("10.244.3.5", PEER_A, grant) for grant in Grant]
    followed = moved_routes(routes, OWN, [PEER_A, PEER_B], out_of_b)
    assert [route.dst for route in followed] == [IPv4Network("10.244.3.5/32")]   # the granted one only
    # On the origin too: a pending claim on our own address adds no /32, the bridge keeps it.
    pending_here = claim("10.244.1.9", PEER_B, Grant.PENDING)
    assert moved_routes(routes, OWN, [PEER_A, PEER_B], [pending_here]) == frozenset()


def test_pending_claims_reserve_and_refused_ones_do_not():
    claims = [claim("10.244.1.9", PEER_A, Grant.PENDING), claim("10.244.1.10", PEER_A, Grant.REFUSED),
              claim("10.244.1.11", PEER_B)]
    assert reserved_in(OWN.subnet, claims) == {IPv4Address("10.244.1.9"), IPv4Address("10.244.1.11")}


# --- who decides ---------------------------------------------------------------------------------------

def test_the_origin_is_the_live_lease_of_the_addresss_subnet():
    assert origin_of(IPv4Address("10.244.3.5"), OWN, LEASES) is PEER_B
    assert origin_of(IPv4Address("10.244.1.5"), OWN, LEASES) is OWN
    assert origin_of(IPv4Address("10.244.77.5"), OWN, LEASES) is None


def test_a_claim_is_pending_only_when_a_live_origin_must_decide():
    assert initial_grant(IPv4Address("10.244.3.5"), OWN, LEASES) is Grant.PENDING
    assert initial_grant(IPv4Address("10.244.77.5"), OWN, LEASES) is Grant.GRANTED   # its host is gone
    assert initial_grant(IPv4Address("10.244.1.5"), OWN, LEASES) is Grant.GRANTED    # our own subnet


# --- the origin's decision (pure) -------------------------------------------------------------------------

def assert_never_handed_out(state: PoolState, address: IPv4Address) -> None:
    """ADDs on the origin until its pool is exhausted: none of them gets `address`."""
    for n in range(OWN.subnet.num_addresses):
        try:
            state, allocation, _ = allocate(state, AttachmentKey("net", f"n{n}", "eth0"), OWN.subnet,
                                            IPv4Address("10.244.1.1"), "ovlvx", "/x")
        except PoolExhausted:
            return
        assert allocation.address != address
    raise AssertionError(f"the pool of {OWN.subnet} never ran out")


def test_a_free_address_is_reserved_and_granted():
    pending = claim("10.244.1.9", PEER_A, Grant.PENDING)
    round_ = decide_claims(records("10.244.1.2"), OWN, [pending])
    assert [(d.claim, d.grant) for d in round_.decisions] == [(pending, Grant.GRANTED)]
    assert round_.state.reserved == {IPv4Address("10.244.1.9")}
    # Reserved, it is never handed out while the claim exists.
    assert_never_handed_out(round_.state, IPv4Address("10.244.1.9"))


def test_an_address_a_container_here_has_is_refused_naming_the_container():
    pending = claim("10.244.1.9", PEER_A, Grant.PENDING)
    state = records("10.244.1.9")
    round_ = decide_claims(state, OWN, [pending])
    [decision] = round_.decisions
    assert decision.grant is Grant.REFUSED and "container local0 eth0" in decision.reason
    assert round_.state == state   # nothing reserved


def test_claims_elsewhere_ours_and_refused_ones_are_not_ours_to_decide():
    state = records()
    claims = [claim("10.244.3.9", PEER_A, Grant.PENDING),   # B's address: B decides
              claim("10.244.2.9", OWN, Grant.PENDING),      # our own claim
              claim("10.244.1.8", PEER_A, Grant.REFUSED)]   # decided already
    round_ = decide_claims(state, OWN, claims)
    assert round_.decisions == () and round_.state.reserved == frozenset()


def test_granted_claims_keep_their_reservation_and_gone_claims_lose_it():
    state = decide_claims(records(), OWN, [claim("10.244.1.9", PEER_A, Grant.PENDING)]).state
    # Granted now (our write landed): still reserved, nothing to decide.
    granted = claim("10.244.1.9", PEER_A, Grant.GRANTED, revision=6)
    round_ = decide_claims(state, OWN, [granted])
    assert round_.decisions == () and round_.state.reserved == {IPv4Address("10.244.1.9")}
    # The claim is withdrawn (or expired with its claimant's lease): the reservation goes.
    assert decide_claims(round_.state, OWN, []).state.reserved == frozenset()


def test_after_a_restart_pending_claims_are_decided_and_granted_ones_reserved():
    # A granted claim made while we were gone (written granted: no origin lived) is reserved;
    # a pending one is decided, also when our grant was already reserved but never written.
    half_done = decide_claims(records(), OWN, [claim("10.244.1.20", PEER_B, Grant.PENDING)]).state
    claims = [claim("10.244.1.9", PEER_A, Grant.GRANTED), claim("10.244.1.20", PEER_B, Grant.PENDING)]
    round_ = decide_claims(half_done, OWN, claims)
    assert [(str(d.claim.address), d.grant) for d in round_.decisions] == [("10.244.1.20", Grant.GRANTED)]
    assert round_.state.reserved == {IPv4Address("10.244.1.9"), IPv4Address("10.244.1.20")}


def test_a_granted_claim_on_an_address_in_use_here_is_a_conflict_not_a_reservation():
    granted = claim("10.244.1.9", PEER_A, Grant.GRANTED)
    round_ = decide_claims(records("10.244.1.9"), OWN, [granted])
    assert round_.conflicts == (granted,) and round_.state.reserved == frozenset()


# --- the daemon's two halves against a fake etcd -----------------------------------------------------

class FakeStore:
    """One etcd keyspace of claims, with the compare rules of EtcdStore's transactions."""

    def __init__(self, follower: ClaimFollower | None = None):
        self.claims: dict[IPv4Address, Claim] = {}
        self.revision = 10
        self.follower = follower   # fed every change, as its watch would be

    def _put(self, claim: Claim | None, address: IPv4Address) -> None:
        self.revision += 1
        if claim is None:
            self.claims.pop(address, None)
        else:
            claim = replace(claim, mod_revision=self.revision)
            self.claims[address] = claim
        if self.follower is not None:
            self.follower.apply(ClaimEvent(address, claim, self.revision))

    async def claim_address(self, address, attrs, lease_id):
        held = self.claims.get(address)
        if held is not None:
            return held.lease_id == lease_id and held.attrs.same_attachment(attrs), held
        self._put(Claim(address, attrs, lease_id), address)
        return True, self.claims[address]

    async def get_claim(self, address):
        return self.claims.get(address)

    async def release_claim(self, address, attrs):
        held = self.claims.get(address)
        if held is None:
            return True
        if held.attrs != attrs:
            return False
        self._put(None, address)
        return True

    async def settle_claim(self, claim, attrs):
        held = self.claims.get(claim.address)
        if held is None or held.mod_revision != claim.mod_revision:
            return False
        self._put(None if attrs is None else Claim(claim.address, attrs, claim.lease_id), claim.address)
        return True


@pytest.fixture
def loop():
    """An event loop on a thread of its own, as the daemon's is to the CNI service's threads."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    try:
        yield loop
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()


def on(loop, coroutine):
    return asyncio.run_coroutine_threadsafe(coroutine, loop).result(10)


def test_the_origin_grants_a_free_address_and_the_claimant_proceeds(loop, tmp_path):
    follower = ClaimFollower(None, lambda: None)
    store = FakeStore(follower)
    granter = ClaimGranter(store, follower, tmp_path, lambda: OWN)
    hook = ClaimHook(loop, store, lambda: PEER_A, follower, leases=lambda: {OWN.subnet: OWN, PEER_B.subnet: PEER_B})
    made = hook.claim(IPv4Address("10.244.1.9"), "mover")
    assert made.attrs.grant is Grant.PENDING
    assert on(loop, granter.sync_once())
    hook.await_grant(made)   # returns: granted
    assert store.claims[IPv4Address("10.244.1.9")].attrs.grant is Grant.GRANTED
    assert store.claims[IPv4Address("10.244.1.9")].lease_id == PEER_A.lease_id
    recorded = AllocationStore(store_dir(tmp_path)).read()
    assert recorded.reserved == {IPv4Address("10.244.1.9")}
    # The origin's own ADDs never get it now, whatever the order.
    assert_never_handed_out(recorded, IPv4Address("10.244.1.9"))
    # DEL on the claimant withdraws it (a granted claim, by value); the reservation goes next round.
    hook.release(IPv4Address("10.244.1.9"), "mover")
    assert store.claims == {}
    assert on(loop, granter.sync_once())
    assert AllocationStore(store_dir(tmp_path)).read().reserved == frozenset()


def test_an_address_in_use_on_the_origin_is_refused_with_103_naming_the_origin(loop, tmp_path):
    follower = ClaimFollower(None, lambda: None)
    store = FakeStore(follower)
    AllocationStore(store_dir(tmp_path)).update(lambda state: (records("10.244.1.9"), None))
    granter = ClaimGranter(store, follower, tmp_path, lambda: OWN)
    hook = ClaimHook(loop, store, lambda: PEER_A, follower, leases=lambda: {OWN.subnet: OWN})
    made = hook.claim(IPv4Address("10.244.1.9"), "mover")
    assert on(loop, granter.sync_once())
    with pytest.raises(AddressUnavailable) as refused:
        hook.await_grant(made)
    assert "in use on origin host 198.18.0.11 (subnet 10.244.1.0/24)" in refused.value.msg
    assert "container local0 eth0" in refused.value.msg
    # The claimant withdraws the refused claim (by revision: its value is the origin's now).
    hook.release(IPv4Address("10.244.1.9"), "mover")
    assert store.claims == {}
    assert AllocationStore(store_dir(tmp_path)).read().reserved == frozenset()


def test_an_origin_that_does_not_answer_fails_the_add_with_11(loop, monkeypatch):
    monkeypatch.setattr(claimhook, "GRANT_TIMEOUT_S", 0.3)
    follower = ClaimFollower(None, lambda: None)
    store = FakeStore(follower)
    hook = ClaimHook(loop, store, lambda: PEER_A, follower, leases=lambda: {OWN.subnet: OWN})
    made = hook.claim(IPv4Address("10.244.1.9"), "mover")
    started = time.monotonic()
    with pytest.raises(ServiceUnavailable, match="origin host 198.18.0.11 .* did not answer .* is overlayd running"):
        hook.await_grant(made)
    assert time.monotonic() - started < 5   # the deadline, not the store's request budget


def test_a_claim_that_vanishes_while_pending_fails_the_add(loop):
    follower = ClaimFollower(None, lambda: None)
    store = FakeStore(follower)
    hook = ClaimHook(loop, store, lambda: PEER_A, follower, leases=lambda: {OWN.subnet: OWN})
    made = hook.claim(IPv4Address("10.244.1.9"), "mover")
    store._put(None, made.address)   # our lease expired, say
    with pytest.raises(ServiceUnavailable, match="vanished"):
        hook.await_grant(made)


def test_with_no_live_origin_the_claim_is_granted_at_once(loop):
    follower = ClaimFollower(None, lambda: None)
    store = FakeStore(follower)
    hook = ClaimHook(loop, store, lambda: PEER_A, follower, leases=lambda: {})
    made = hook.claim(IPv4Address("10.244.1.9"), "mover")
    assert made.granted
    hook.await_grant(made)


def test_a_repeated_add_finds_its_own_decided_claim(loop, tmp_path):
    follower = ClaimFollower(None, lambda: None)
    store = FakeStore(follower)
    granter = ClaimGranter(store, follower, tmp_path, lambda: OWN)
    hook = ClaimHook(loop, store, lambda: PEER_A, follower, leases=lambda: {OWN.subnet: OWN})
    first = hook.claim(IPv4Address("10.244.1.9"), "mover")
    assert on(loop, granter.sync_once())
    hook.await_grant(first)
    again = hook.claim(IPv4Address("10.244.1.9"), "mover")
    assert again.granted
    hook.await_grant(again)
    with pytest.raises(AddressUnavailable, match="claimed by host 198.18.0.12"):
        hook.claim(IPv4Address("10.244.1.9"), "another")


# --- a move home takes back a stale reservation (cni.service) ---------------------------------------

class FreshReads:
    """The ClaimHook's check_free as the CNI service sees it: a fresh read of the claim."""

    def __init__(self, claimed: bool, during=lambda: None):
        self.claimed, self.during, self.reads = claimed, during, 0

    def check_free(self, address):
        self.reads += 1
        self.during()
        if self.claimed:
            raise AddressUnavailable(f"{address} is claimed by host 198.18.0.12")


def _take_exactly(address):
    def take(state):
        state, allocation, new = allocate(state, AttachmentKey("net", "home", "eth0"), OWN.subnet,
                                          IPv4Address("10.244.1.1"), "ovlvhome", "/x", requested=address)
        return state, (allocation, new)
    return take


def test_a_move_home_takes_back_a_reservation_whose_claim_is_gone(tmp_path):
    pytest.importorskip("pyroute2")
    from cni.service import Attacher
    address = IPv4Address("10.244.1.9")
    records_ = AllocationStore(store_dir(tmp_path))
    records_.update(lambda state: (decide_claims(state, OWN, [claim("10.244.1.9", PEER_A, Grant.PENDING)]).state, None))
    # While the claim is read again, the records stay locked: a grant of a newer claim (here, a
    # second store reserving another address, as the daemon's granter does) waits for the ADD.
    granted_meanwhile = []

    def a_grant_in_another_thread():
        thread = threading.Thread(target=lambda: granted_meanwhile.append(AllocationStore(store_dir(tmp_path)).update(
            lambda state: (decide_claims(state, OWN, [claim("10.244.1.10", PEER_B, Grant.PENDING)]).state, True))))
        thread.start()
        thread.join(0.3)
        assert thread.is_alive() and not granted_meanwhile   # blocked on the records' lock
        a_grant_in_another_thread.thread = thread
    fresh = FreshReads(claimed=False, during=a_grant_in_another_thread)
    attacher = Attacher(tmp_path, claims=fresh)
    allocation, new = attacher._take_back(address, _take_exactly(address))
    a_grant_in_another_thread.thread.join(10)
    assert new and allocation.address == address and fresh.reads == 1
    state = records_.read()
    assert state.holder(address) is not None and address not in state.reserved
    assert granted_meanwhile == [True]
    # The granter's round ran after the ADD: the old reservation is not back (the claim is gone).
    assert state.reserved == {IPv4Address("10.244.1.10")}


def test_a_move_home_while_the_claim_still_holds_is_refused_and_changes_nothing(tmp_path):
    pytest.importorskip("pyroute2")
    from cni.service import Attacher
    address = IPv4Address("10.244.1.9")
    records_ = AllocationStore(store_dir(tmp_path))
    records_.update(lambda state: (decide_claims(state, OWN, [claim("10.244.1.9", PEER_A, Grant.GRANTED)]).state, None))
    before = records_.read()
    with pytest.raises(AddressUnavailable, match="claimed by host"):
        Attacher(tmp_path, claims=FreshReads(claimed=True))._take_back(address, _take_exactly(address))
    assert records_.read() == before


def test_the_granter_visits_the_records_only_when_claims_on_its_subnet_changed(loop, tmp_path):
    follower = ClaimFollower(None, lambda: None)
    store = FakeStore(follower)
    granter = ClaimGranter(store, follower, tmp_path, lambda: OWN)
    visits = []
    update = granter.records.update
    granter.records.update = lambda change: visits.append(1) or update(change)
    assert on(loop, granter.sync_once()) and len(visits) == 1     # first round: reservations unknown
    assert on(loop, granter.sync_once()) and len(visits) == 1     # none, and no claim on our subnet
    on(loop, store.claim_address(IPv4Address("10.244.3.7"), claim("10.244.3.7", PEER_A).attrs, PEER_A.lease_id))
    assert on(loop, granter.sync_once()) and len(visits) == 1     # another host's address: not ours to decide
    pending = claim("10.244.1.9", PEER_A, Grant.PENDING)
    on(loop, store.claim_address(pending.address, pending.attrs, PEER_A.lease_id))
    assert on(loop, granter.sync_once()) and len(visits) == 2     # pending on our subnet: decided
    assert store.claims[pending.address].granted
    assert on(loop, granter.sync_once()) and len(visits) == 3     # our own grant came back: one more look
    assert on(loop, granter.sync_once()) and len(visits) == 3     # and then nothing changed
    on(loop, store.release_claim(pending.address, pending.attrs.decided(Grant.GRANTED)))
    assert on(loop, granter.sync_once()) and len(visits) == 4     # withdrawn: the reservation goes
    assert AllocationStore(store_dir(tmp_path)).read().reserved == frozenset()
    assert on(loop, granter.sync_once()) and len(visits) == 4


def test_the_keeper_claims_again_pending_and_withdraws_decided_claims_nobody_wants(loop, tmp_path):
    from cni.allocator import record_claimed
    from overlay.claimhook import ClaimKeeper
    follower = ClaimFollower(None, lambda: None)
    store = FakeStore(follower)
    # A container here (PEER_A) has OWN's 10.244.1.9, but its claim is gone (our lease was lost).
    AllocationStore(store_dir(tmp_path)).update(lambda state: (record_claimed(
        state, AttachmentKey("net", "mover", "eth0"), IPv4Address("10.244.1.9"), "ovlvm", "/x")[0], None))
    keeper = ClaimKeeper(store, follower, tmp_path, lambda: PEER_A, lambda: {OWN.subnet: OWN})
    on(loop, keeper.sync_once())
    again = store.claims[IPv4Address("10.244.1.9")]
    assert again.attrs.grant is Grant.PENDING and again.attrs.container_id == "mover"   # its origin decides
    # A refused claim no record wants (an ADD whose withdrawal did not reach etcd) is withdrawn,
    # though its value is the origin's now.
    stale = claim("10.244.1.20", PEER_A, Grant.PENDING, container="gone")
    on(loop, store.claim_address(stale.address, stale.attrs, PEER_A.lease_id))
    on(loop, store.settle_claim(store.claims[stale.address], stale.attrs.decided(Grant.REFUSED, "in use")))
    on(loop, keeper.sync_once())
    assert set(store.claims) == {IPv4Address("10.244.1.9")}


def test_woken_tells_a_wake_up_from_the_interval_running_out_and_clears_the_event():
    async def body():
        wake = asyncio.Event()
        wake.set()
        woke = await claimhook.woken(wake, 60.0)       # set before: returns at once
        cleared = not wake.is_set()
        ran_out = await claimhook.woken(wake, 0.05)    # nobody sets it
        asyncio.get_running_loop().call_later(0.01, wake.set)
        woke_later = await claimhook.woken(wake, 60.0)
        return woke, cleared, ran_out, woke_later, wake.is_set()
    assert asyncio.run(asyncio.wait_for(body(), 30)) == (True, True, False, True, False)


def test_a_claims_listing_older_than_an_event_the_watch_applied_meanwhile_does_not_undo_it():
    granted = claim("10.244.1.9", PEER_A, revision=5)

    async def scenario():
        # Read at revision 4, before the origin's grant at revision 5; then a fresh listing.
        store = HeldBackListing(([], 4), ([granted], 5))
        follower = ClaimFollower(store, lambda: None)
        follower.revision = follower.listed_revision = 4
        relist = asyncio.create_task(follower.relist())
        await store.read.wait()
        follower.apply(ClaimEvent(granted.address, granted, 5))   # the watch: granted
        store.deliver.set()
        await relist
        return follower, store.calls
    follower, calls = asyncio.run(asyncio.wait_for(scenario(), 30))
    assert follower.claims == {granted.address: granted} and follower.revision == 5 and calls == 2


class RefusingStore:
    """etcd answering every request with an error that is not a lost connection."""

    def __init__(self):
        self.calls = 0

    async def list_claims(self):
        self.calls += 1
        raise StoreError("etcdserver: mvcc: database space exceeded")

    async def watch_claims(self, start_revision):
        self.calls += 1
        raise StoreError("etcdserver: permission denied")
        yield   # an async generator, as the store's


def test_the_claims_watch_outlives_errors_etcd_answers_with():
    store = RefusingStore()
    follower = ClaimFollower(store, lambda: None)

    async def scenario():
        watching = asyncio.create_task(follower.run())
        deadline = time.monotonic() + 20
        while store.calls < 4 and not watching.done() and time.monotonic() < deadline:
            await asyncio.sleep(0.05)   # poll interval
        alive = not watching.done()
        watching.cancel()
        await asyncio.gather(watching, return_exceptions=True)
        return alive
    assert asyncio.run(asyncio.wait_for(scenario(), 30)) and store.calls >= 4


def test_a_compacted_claims_watch_whose_relisting_fails_backs_off():
    store = CompactedAndUnreachable()
    follower = ClaimFollower(store, lambda: None)
    calls = asyncio.run(asyncio.wait_for(requests_in_a_second(follower.run, store), 30))
    assert 2 <= calls <= 20, f"{calls} requests in a second: no backing off"
