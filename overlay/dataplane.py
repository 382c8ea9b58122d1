"""The VXLAN data plane as pure data: what we want, and the plan that gets the kernel there.

`desired_state()` turns (own lease, peer leases, config, underlay) into the exact device,
neighbours, FDB entries and routes wanted, the way flannel programs them per peer:

    neighbour  peer subnet network address -> peer VtepMAC          (permanent, on the device)
    fdb        peer VtepMAC -> dst peer PublicIP                    (self, permanent)
    route      peer subnet via peer network address, onlink, dev <vxlan device>

`plan()` diffs desired against the actual state read from the kernel into an ordered `Plan`.
Neither function does I/O; the netlink layer (overlay.kernel) reads actual state and applies a
plan, and is the only code that talks to the kernel.

A lease event does not run them over every peer: DesiredTracker (at the end of this module)
keeps the same desired state lease by lease and plans from the changed leases alone, and is
checked against these two functions. They run whole at every resync (against what the kernel
holds) and in tests, over thousands of peers, so they are written for the case where almost
nothing changed since the previous call:

- Neighbour, FdbEntry and Route hash once, when made. A frozen dataclass otherwise rehashes its
  fields on every set insert and lookup, and an `ipaddress` value hashes in Python each time.
- What one peer's lease contributes (its route, neighbour and FDB entry, whether it is a peer at
  all) is remembered per Lease object, for the inputs that decide it (own lease, config,
  underlay). The daemon keeps the Lease objects of unchanged peers from one event to the next,
  so an event builds new values only for the leases that changed, and the desired state shares
  all other objects with the previous one.
- `plan()` starts from the set differences, which compare shared objects by identity and reuse
  the hashes the sets hold; only the few changed values are then looked at one by one.

None of this changes a result: the cache is a memo of a pure function of its key, and
tests/unit/test_dataplane_fast.py checks each function against the plain computation.
"""

from __future__ import annotations

import hashlib
import operator
import threading
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv4Interface, IPv4Network
from typing import Any, Callable, Iterable

from .config import NetworkConfig
from .lease import Lease

VXLAN_OVERHEAD = 50  # outer IPv4 20 + UDP 8 + VXLAN 8 + inner Ethernet 14


@dataclass(frozen=True)
class Underlay:
    """The host's link to the other hosts: where VXLAN packets leave from."""
    iface: str
    public_ip: IPv4Address
    mtu: int
    network: IPv4Network | None = None  # the on-link underlay subnet, for DirectRouting


@dataclass(frozen=True)
class VxlanDevice:
    name: str
    vni: int
    port: int
    local_ip: IPv4Address
    underlay_iface: str
    mtu: int
    mac: str
    address: IPv4Interface  # own subnet's network address /32
    up: bool = True         # administratively up; read_state reports a downed device as False

    def immutable_key(self) -> tuple:
        """What the kernel cannot change on a live VXLAN device: a mismatch means recreate."""
        return (self.vni, self.port, self.local_ip, self.underlay_iface)


# Neighbour, FdbEntry and Route define __hash__ themselves (so @dataclass keeps it): the hash the
# dataclass would compute, hash of the field tuple, computed once in __post_init__ and kept in
# the instance dict (not a field: equality, ordering, repr and replace() are the dataclass's).
# A route and a neighbour also keep, from first use, the key plan() matches them by (a route's
# destination, a neighbour's IP) as plain integers, which hash in C, unlike IPv4Network and
# IPv4Address.

@dataclass(frozen=True, order=True)
class Neighbour:
    ip: IPv4Address
    mac: str

    def __post_init__(self) -> None:
        object.__setattr__(self, "_hash", hash((self.ip, self.mac)))

    def __hash__(self) -> int:
        return self._hash

    def __getattr__(self, name: str) -> Any:  # only for attributes not (yet) set
        if name != "_key":
            raise AttributeError(name)
        key = _address_key(self.ip)
        object.__setattr__(self, "_key", key)
        return key


