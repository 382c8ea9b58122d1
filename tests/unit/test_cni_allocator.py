"""IP allocation: pure pool logic and the locked file store (no root)."""

import multiprocessing
import os
import stat
import threading
from concurrent.futures import ProcessPoolExecutor
from ipaddress import IPv4Address, IPv4Network

import pytest

from cni.allocator import (AllocationStore, AttachmentKey, PoolState, ReservedForClaim, allocate, decode_state,
                           encode_state, record_claimed, release, release_unlisted, reserve, store_dir, unreserve,
                           usable_addresses)
from cni.errors import AddressUnavailable, PoolExhausted, StateFailure

SUBNET = IPv4Network("10.244.3.0/24")
GATEWAY = IPv4Address("10.244.3.1")


def key(n, network="net", ifname="eth0"):
    return AttachmentKey(network, f"c{n}", ifname)


def take(state, k, subnet=SUBNET, gateway=GATEWAY):
    return allocate(state, k, subnet, gateway, f"ovlv{k.container_id}", f"/run/netns/{k.container_id}")


def test_pool_excludes_network_gateway_broadcast():
    pool = usable_addresses(SUBNET, GATEWAY)
    assert len(pool) == 253 and pool[0] == IPv4Address("10.244.3.2") and pool[-1] == IPv4Address("10.244.3.254")


def test_distinct_addresses_and_same_address_on_repeat():
    state = PoolState()
    seen = set()
    for n in range(20):
        state, allocation, new = take(state, key(n))
        assert new and allocation.address not in seen
        seen.add(allocation.address)
    again_state, again, new = take(state, key(7))
    assert not new and again == state.find(key(7)) and again_state == state


def test_same_container_other_ifname_or_network_gets_its_own_address():
    state, a, _ = take(PoolState(), key(1))
    state, b, _ = take(state, key(1, ifname="net1"))
    state, c, _ = take(state, key(1, network="other"))
    assert len({a.address, b.address, c.address}) == 3


def test_round_robin_does_not_reuse_a_released_address_at_once():
    state, first, _ = take(PoolState(), key(1))
    state, _ = release(state, key(1))
    state, second, _ = take(state, key(2))
    assert second.address != first.address


def test_exhaustion_is_a_clear_error_and_wraps_around():
    subnet, gateway = IPv4Network("10.9.0.0/29"), IPv4Address("10.9.0.1")
    state = PoolState()
    for n in range(5):
        state, _, _ = take(state, key(n), subnet, gateway)
    with pytest.raises(PoolExhausted, match="10.9.0.0/29"):
        take(state, key(99), subnet, gateway)
    state, freed = release(state, key(2))
    state, reused, _ = take(state, key(99), subnet, gateway)
    assert reused.address == freed.address


def test_release_is_idempotent():
    state, _, _ = take(PoolState(), key(1))
    state, released = release(state, key(1))
    assert released is not None and release(state, key(1)) == (state, None)


def test_release_unlisted_touches_only_its_network():
    state = PoolState()
    for k in (key(1), key(2), key(3), key(4, network="other")):
        state, _, _ = take(state, k)
    state, released = release_unlisted(state, "net", frozenset({("c1", "eth0")}))
    assert {a.key for a in released} == {key(2), key(3)}
    assert {a.key for a in state.allocations} == {key(1), key(4, network="other")}


def test_serialisation_round_trip_and_corruption():
    state = PoolState()
    for n in range(3):
        state, _, _ = take(state, key(n))
    assert decode_state(encode_state(state)) == PoolState(tuple(sorted(state.allocations, key=lambda a: a.address)),
                                                          state.last)
    for text in ("{", '{"format": 2}', '{"format": 1, "allocations": [{"network": "n"}]}'):
        with pytest.raises(StateFailure):
            decode_state(text)


def test_store_persists_with_tight_permissions(tmp_path):
    store = AllocationStore(store_dir(tmp_path))
    with store.transaction() as txn:
        state, allocation, _ = take(txn.state, key(1))
        txn.commit(state)
    assert AllocationStore(store_dir(tmp_path)).lookup(key(1)) == allocation
    assert stat.S_IMODE(os.stat(store_dir(tmp_path)).st_mode) == 0o700
    for name in os.listdir(store_dir(tmp_path)):
        assert stat.S_IMODE(os.stat(store_dir(tmp_path) / name).st_mode) == 0o600


