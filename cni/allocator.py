"""IP allocation for containers on this host: pure pool logic plus a small locked file store.

Design note
-----------
The pool is the host's subnet from the daemon's subnet file, minus the network address, the
gateway (the bridge's address, the subnet's first address) and the broadcast address. An
allocation is keyed by (network name, container ID, ifname), the primary key the CNI spec asks
stateful plugins to use, so a repeated ADD gets the same address back and a DEL for one
container can never release another's.

Addresses are handed out round-robin after the last one given, as host-local does: a released
address is not reused at once, so a stale ARP entry or a late packet for a dead container does not
reach its successor.

The logic (`PoolState`, `allocate`, `release`, `release_unlisted`) is pure and returns new values;
`AllocationStore` is the only I/O. It keeps one JSON file, rewritten atomically (temporary file,
rename) while holding an exclusive `flock` on a separate lock file, so concurrent ADDs, from
the service's threads or from other processes, never hand out one address twice. Records live
under `<run-dir>/cni-ipam/` (directory 0700, files 0600): in /run they vanish at reboot together
with every container network namespace they describe.

Records describe kernel state that does not outlive the boot, so the file is not fsync'ed: every
process of this boot reads what was written through the page cache, a crashed daemon loses
nothing, and only a power loss or kernel crash could lose a write, which takes every container
namespace with it. What such a crash may leave on a disk-backed run dir (a short or empty file
after the rename) must not block ADDs in the next boot, so the directory holds a marker `boot`
with the kernel's boot ID, written before the records whenever it is missing or stale: records
under another boot's marker are those of dead namespaces and are read as empty (and replaced by
the next write). No marker (records of an older version) means trust the records. An fsync cost
0.3 ms here on a quiet disk and 100 ms on a busy one, with every ADD of a batch waiting on it.
Without a boot ID to read, the store falls back to fsync.

A requested address (CNI_ARGS IP=, runtimeConfig.ips) is allocated exactly or not at all. One
from another host's subnet (a moved workload, see overlay.moves) is recorded with `claimed`
set: it is not from our pool, the host holds it through an etcd claim, and DEL must withdraw
that claim. Addresses of our pool that other hosts claim are never handed out, from two sources:
`reserved` passed in (the daemon's view of the claims) and the store's own `reserved` set. The
latter is written by the origin host's daemon under the store's lock when it grants a claim
(overlay.claimhook.ClaimGranter, `reserve`): the grant and every ADD are then ordered by the lock, so an
address is either allocated here (and the claim refused) or reserved (and never allocated)
while the claim exists; the daemon drops the reservation (`unreserve`) when the claim is gone.

Standard library only: the plugin reads the store (DEL while the daemon is down).
"""

from __future__ import annotations

import bisect
import fcntl
import json
import os
import threading
from dataclasses import dataclass, replace
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path

from cni.errors import AddressUnavailable, PoolExhausted, StateFailure

STORE_DIR_NAME = "cni-ipam"
_STATE_FILE = "allocations.json"
_LOCK_FILE = "lock"
_BOOT_FILE = "boot"
_BOOT_ID_PATH = "/proc/sys/kernel/random/boot_id"
_boot_id_cache: list = []


def _boot_id() -> str | None:
    """This boot's ID (the kernel makes a new one at every boot), None where it cannot be read."""
    if not _boot_id_cache:
        try:
            with open(_BOOT_ID_PATH) as source:
                _boot_id_cache.append(source.read().strip() or None)
        except OSError:
            _boot_id_cache.append(None)
    return _boot_id_cache[0]
_FORMAT = 1


def store_dir(run_dir) -> Path:
    return Path(run_dir) / STORE_DIR_NAME


@dataclass(frozen=True, order=True)
class AttachmentKey:
    network: str
    container_id: str
    ifname: str


@dataclass(frozen=True)
class Allocation:
    key: AttachmentKey
    address: IPv4Address
    host_ifname: str
    netns: str
    claimed: bool = False   # an address of another host's subnet, held through an etcd claim