@dataclass(frozen=True, order=True)
class FdbEntry:
    mac: str
    dst: IPv4Address

    def __post_init__(self) -> None:
        object.__setattr__(self, "_hash", hash((self.mac, self.dst)))

    def __hash__(self) -> int:
        return self._hash


@dataclass(frozen=True, order=True)
class Route:
    dst: IPv4Network
    gateway: IPv4Address
    device: str
    onlink: bool = True

    def __post_init__(self) -> None:
        object.__setattr__(self, "_hash", hash((self.dst, self.gateway, self.device, self.onlink)))

    def __hash__(self) -> int:
        return self._hash

    def __getattr__(self, name: str) -> Any:  # only for attributes not (yet) set
        if name != "_key":
            raise AttributeError(name)
        key = _network_key(self.dst)
        object.__setattr__(self, "_key", key)
        return key


_match_key = operator.attrgetter("_key")


def _address_key(address: Any) -> Any:
    """A key equal for equal addresses, cheap to hash: (version, integer)."""
    try:
        return (address.version, int(address))
    except (AttributeError, TypeError, ValueError):
        return address  # not an ipaddress value: the value itself is its key


def _network_key(network: Any) -> Any:
    """A key equal for equal networks, cheap to hash: (version, integer, prefix length)."""
    try:
        return (network.version, int(network.network_address), network.prefixlen)
    except (AttributeError, TypeError, ValueError):
        return network


@dataclass(frozen=True)
class DataplaneState:
    device: VxlanDevice | None
    neighbours: frozenset[Neighbour] = frozenset()
    fdb: frozenset[FdbEntry] = frozenset()
    routes: frozenset[Route] = frozenset()

    def wants(self, item: "Route | Neighbour | FdbEntry") -> bool:
        """Whether the state holds this route, neighbour or FDB entry (as DesiredTracker.wants)."""
        held = (self.routes if isinstance(item, Route) else
                self.neighbours if isinstance(item, Neighbour) else self.fdb)
        return item in held

    def wants_neighbour_at(self, ip: IPv4Address) -> bool:
        """Whether the state holds a neighbour (any MAC) at this address."""
        return _address_key(ip) in self._keys("neighbours")[0]

    def _keys(self, attribute: str) -> tuple[frozenset, bool]:
        """The match keys of the routes or neighbours, and whether no two share one; worked
        out on first use and kept, as the state is immutable (not a field: equality ignores it)."""
        cached = self.__dict__.get("_keys_" + attribute)
        if cached is None:
            items = getattr(self, attribute)
            keys = frozenset(map(_match_key, items))
            cached = (keys, len(keys) == len(items))
            object.__setattr__(self, "_keys_" + attribute, cached)
        return cached


def vtep_mac(public_ip: IPv4Address, vni: int) -> str:
    """A stable, locally administered unicast MAC for this host's VTEP.

    Derived from the public IP and VNI, so a recreated device (after a reboot, or a settings
    change) comes back with the MAC its peers already hold: no stale FDB or ARP entries.
    """
    digest = hashlib.sha256(f"overlay-vtep/{public_ip}/{vni}".encode()).digest()
    octets = [(digest[0] & 0xFC) | 0x02] + list(digest[1:6])  # local bit set, multicast clear
    return ":".join(f"{octet:02x}" for octet in octets)


def desired_device(own_subnet: IPv4Network, config: NetworkConfig, underlay: Underlay) -> VxlanDevice:
    backend = config.backend
    return VxlanDevice(
        name=backend.device_name,
        vni=backend.vni,
        port=backend.port,
        local_ip=underlay.public_ip,
        underlay_iface=underlay.iface,
        mtu=underlay.mtu - VXLAN_OVERHEAD,
        mac=vtep_mac(underlay.public_ip, backend.vni),
        address=IPv4Interface((own_subnet.network_address, 32)),
    )