def test_store_without_commit_changes_nothing(tmp_path):
    store = AllocationStore(tmp_path / "s")
    with store.transaction() as txn:
        take(txn.state, key(1))
    assert store.lookup(key(1)) is None


def _allocate_many(directory, prefix, count):
    store = AllocationStore(directory)
    addresses = []
    for n in range(count):
        with store.transaction() as txn:
            state, allocation, _ = take(txn.state, AttachmentKey("net", f"{prefix}-{n}", "eth0"))
            txn.commit(state)
        addresses.append(str(allocation.address))
    return addresses


def test_concurrent_threads_and_processes_never_share_an_address(tmp_path):
    directory = tmp_path / "ipam"
    results = []
    threads = [threading.Thread(target=lambda p=p: results.extend(_allocate_many(directory, f"t{p}", 10)))
               for p in range(4)]
    for thread in threads:
        thread.start()
    # spawn, not fork: a forked child would inherit a thread's open lock file description and
    # with it the flock (exec would drop it, thanks to O_CLOEXEC, but multiprocessing never execs).
    with ProcessPoolExecutor(4, mp_context=multiprocessing.get_context("spawn")) as pool:
        for addresses in pool.map(_allocate_many, [directory] * 4, [f"p{p}" for p in range(4)], [10] * 4):
            results.extend(addresses)
    for thread in threads:
        thread.join()
    assert len(results) == 80 and len(set(results)) == 80
    assert len(AllocationStore(directory).read().allocations) == 80


# --- requested addresses, reserved (claimed elsewhere) addresses, claimed records -------------

MY_SUBNET = IPv4Network("10.244.1.0/24")
MY_GATEWAY = IPv4Address("10.244.1.1")

def test_requested_address_is_allocated_exactly_and_does_not_move_the_round_robin():
    state, first, _ = take(PoolState(), key("a"), MY_SUBNET, MY_GATEWAY)
    state, wanted, new = allocate(state, key("b"), MY_SUBNET, MY_GATEWAY, "ovlvb", "/run/netns/b",
                                  requested=IPv4Address("10.244.1.77"))
    assert new and wanted.address == IPv4Address("10.244.1.77") and state.last == first.address
    # A repeat of the same ADD gets the same answer; another container cannot have it.
    assert allocate(state, key("b"), MY_SUBNET, MY_GATEWAY, "ovlvb", "/run/netns/b",
                    requested=IPv4Address("10.244.1.77"))[1] == wanted
    with pytest.raises(AddressUnavailable, match="already allocated to container cb"):
        allocate(state, key("c"), MY_SUBNET, MY_GATEWAY, "ovlvc", "/run/netns/c", requested=IPv4Address("10.244.1.77"))


@pytest.mark.parametrize("address", ["10.244.1.0", "10.244.1.1", "10.244.1.255", "10.244.2.5"])
def test_requested_address_must_be_a_container_address_of_the_pool(address):
    with pytest.raises(AddressUnavailable, match="not a container address"):
        allocate(PoolState(), key("a"), MY_SUBNET, MY_GATEWAY, "ovlva", "/x", requested=IPv4Address(address))


def test_reserved_addresses_are_never_handed_out_or_granted():
    reserved = frozenset(IPv4Address(f"10.244.1.{i}") for i in range(2, 254))   # all but .254
    state, allocation, _ = allocate(PoolState(), key("a"), MY_SUBNET, MY_GATEWAY, "ovlva", "/x", reserved=reserved)
    assert allocation.address == IPv4Address("10.244.1.254")
    with pytest.raises(PoolExhausted):
        allocate(state, key("b"), MY_SUBNET, MY_GATEWAY, "ovlvb", "/x", reserved=reserved)
    with pytest.raises(AddressUnavailable, match="claimed by another host"):
        allocate(PoolState(), key("c"), MY_SUBNET, MY_GATEWAY, "ovlvc", "/x", requested=IPv4Address("10.244.1.9"),
                 reserved=reserved)