@dataclass(frozen=True)
class PoolState:
    allocations: tuple[Allocation, ...] = ()
    last: IPv4Address | None = None
    reserved: frozenset[IPv4Address] = frozenset()   # granted to other hosts' claims: never allocated

    def find(self, key: AttachmentKey) -> Allocation | None:
        # The container ID first: a string comparison, where comparing whole keys would call
        # the dataclass's __eq__ once per allocation (this runs under the store's lock).
        container_id = key.container_id
        for allocation in self.allocations:
            if allocation.key.container_id == container_id and allocation.key == key:
                return allocation
        return None

    def taken(self) -> frozenset[IPv4Address]:
        return frozenset(a.address for a in self.allocations)

    def holder(self, address: IPv4Address) -> Allocation | None:
        return next((a for a in self.allocations if a.address == address), None)


class ReservedForClaim(AddressUnavailable):
    """A requested address the store holds reserved for another host's claim."""


def usable_addresses(subnet: IPv4Network, gateway: IPv4Address) -> list[IPv4Address]:
    """Every address a container may get: hosts of the subnet except the gateway."""
    return [address for address in subnet.hosts() if address != gateway]


def allocate(state: PoolState, key: AttachmentKey, subnet: IPv4Network, gateway: IPv4Address,
             host_ifname: str, netns: str, requested: IPv4Address | None = None,
             reserved: frozenset[IPv4Address] = frozenset()) -> tuple[PoolState, Allocation, bool]:
    """(new state, allocation, whether it is new). An existing allocation for the key is returned
    as it is, with its recorded netns updated, so a repeated ADD yields the same address.

    `requested`: exactly this address of the pool (AddressUnavailable when it is taken, reserved
    or not a container's address; ReservedForClaim when the state holds it reserved). `reserved`:
    addresses other hosts claim, never handed out, like those of `state.reserved`."""
    existing = state.find(key)
    if existing is not None and requested is not None and existing.address != requested:
        raise AddressUnavailable(f"container {key.container_id} {key.ifname} already has {existing.address}, "
                                 f"not the requested {requested}")
    if existing is not None:
        if existing.netns == netns and existing.host_ifname == host_ifname:
            return state, existing, False
        updated = replace(existing, netns=netns, host_ifname=host_ifname)
        allocations = tuple(updated if a.key == key else a for a in state.allocations)
        return replace(state, allocations=allocations), updated, False
    if requested is not None:
        return _allocate_exactly(state, key, subnet, gateway, host_ifname, netns, requested, reserved)
    # Integers rather than IPv4Address objects: this runs under the store's lock, once per ADD.
    candidates = _usable_integers(subnet, gateway)
    taken = {int(a.address) for a in state.allocations}
    taken.update(int(a) for a in reserved)
    taken.update(int(a) for a in state.reserved)
    start = 0
    if state.last is not None and state.last in subnet:
        # Continue after the last address handed out (round robin, as host-local does).
        start = bisect.bisect_left(candidates, int(state.last)) + 1
        if start > len(candidates):
            start = 0
    for offset in range(len(candidates)):
        number = candidates[(start + offset) % len(candidates)]
        if number not in taken:
            address = IPv4Address(number)
            allocation = Allocation(key, address, host_ifname, netns)
            return PoolState(state.allocations + (allocation,), address, state.reserved), allocation, True
    raise PoolExhausted(f"no free address left in {subnet}: all {len(candidates)} are allocated")


def _usable_integers(subnet: IPv4Network, gateway: IPv4Address) -> list[int]:
    """usable_addresses() as sorted integers."""
    first, last = int(subnet.network_address), int(subnet.broadcast_address)
    if subnet.prefixlen < 31:
        first, last = first + 1, last - 1    # as hosts(): no network or broadcast address
    excluded = int(gateway)
    return [n for n in range(first, last + 1) if n != excluded]


def _allocate_exactly(state, key, subnet, gateway, host_ifname, netns, requested, reserved):
    if requested not in subnet or requested in (subnet.network_address, gateway, subnet.broadcast_address):
        raise AddressUnavailable(f"{requested} is not a container address of {subnet}")
    if requested in reserved:
        raise AddressUnavailable(f"{requested} is claimed by another host (a workload moved there with it)")
    if requested in state.reserved:
        raise ReservedForClaim(f"{requested} is reserved for another host's claim (a workload moved there with it)")
    holder = state.holder(requested)
    if holder is not None:
        raise AddressUnavailable(f"{requested} is already allocated to container {holder.key.container_id} "
                                 f"{holder.key.ifname} on this host")
    allocation = Allocation(key, requested, host_ifname, netns)
    # `last` is left alone: a requested address does not move the round robin.
    return replace(state, allocations=state.allocations + (allocation,)), allocation, True