def desired_state(own: Lease, peers: Iterable[Lease], config: NetworkConfig,
                  underlay: Underlay) -> DataplaneState:
    device = desired_device(own.subnet, config, underlay)

    def contribution(peer: Lease) -> tuple:
        return _contribution(peer, own, config, underlay, device.name)

    context = ("desired_state", own.subnet, own.attrs.public_ip, config, underlay)
    # One FDB entry per MAC: should two leases ever announce the same VtepMAC with different
    # public IPs, the newest write wins (highest mod_revision; of equal ones, written in one
    # etcd transaction, the higher public IP: a rule that does not depend on the order of
    # `peers`, so that DesiredTracker, which sees leases one at a time, agrees).
    newest: dict[str, Lease] = {}
    newest_fdb: dict[str, FdbEntry] = {}
    neighbours: list[Neighbour] = []
    routes: list[Route] = []
    for peer, (route, neighbour, fdb) in _per_lease(context, peers, contribution):
        if route is None:
            continue
        routes.append(route)
        if neighbour is None:
            continue
        neighbours.append(neighbour)
        mac = fdb.mac
        held = newest.get(mac)
        if held is None or _fdb_rank(peer) > _fdb_rank(held):
            newest[mac] = peer
            newest_fdb[mac] = fdb
    return DataplaneState(device, frozenset(neighbours), frozenset(newest_fdb.values()), frozenset(routes))


def _contribution(peer: Lease, own: Lease, config: NetworkConfig, underlay: Underlay, device_name: str) -> tuple:
    """(route, neighbour, fdb entry) this peer's lease asks for; (None, None, None) if it is not
    a peer. A direct route needs no neighbour or FDB entry."""
    if not _is_peer(peer, own, config):
        return None, None, None
    return _peer_contribution(peer, config, underlay, device_name)


def _peer_contribution(peer: Lease, config: NetworkConfig, underlay: Underlay, device_name: str) -> tuple:
    """_contribution() of a lease known to be a peer's."""
    if _direct_route_ok(peer, config, underlay):
        return Route(peer.subnet, peer.attrs.public_ip, underlay.iface, onlink=False), None, None
    gateway = peer.subnet.network_address
    return (Route(peer.subnet, gateway, device_name, onlink=True),
            Neighbour(gateway, peer.attrs.vtep_mac),
            FdbEntry(peer.attrs.vtep_mac, peer.attrs.public_ip))


def _fdb_rank(peer: Lease) -> tuple[int, int]:
    """Of several leases announcing one VtepMAC, the one with the highest rank has the FDB entry."""
    return peer.mod_revision, int(peer.attrs.public_ip)


def vxlan_sources(own: Lease, peers: Iterable[Lease], config: NetworkConfig) -> frozenset[IPv4Address]:
    """The public IPs VXLAN may come from: every current peer's (overlay.firewall drops the rest).

    Peers reached by a direct route are included too: they may still see us over VXLAN (their
    view of the underlay can differ from ours), and their address is a peer's all the same.
    flannel hosts sharing the etcd hold leases like ours, so they are in this set as well."""
    context = ("vxlan_sources", own.subnet, own.attrs.public_ip, config)
    is_peer = _per_lease(context, peers, lambda peer: _is_peer(peer, own, config))
    return frozenset([peer.attrs.public_ip for peer, peer_ok in is_peer if peer_ok])


# The per-lease memo: for each context (a function and the inputs other than the lease that its
# answer depends on), id(lease) -> (lease, answer). The entry holds the lease, so its id cannot
# be reused while the entry lives, and a hit also checks identity. A context's table is cut back
# to the leases of the latest call once it holds twice as many (leases replaced since), and only
# the most recently used contexts are kept (one host: desired state and VXLAN sources; tests
# and the lab: a few hosts in one process).
_MEMO_CONTEXTS = 8
_memo: dict[tuple, dict[int, tuple]] = {}
_memo_lock = threading.Lock()