def test_reservations_in_the_records_are_never_handed_out_and_survive_encoding():
    # The origin's daemon reserves an address for a claim it grants, in the records themselves.
    state, holder = reserve(PoolState(), IPv4Address("10.244.1.2"))
    assert holder is None and state.reserved == {IPv4Address("10.244.1.2")}
    state, allocation, _ = allocate(state, key("a"), MY_SUBNET, MY_GATEWAY, "ovlva", "/x")
    assert allocation.address == IPv4Address("10.244.1.3")   # .2 skipped
    with pytest.raises(ReservedForClaim, match="reserved for another host's claim"):
        allocate(state, key("b"), MY_SUBNET, MY_GATEWAY, "ovlvb", "/x", requested=IPv4Address("10.244.1.2"))
    # An allocated address cannot be reserved: the claim is refused, naming who has it.
    same, holder = reserve(state, IPv4Address("10.244.1.3"))
    assert same is state and holder == allocation
    decoded = decode_state(encode_state(state))
    assert decoded == state and decoded.reserved == {IPv4Address("10.244.1.2")}
    # Dropped when the claim is gone; dropping what is not reserved changes nothing.
    assert unreserve(state, {IPv4Address("10.244.1.2")}).reserved == frozenset()
    assert unreserve(state, {IPv4Address("10.244.1.99")}) is state


def test_records_of_the_previous_version_have_no_reservations():
    text = ('{"format": 1, "last": "10.244.1.2", "allocations": [\n {"network": "net", "containerID": "c1", '
            '"ifname": "eth0", "address": "10.244.1.2", "hostIfname": "ovlv1", "netns": "/x"}\n]}\n')
    assert decode_state(text).reserved == frozenset()
    with pytest.raises(StateFailure, match="corrupt"):
        decode_state(text.replace('"last"', '"reserved": ["10.244.1"], "last"'))


def test_claimed_records_survive_encoding_and_are_exclusive():
    state, moved, new = record_claimed(PoolState(), key("m"), IPv4Address("10.244.9.7"), "ovlvm", "/run/netns/m")
    assert new and moved.claimed
    assert record_claimed(state, key("m"), IPv4Address("10.244.9.7"), "ovlvm", "/run/netns/m")[2] is False
    with pytest.raises(AddressUnavailable):
        record_claimed(state, key("n"), IPv4Address("10.244.9.7"), "ovlvn", "/x")
    with pytest.raises(AddressUnavailable):
        record_claimed(state, key("m"), IPv4Address("10.244.9.8"), "ovlvm", "/x")
    state, plain, _ = take(state, key("p"), MY_SUBNET, MY_GATEWAY)
    decoded = decode_state(encode_state(state))
    assert set(decoded.allocations) == set(state.allocations) and decoded.find(key("m")).claimed and not decoded.find(key("p")).claimed


# --- group commit (AllocationStore.update) and the decoded-state cache -------------------------

def _take_change(k):
    def change(state):
        state, allocation, _ = take(state, k)
        return state, allocation
    return change