def record_claimed(state: PoolState, key: AttachmentKey, address: IPv4Address, host_ifname: str,
                   netns: str) -> tuple[PoolState, Allocation, bool]:
    """Record an address of another host's subnet that this host is about to claim (a moved
    workload); (new state, allocation, whether it is new). Recorded before anything is made, as
    for pool addresses, so DEL and GC find it after a crash."""
    existing = state.find(key)
    if existing is not None:
        if existing.address != address:
            raise AddressUnavailable(f"container {key.container_id} {key.ifname} already has {existing.address}, "
                                     f"not the requested {address}")
        updated = replace(existing, netns=netns, host_ifname=host_ifname, claimed=True)
        allocations = tuple(updated if a.key == key else a for a in state.allocations)
        return replace(state, allocations=allocations), updated, False
    holder = state.holder(address)
    if holder is not None:
        raise AddressUnavailable(f"{address} is already attached to container {holder.key.container_id} "
                                 f"{holder.key.ifname} on this host")
    allocation = Allocation(key, address, host_ifname, netns, claimed=True)
    return replace(state, allocations=state.allocations + (allocation,)), allocation, True


def reserve(state: PoolState, address: IPv4Address) -> tuple[PoolState, Allocation | None]:
    """Reserve an address of the pool for another host's claim: (new state, None); or, when a
    container here has it, (state unchanged, its allocation) and the claim is to be refused."""
    holder = state.holder(address)
    if holder is not None:
        return state, holder
    if address in state.reserved:
        return state, None
    return replace(state, reserved=state.reserved | {address}), None


def unreserve(state: PoolState, addresses) -> PoolState:
    """Drop reservations (claims that are gone); addresses not reserved are ignored."""
    remaining = state.reserved.difference(addresses)
    return state if len(remaining) == len(state.reserved) else replace(state, reserved=remaining)


def release(state: PoolState, key: AttachmentKey) -> tuple[PoolState, Allocation | None]:
    existing = state.find(key)
    if existing is None:
        return state, None
    return replace(state, allocations=tuple(a for a in state.allocations if a is not existing)), existing


def release_unlisted(state: PoolState, network: str,
                     keep: frozenset[tuple[str, str]]) -> tuple[PoolState, tuple[Allocation, ...]]:
    """GC: release this network's allocations whose (container ID, ifname) is not in `keep`.
    Other networks' allocations are not ours to judge."""
    released = tuple(a for a in state.allocations
                     if a.key.network == network and (a.key.container_id, a.key.ifname) not in keep)
    if not released:
        return state, ()
    remaining = tuple(a for a in state.allocations if a not in released)
    return replace(state, allocations=remaining), released


# --------------------------------------------------------------------------- serialisation

# Encoded lines of allocations seen lately, by id(): (allocation, its address as int, line).
# Allocations are immutable and the state changes by one or a few at a time, so a commit encodes
# only the new ones; the identity check guards against a reused id().
_lines: dict = {}
_lines_lock = threading.Lock()


def encode_state(state: PoolState) -> str:
    """One allocation a line, sorted by address. This runs under the store's lock, once per
    ADD and DEL, over every allocation of the host: each line is encoded once, by json's C
    encoder (indent= would take the pure Python one), and then reused."""
    global _lines
    with _lines_lock:
        known, current = _lines, {}
        for a in state.allocations:
            entry = known.get(id(a))
            if entry is None or entry[0] is not a:
                line = json.dumps({"network": a.key.network, "containerID": a.key.container_id,
                                   "ifname": a.key.ifname, "address": str(a.address), "hostIfname": a.host_ifname,
                                   "netns": a.netns, **({"claimed": True} if a.claimed else {})})
                entry = (a, int(a.address), line)
            current[id(a)] = entry
        _lines = current
    ordered = sorted((number, line) for _, number, line in current.values())
    last = json.dumps(str(state.last) if state.last is not None else None)
    body = ",\n ".join(line for _, line in ordered)
    # `reserved` is new in this version; an older reader ignores it (it reads only "format",
    # "last" and "allocations"), so the format stays 1.
    reserved = json.dumps([str(a) for a in sorted(state.reserved)])
    return f'{{"format": {_FORMAT}, "last": {last}, "reserved": {reserved}, "allocations": [\n {body}\n]}}\n'