def _per_lease(context: tuple, peers: Iterable[Lease], compute: Callable[[Lease], Any]) -> list[tuple[Lease, Any]]:
    """[(peer, compute(peer)) for peer in peers], from the memo where the lease was seen before."""
    with _memo_lock:
        table = _memo.pop(context, None)
        if table is None:
            table = {}
        _memo[context] = table  # now the most recently used
        while len(_memo) > _MEMO_CONTEXTS:
            del _memo[next(iter(_memo))]
    answers = []
    for peer in peers:
        entry = table.get(id(peer))
        if entry is None or entry[0] is not peer:
            entry = table[id(peer)] = (peer, compute(peer))
        answers.append(entry)
    if len(table) > 2 * len(answers) + 64:
        with _memo_lock:
            if _memo.get(context) is table:
                _memo[context] = {id(entry[0]): entry for entry in answers}
    return answers


def _is_peer(peer: Lease, own: Lease, config: NetworkConfig) -> bool:
    return (peer.subnet != own.subnet
            and peer.attrs.public_ip != own.attrs.public_ip  # our own older lease, not a peer
            and peer.attrs.vni == config.backend.vni
            and peer.subnet.subnet_of(config.network)
            and not peer.subnet.overlaps(own.subnet))


def _direct_route_ok(peer: Lease, config: NetworkConfig, underlay: Underlay) -> bool:
    return (config.backend.direct_routing and underlay.network is not None
            and peer.attrs.public_ip in underlay.network)


@dataclass(frozen=True)
class Plan:
    """Ordered changes: device first; then deletes (routes before neighbours and FDB), then
    neighbours and FDB entries, then the routes that use them."""
    create_device: VxlanDevice | None = None
    recreate_device: bool = False            # delete the existing device first
    update_device: VxlanDevice | None = None  # fix MTU, MAC, address or link state in place
    delete_routes: tuple[Route, ...] = ()
    delete_fdb: tuple[FdbEntry, ...] = ()
    delete_neighbours: tuple[Neighbour, ...] = ()
    replace_neighbours: tuple[Neighbour, ...] = ()
    replace_fdb: tuple[FdbEntry, ...] = ()
    replace_routes: tuple[Route, ...] = ()
    # The VXLAN device the neighbour and FDB changes belong to; set by plan() even when the
    # device itself needs no change. Not part of equality: it names the target, not a change.
    device_name: str = field(default="", compare=False)

    @property
    def empty(self) -> bool:
        return not (self.create_device or self.update_device or self.delete_routes
                    or self.delete_fdb or self.delete_neighbours or self.replace_neighbours
                    or self.replace_fdb or self.replace_routes)

    def describe(self) -> list[str]:
        """One line per change, for the log: what changed and why it was needed."""
        lines = []
        if self.create_device:
            verb = "recreate (settings the kernel cannot change differ)" if self.recreate_device else "create"
            lines.append(f"device {self.create_device.name}: {verb}")
        if self.update_device:
            lines.append(f"device {self.update_device.name}: update mtu/mac/address/state")
        lines += [f"route {r.dst} via {r.gateway} dev {r.device}: remove (no such peer)" for r in self.delete_routes]
        lines += [f"fdb {f.mac} dst {f.dst}: remove (no such peer)" for f in self.delete_fdb]
        lines += [f"neighbour {n.ip} lladdr {n.mac}: remove (no such peer)" for n in self.delete_neighbours]
        lines += [f"neighbour {n.ip} lladdr {n.mac}: set" for n in self.replace_neighbours]
        lines += [f"fdb {f.mac} dst {f.dst}: set" for f in self.replace_fdb]
        lines += [f"route {r.dst} via {r.gateway} dev {r.device}: set" for r in self.replace_routes]
        return lines