def test_update_from_many_threads_gives_distinct_durable_addresses(tmp_path):
    store = AllocationStore(tmp_path / "ipam")
    start = threading.Barrier(20)
    results = []

    def worker(n):
        start.wait()
        results.append(store.update(_take_change(key(n))))
    threads = [threading.Thread(target=worker, args=(n,)) for n in range(20)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len({a.address for a in results}) == 20
    # durable: a fresh store (another process, say) reads every one of them from the file
    assert {a.address for a in AllocationStore(tmp_path / "ipam").read().allocations} == {a.address for a in results}


def test_update_applies_changes_in_a_batch_each_on_its_own(tmp_path):
    store = AllocationStore(tmp_path / "ipam")
    store.update(_take_change(key(1)))
    # Run a batch by hand: a failing change in the middle leaves the others applied.
    from cni.allocator import _Change
    good, bad, later = _Change(_take_change(key(2))), _Change(lambda s: (_ for _ in ()).throw(PoolExhausted("x"))), \
        _Change(_take_change(key(3)))
    with store._mutex:
        store._commit_batch([good, bad, later])
    assert good.done and bad.done and later.done
    assert isinstance(bad.error, PoolExhausted) and good.error is None and later.error is None
    assert {a.key for a in AllocationStore(tmp_path / "ipam").read().allocations} == {key(1), key(2), key(3)}
    with pytest.raises(PoolExhausted):
        store.update(lambda s: (_ for _ in ()).throw(PoolExhausted("none left")))


def test_update_reports_a_failed_write_to_every_change_of_the_batch(tmp_path):
    directory = tmp_path / "ipam"
    store = AllocationStore(directory)
    store.update(_take_change(key(1)))
    # The temporary file's name taken by a directory: the write fails, nothing is applied.
    (directory / ".allocations.json.tmp").mkdir()
    with pytest.raises(StateFailure):
        store.update(_take_change(key(2)))
    (directory / ".allocations.json.tmp").rmdir()
    assert [a.key for a in AllocationStore(directory).read().allocations] == [key(1)]
    assert store.update(_take_change(key(2))).key == key(2)


def test_a_write_by_another_store_is_never_missed(tmp_path):
    """The cache holds the bytes it decoded: a change made through another store (another
    process) between two updates is read, not overwritten."""
    directory = tmp_path / "ipam"
    ours, theirs = AllocationStore(directory), AllocationStore(directory)
    first = ours.update(_take_change(key(1)))
    with theirs.transaction() as txn:
        state, other, _ = take(txn.state, key(2))
        txn.commit(state)
    third = ours.update(_take_change(key(3)))
    assert len({first.address, other.address, third.address}) == 3
    assert {a.key for a in AllocationStore(directory).read().allocations} == {key(1), key(2), key(3)}


def test_encoding_is_one_allocation_a_line_and_round_trips():
    state = PoolState()
    for n in range(3):
        state, _, _ = take(state, key(n))
    text = encode_state(state)
    assert len(text.splitlines()) == 5 and decode_state(text) == state


# --- records of an earlier boot (the boot marker) ------------------------------------------------

def _records_with_one_allocation(directory):
    store = AllocationStore(directory)
    store.update(_take_change(key(1)))
    return store


def test_the_boot_marker_is_written_before_records_and_names_this_boot(tmp_path):
    from cni.allocator import _boot_id
    directory = tmp_path / "ipam"
    _records_with_one_allocation(directory)
    assert (directory / "boot").read_text().strip() == _boot_id()
    assert stat.S_IMODE(os.stat(directory / "boot").st_mode) == 0o600
    assert [a.key for a in AllocationStore(directory).read().allocations] == [key(1)]


def test_records_of_an_earlier_boot_read_as_empty_and_are_replaced(tmp_path):
    directory = tmp_path / "ipam"
    _records_with_one_allocation(directory)
    (directory / "boot").write_text("an-earlier-boot\n")
    fresh = AllocationStore(directory)
    assert fresh.read().allocations == () and fresh.lookup(key(1)) is None
    # even a damaged file (a power loss on a disk-backed run dir) does not block the next ADD
    (directory / "allocations.json").write_text('{"format": 1, "allocations": [')
    assert AllocationStore(directory).update(_take_change(key(2))).key == key(2)
    assert [a.key for a in AllocationStore(directory).read().allocations] == [key(2)]
    from cni.allocator import _boot_id
    assert (directory / "boot").read_text().strip() == _boot_id()


def test_records_without_a_marker_are_trusted_and_then_marked(tmp_path):
    """Records written before the marker existed (an upgrade with containers running) are
    live: they must never be dropped."""
    directory = tmp_path / "ipam"
    first = _records_with_one_allocation(directory).read().allocations[0]
    (directory / "boot").unlink()
    store = AllocationStore(directory)
    assert store.lookup(key(1)) == first
    second = store.update(_take_change(key(2)))
    assert second.address != first.address and (directory / "boot").exists()
    # a damaged file of this boot is an error, never silently an empty pool
    (directory / "allocations.json").write_text("{")
    with pytest.raises(StateFailure):
        AllocationStore(directory).read()


def test_records_are_written_whole_when_the_kernel_takes_a_write_in_pieces(tmp_path, monkeypatch):
    import cni.allocator as allocator
    real_write = os.write
    pieces = []

    def short_write(fd, data):
        pieces.append(len(data))
        return real_write(fd, bytes(data[:100]))   # a nearly full file system takes part of it
    monkeypatch.setattr(allocator.os, "write", short_write)
    store = AllocationStore(store_dir(tmp_path))
    subnet = IPv4Network("10.244.3.0/24")
    for n in range(20):
        key = AttachmentKey("net", f"c{n}", "eth0")
        store.update(lambda state: allocate(state, key, subnet, subnet.network_address + 1, f"ovlv{n}", "/x")[:2])
    monkeypatch.setattr(allocator.os, "write", real_write)
    assert len(pieces) > 20 and len(AllocationStore(store_dir(tmp_path)).read().allocations) == 20