def decode_state(text: str) -> PoolState:
    try:
        raw = json.loads(text)
        if raw.get("format") != _FORMAT:
            raise ValueError(f"unknown format {raw.get('format')!r}")
        allocations = tuple(
            Allocation(AttachmentKey(item["network"], item["containerID"], item["ifname"]),
                       IPv4Address(item["address"]), item["hostIfname"], item["netns"],
                       item.get("claimed", False) is True)
            for item in raw["allocations"])
        last = IPv4Address(raw["last"]) if raw.get("last") else None
        reserved = frozenset(IPv4Address(text) for text in raw.get("reserved", ()))
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise StateFailure(f"allocation records are corrupt: {exc}") from None
    if len({a.address for a in allocations}) != len(allocations):
        raise StateFailure("allocation records are corrupt: one address is allocated twice")
    return PoolState(allocations, last, reserved)


# --------------------------------------------------------------------------- the store

def write_all(fd: int, data: bytes) -> None:
    """os.write until all of data is written: a nearly full file system takes part of a write
    without an error, and a short file renamed over the records would lose every allocation."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


class AllocationStore:
    """The allocation file under an exclusive lock. Use:

        with store.transaction() as txn:
            state, allocation, new = allocate(txn.state, ...)
            txn.commit(state)

    or, for a change that is a pure function of the state (the service's ADD and DEL):

        allocation = store.update(lambda state: ...)   # (new state, result) -> result

    One store serves many threads (the service's). Writers queue on an in-process lock first, so
    the file lock is contended only by other processes. `update` combines the changes of
    concurrent callers (group commit): whichever thread gets the lock applies every change queued
    so far, in arrival order, to the state read under the file lock, and writes the result once,
    once; the others find their result ready. A burst of ADDs thus pays one file write
    per batch instead of queueing one write each behind the lock, while every change is still
    computed against the latest durable state and is durable before its caller goes on.

    The last state read or written is kept with the exact bytes it came from; a transaction
    still reads the file under the file lock (another process may have written it) but decodes
    it only when those bytes differ.
    """

    def __init__(self, directory):
        self.directory = Path(directory)
        self._mutex = threading.Lock()        # writers of this store, in this process
        self._queue: list[_Change] = []       # changes waiting for the next group commit
        self._queue_lock = threading.Lock()
        self._cached: tuple[bytes, PoolState] | None = None
        self._marked = False    # the boot marker is known to be this boot's (it cannot change)

    def transaction(self) -> "_Transaction":
        return _Transaction(self, exclusive=True)

    def update(self, change):
        """Apply `change(state) -> (new state, result)` atomically and durably; returns result.
        An exception from `change` (or from writing the file) is raised here, and that change
        is not applied."""
        pending = _Change(change)
        with self._queue_lock:
            self._queue.append(pending)
        while not pending.done:
            with self._mutex:
                if pending.done:
                    break
                with self._queue_lock:
                    batch, self._queue = self._queue, []
                self._commit_batch(batch)
        if pending.error is not None:
            raise pending.error
        return pending.result

    def _commit_batch(self, batch: list["_Change"]) -> None:
        """With the mutex held: apply the batch in order under the file lock, write once."""
        try:
            with _Transaction(self, exclusive=True, take_mutex=False) as txn:
                state = txn.state
                applied = []
                for pending in batch:
                    try:
                        state, pending.result = pending.change(state)
                        applied.append(pending)
                    except Exception as exc:    # this change only; the state is as before it
                        pending.error = exc
                try:
                    txn.commit(state)
                except StateFailure as exc:
                    for pending in applied:
                        pending.error, pending.result = exc, None
        except Exception as exc:    # the file could not be locked or read: nothing applied
            for pending in batch:
                if pending.error is None:
                    pending.error, pending.result = exc, None
        finally:
            for pending in batch:
                pending.done = True

    def read(self) -> PoolState:
        with _Transaction(self, exclusive=False) as txn:
            return txn.state

    def lookup(self, key: AttachmentKey) -> Allocation | None:
        if not (self.directory / _STATE_FILE).exists():
            return None
        return self.read().find(key)

    def _ensure_directory(self) -> None:
        try:
            self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
            # mkdir leaves an existing directory's mode alone: tighten one made looser by hand.
            if self.directory.stat().st_mode & 0o077:
                self.directory.chmod(0o700)
        except OSError as exc:
            raise StateFailure(f"cannot create {self.directory}: {exc.strerror}") from None

    def _of_this_boot(self) -> bool:
        """Whether the records may be trusted: the marker names this boot, or there is none
        (records of a version before the marker), or no boot ID can be read."""
        if self._marked:
            return True
        boot = _boot_id()
        marker = _read_all(self.directory / _BOOT_FILE)
        if boot is None or marker is None:
            return True
        if marker.decode("utf-8", "replace").strip() == boot:
            self._marked = True
            return True
        return False

    def _mark_boot(self) -> None:
        """Write this boot's marker (before the records: see the design note)."""
        tmp = self.directory / f".{_BOOT_FILE}.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            write_all(fd, _boot_id().encode() + b"\n")
        finally:
            os.close(fd)
        os.replace(tmp, self.directory / _BOOT_FILE)
        self._marked = True

    def _decode(self, data: bytes) -> PoolState:
        cached = self._cached
        if cached is not None and cached[0] == data:
            return cached[1]
        state = decode_state(data.decode("utf-8", "replace"))
        self._cached = (data, state)
        return state


def _read_all(path: Path) -> bytes | None:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    try:
        chunks = []
        while True:
            chunk = os.read(fd, 1 << 20)
            if not chunk:
                return b"".join(chunks)
            chunks.append(chunk)
    finally:
        os.close(fd)


class _Change:
    __slots__ = ("change", "result", "error", "done")

    def __init__(self, change):
        self.change = change
        self.result = None
        self.error: BaseException | None = None
        self.done = False


class _Transaction:
    def __init__(self, store: AllocationStore, exclusive: bool, take_mutex: bool = True):
        self.store = store
        self.exclusive = exclusive
        self.state = PoolState()
        self._lock_fd = -1
        # Readers need no mutex: a shared flock on their own file description waits for a
        # writer of this process as for one of another.
        self._take_mutex = take_mutex and exclusive
        self._holds_mutex = False

    def __enter__(self) -> "_Transaction":
        store = self.store
        store._ensure_directory()
        if self._take_mutex:
            store._mutex.acquire()
            self._holds_mutex = True
        try:
            self._lock_fd = os.open(store.directory / _LOCK_FILE, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            # flock, not fcntl record locks: those are per process and would not keep apart
            # two stores of one process (the service's and the daemon's claim keeper). flock
            # locks belong to the open file description, so a forked child shares it until it
            # execs (O_CLOEXEC); never fork without exec here.
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX if self.exclusive else fcntl.LOCK_SH)
            data = _read_all(store.directory / _STATE_FILE)
            if data is not None and not store._of_this_boot():
                data = None     # an earlier boot's records: their namespaces are gone
        except OSError as exc:
            self._unlock()
            raise StateFailure(f"cannot read allocation records in {store.directory}: {exc}") from None
        if data is not None:
            try:
                self.state = store._decode(data)
            except StateFailure:
                self._unlock()
                raise
        return self

    def commit(self, state: PoolState) -> None:
        if not self.exclusive:
            raise RuntimeError("commit inside a read-only transaction")
        if state == self.state:
            return
        path = self.store.directory / _STATE_FILE
        tmp = self.store.directory / f".{_STATE_FILE}.tmp"
        data = encode_state(state).encode()
        boot = _boot_id()
        try:
            if boot is not None and not self.store._marked:
                self.store._mark_boot()
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
            try:
                write_all(fd, data)
                if boot is None:
                    os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, path)
        except OSError as exc:
            self.store._cached = None
            raise StateFailure(f"cannot write allocation records in {self.store.directory}: {exc}") from None
        self.store._cached = (data, state)
        self.state = state

    def __exit__(self, *exc_info) -> None:
        self._unlock()

    def _unlock(self) -> None:
        if self._lock_fd >= 0:
            os.close(self._lock_fd)     # closing the description releases the flock
            self._lock_fd = -1
        if self._holds_mutex:
            self._holds_mutex = False
            self.store._mutex.release()