def plan(desired: DataplaneState, actual: DataplaneState) -> Plan:
    """The changes that turn `actual` into `desired`; empty when they already match."""
    assert desired.device is not None
    create = update = None
    recreate = False
    if actual.device is None:
        create = desired.device
    elif actual.device.immutable_key() != desired.device.immutable_key():
        create, recreate = desired.device, True
    elif actual.device != desired.device:
        update = desired.device
    if create is not None:
        # A new device starts empty: everything has to be programmed again.
        actual = DataplaneState(None)

    delete_routes, replace_routes = _keyed_diff(desired, actual, "routes")
    delete_neighbours, replace_neighbours = _keyed_diff(desired, actual, "neighbours")
    return Plan(
        device_name=desired.device.name,
        create_device=create,
        recreate_device=recreate,
        update_device=update,
        delete_routes=delete_routes,
        delete_fdb=tuple(sorted(actual.fdb - desired.fdb)),
        delete_neighbours=delete_neighbours,
        replace_neighbours=replace_neighbours,
        replace_fdb=tuple(sorted(desired.fdb - actual.fdb)),
        replace_routes=replace_routes,
    )


def _keyed_diff(desired: DataplaneState, actual: DataplaneState, attribute: str) -> tuple[tuple, tuple]:
    """Routes (by destination) or neighbours (by IP): (to delete, to replace), each sorted.

    Delete what actual holds under a key desired has nothing for; replace what desired holds
    unless actual holds exactly it under that key (a route with another gateway is replaced,
    not deleted and added). Both come from the set differences: an item in both states is
    neither deleted (its key is wanted) nor replaced, as long as actual holds only it under its
    key. Should actual hold two under one key (never from desired_state; a kernel could), every
    desired item is compared with the one actual holds last under its key, the plain way.
    """
    wanted, held = getattr(desired, attribute), getattr(actual, attribute)
    added, removed = wanted - held, held - wanted
    _, actual_keys_unique = actual._keys(attribute)
    if removed:
        wanted_keys, _ = desired._keys(attribute)
        deletes = tuple(sorted(item for item in removed if item._key not in wanted_keys))
    else:
        deletes = ()
    if actual_keys_unique:
        replaces = tuple(sorted(added))
    else:
        held_by_key = {item._key: item for item in held}
        replaces = tuple(sorted(item for item in wanted if held_by_key.get(item._key) != item))
    return deletes, replaces


class DesiredTracker:
    """desired_state() and vxlan_sources() for a changing map of peer leases, kept up to date
    one lease at a time, and the plan that takes the kernel from the state of the last commit()
    to the current one, worked out from the changed leases alone.

    The daemon's fast path: when only etcd changed, the kernel holds what the last successful
    reconcile left (the state at commit()), so the changes are exactly plan(now, then). A lease
    event touches one subnet: its route (keyed by the subnet), the neighbours at its network
    address, the FDB entries of its old and new VtepMAC and its public IP in the VXLAN sources.
    plan() matches routes and neighbours per key and FDB entries by value, so outside those keys
    `now` and `then` agree and contribute nothing: plan() over just the touched keys, on both
    sides, is the whole plan, and costs what changed, not what exists. The one case where that
    does not hold is two different neighbours under one address (only leases whose subnets
    overlap each other can ask for that): then pending_plan() says None and the caller diffs the
    whole states. tests/unit/test_dataplane_tracker.py checks all of it against the plain
    functions on random sequences of lease events.

    state() and sources() build the whole values (O(peers)) for the full reconcile, once per
    change at most.
    """

    def __init__(self, own: Lease, config: NetworkConfig, underlay: Underlay, peers: Iterable[Lease] = ()):
        self.own, self.config, self.underlay = own, config, underlay
        self.device = desired_device(own.subnet, config, underlay)
        self._leases: dict[IPv4Network, Lease] = {}
        self._made: dict[IPv4Network, tuple] = {}        # subnet -> (route, neighbour, fdb, source)
        self._routes: dict[IPv4Network, Route] = {}
        self._neighbour_count: dict[Neighbour, int] = {}   # peers asking for each neighbour
        self._neighbours_at: dict[Any, set[Neighbour]] = {}  # address key -> neighbours there
        self._crowded_addresses = 0                         # addresses with more than one neighbour
        self._fdb_candidates: dict[str, dict[IPv4Network, Lease]] = {}  # MAC -> leases announcing it
        self._fdb: dict[str, FdbEntry] = {}                 # MAC -> the entry of the highest rank
        self._source_count: dict[IPv4Address, int] = {}
        # What the keys touched since the last commit() held then (first touch wins).
        self._routes_then: dict[IPv4Network, Route | None] = {}
        self._neighbours_then: dict[Any, frozenset[Neighbour]] = {}
        self._fdb_then: dict[str, FdbEntry | None] = {}
        self._sources_then: dict[IPv4Address, bool] = {}
        self._crowded_then = 0
        self._state: DataplaneState | None = None
        self._sources: frozenset[IPv4Address] | None = None
        for peer in peers:
            self.update(peer.subnet, peer)
        self.commit()

    def matches(self, own: Lease, config: NetworkConfig, underlay: Underlay) -> bool:
        """Whether this tracker was made for these inputs (else make a new one)."""
        return ((own is self.own or own == self.own) and (config is self.config or config == self.config)
                and (underlay is self.underlay or underlay == self.underlay))

    def __len__(self) -> int:
        return len(self._routes)     # peers routed to

    # ------------------------------------------------------------------ changes

    def update(self, subnet: IPv4Network, lease: Lease | None) -> None:
        """The lease of `subnet` is now `lease` (None: gone)."""
        old = self._leases.get(subnet)
        if old is lease or (old is not None and lease is not None and old == lease):
            if lease is not None:
                self._leases[subnet] = lease
            return
        if lease is not None and lease.subnet != subnet:
            raise ValueError(f"lease of {lease.subnet} given for {subnet}")
        was = self._made.pop(subnet, None)
        if was is not None:
            self._withdraw(subnet, *was)
        if lease is None:
            self._leases.pop(subnet, None)
        else:
            self._leases[subnet] = lease
            if _is_peer(lease, self.own, self.config):
                made = (*_peer_contribution(lease, self.config, self.underlay, self.device.name),
                        lease.attrs.public_ip)
                self._made[subnet] = made
                self._add(subnet, lease, *made)
        self._state = None

    def _add(self, subnet, lease, route, neighbour, fdb, source) -> None:
        if route is not None:
            self._routes_then.setdefault(subnet, self._routes.get(subnet))
            self._routes[subnet] = route
        if neighbour is not None:
            key = neighbour._key
            at = self._neighbours_at.get(key)
            self._neighbours_then.setdefault(key, frozenset(at or ()))
            count = self._neighbour_count.get(neighbour, 0)
            self._neighbour_count[neighbour] = count + 1
            if not count:
                if at is None:
                    self._neighbours_at[key] = {neighbour}
                else:
                    at.add(neighbour)
                    if len(at) == 2:
                        self._crowded_addresses += 1
        if fdb is not None:
            self._fdb_touch(fdb.mac)
            self._fdb_candidates.setdefault(fdb.mac, {})[subnet] = lease
            self._fdb_choose(fdb.mac)
        if source is not None:
            self._sources_then.setdefault(source, source in self._source_count)
            self._source_count[source] = self._source_count.get(source, 0) + 1
            self._sources = None

    def _withdraw(self, subnet, route, neighbour, fdb, source) -> None:
        if route is not None:
            self._routes_then.setdefault(subnet, self._routes.get(subnet))
            del self._routes[subnet]
        if neighbour is not None:
            key = neighbour._key
            at = self._neighbours_at[key]
            self._neighbours_then.setdefault(key, frozenset(at))
            count = self._neighbour_count[neighbour] - 1
            if count:
                self._neighbour_count[neighbour] = count
            else:
                del self._neighbour_count[neighbour]
                at.discard(neighbour)
                if len(at) == 1:
                    self._crowded_addresses -= 1
                elif not at:
                    del self._neighbours_at[key]
        if fdb is not None:
            self._fdb_touch(fdb.mac)
            candidates = self._fdb_candidates[fdb.mac]
            del candidates[subnet]
            if not candidates:
                del self._fdb_candidates[fdb.mac]
            self._fdb_choose(fdb.mac)
        if source is not None:
            self._sources_then.setdefault(source, True)
            count = self._source_count[source] - 1
            if count:
                self._source_count[source] = count
            else:
                del self._source_count[source]
            self._sources = None

    def _fdb_touch(self, mac: str) -> None:
        if mac not in self._fdb_then:
            self._fdb_then[mac] = self._fdb.get(mac)

    def _fdb_choose(self, mac: str) -> None:
        candidates = self._fdb_candidates.get(mac)
        if not candidates:
            self._fdb.pop(mac, None)
            return
        winner = max(candidates.values(), key=_fdb_rank) if len(candidates) > 1 else next(iter(candidates.values()))
        entry = self._made[winner.subnet][2]
        self._fdb[mac] = entry

    def commit(self) -> None:
        """The kernel now holds the current state: later plans start from here."""
        self._routes_then.clear()
        self._neighbours_then.clear()
        self._fdb_then.clear()
        self._sources_then.clear()
        self._crowded_then = self._crowded_addresses

    # ------------------------------------------------------------------ questions

    def state(self) -> DataplaneState:
        """desired_state() of the current leases (the same value)."""
        if self._state is None:
            self._state = DataplaneState(self.device, frozenset(self._neighbour_count), frozenset(self._fdb.values()),
                                         frozenset(self._routes.values()))
        return self._state

    def sources(self) -> frozenset[IPv4Address]:
        """vxlan_sources() of the current leases (the same value)."""
        if self._sources is None:
            self._sources = frozenset(self._source_count)
        return self._sources

    def committed_state(self) -> DataplaneState:
        """The state as of the last commit()."""
        now = self.state()
        if not (self._routes_then or self._neighbours_then or self._fdb_then):
            return now
        touched_now, touched_then = self._touched()
        return DataplaneState(
            self.device,
            (now.neighbours - touched_now.neighbours) | touched_then.neighbours,
            (now.fdb - touched_now.fdb) | touched_then.fdb,
            (now.routes - touched_now.routes) | touched_then.routes)

    def pending_plan(self) -> Plan | None:
        """plan(self.state(), self.committed_state()), from the touched keys alone; None when two
        neighbours share an address, now or at the last commit (then diff the whole states)."""
        if self._crowded_addresses or self._crowded_then:
            return None
        now, then = self._touched()
        return plan(now, then)

    def pending_sources(self) -> tuple[frozenset[IPv4Address], frozenset[IPv4Address]]:
        """(added, removed): how sources() differs from what it was at the last commit()."""
        added = frozenset(ip for ip, was in self._sources_then.items() if not was and ip in self._source_count)
        removed = frozenset(ip for ip, was in self._sources_then.items() if was and ip not in self._source_count)
        return added, removed

    def wants(self, item: Route | Neighbour | FdbEntry) -> bool:
        """Whether the current state holds this route, neighbour or FDB entry."""
        if isinstance(item, Route):
            return self._routes.get(item.dst) == item
        if isinstance(item, Neighbour):
            return item in self._neighbour_count
        return self._fdb.get(item.mac) == item

    def wants_neighbour_at(self, ip: IPv4Address) -> bool:
        """Whether the current state holds a neighbour (any MAC) at this address."""
        return _address_key(ip) in self._neighbours_at

    def _touched(self) -> tuple[DataplaneState, DataplaneState]:
        """(now, then): the current and committed states restricted to the touched keys."""
        routes_now = frozenset(self._routes[s] for s in self._routes_then if s in self._routes)
        routes_then = frozenset(r for r in self._routes_then.values() if r is not None)
        neighbours_now = frozenset(n for key in self._neighbours_then for n in self._neighbours_at.get(key, ()))
        neighbours_then = frozenset(n for at in self._neighbours_then.values() for n in at)
        fdb_now = frozenset(self._fdb[mac] for mac in self._fdb_then if mac in self._fdb)
        fdb_then = frozenset(f for f in self._fdb_then.values() if f is not None)
        return (DataplaneState(self.device, neighbours_now, fdb_now, routes_now),
                DataplaneState(self.device, neighbours_then, fdb_then, routes_then))
