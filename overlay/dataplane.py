"""The VXLAN data plane as pure data: what we want, and the plan that gets the kernel there.

`desired_state()` turns (own lease, peer leases, config, underlay) into the exact device,
neighbours, FDB entries and routes wanted, the way flannel programs them per peer:

    neighbour  peer subnet network address -> peer VtepMAC          (permanent, on the device)
    fdb        peer VtepMAC -> dst peer PublicIP                    (self, permanent)
    route      peer subnet via peer network address, onlink, dev <vxlan device>

`plan()` diffs desired against the actual state read from the kernel into an ordered `Plan`.
Neither function does I/O; the netlink layer (overlay.kernel) reads actual state and applies a
plan, and is the only code that talks to the kernel.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv4Interface, IPv4Network
from typing import Iterable

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


@dataclass(frozen=True, order=True)
class Neighbour:
    ip: IPv4Address
    mac: str


@dataclass(frozen=True, order=True)
class FdbEntry:
    mac: str
    dst: IPv4Address


@dataclass(frozen=True, order=True)
class Route:
    dst: IPv4Network
    gateway: IPv4Address
    device: str
    onlink: bool = True


@dataclass(frozen=True)
class DataplaneState:
    device: VxlanDevice | None
    neighbours: frozenset[Neighbour] = frozenset()
    fdb: frozenset[FdbEntry] = frozenset()
    routes: frozenset[Route] = frozenset()


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
    usable = [peer for peer in peers if _is_peer(peer, own, config)]

    # One FDB entry per MAC: should two leases ever announce the same VtepMAC with different
    # public IPs, the newest write wins rather than the kernel keeping whichever came first.
    newest_by_mac: dict[str, Lease] = {}
    neighbours, routes = set(), set()
    for peer in sorted(usable, key=lambda lease: lease.mod_revision):
        gateway = peer.subnet.network_address
        if _direct_route_ok(peer, config, underlay):
            routes.add(Route(peer.subnet, peer.attrs.public_ip, underlay.iface, onlink=False))
            continue
        newest_by_mac[peer.attrs.vtep_mac] = peer
        neighbours.add(Neighbour(gateway, peer.attrs.vtep_mac))
        routes.add(Route(peer.subnet, gateway, device.name, onlink=True))
    fdb = {FdbEntry(mac, lease.attrs.public_ip) for mac, lease in newest_by_mac.items()}
    return DataplaneState(device, frozenset(neighbours), frozenset(fdb), frozenset(routes))


def vxlan_sources(own: Lease, peers: Iterable[Lease], config: NetworkConfig) -> frozenset[IPv4Address]:
    """The public IPs VXLAN may come from: every current peer's (overlay.firewall drops the rest).

    Peers reached by a direct route are included too: they may still see us over VXLAN (their
    view of the underlay can differ from ours), and their address is a peer's all the same.
    flannel hosts sharing the etcd hold leases like ours, so they are in this set as well."""
    return frozenset(peer.attrs.public_ip for peer in peers if _is_peer(peer, own, config))


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

    routes_by_dst = {route.dst: route for route in actual.routes}
    neighbours_by_ip = {n.ip: n for n in actual.neighbours}
    desired_route_dsts = {route.dst for route in desired.routes}
    desired_neighbour_ips = {n.ip for n in desired.neighbours}
    return Plan(
        device_name=desired.device.name,
        create_device=create,
        recreate_device=recreate,
        update_device=update,
        delete_routes=tuple(sorted(r for r in actual.routes if r.dst not in desired_route_dsts)),
        delete_fdb=tuple(sorted(actual.fdb - desired.fdb)),
        delete_neighbours=tuple(sorted(n for n in actual.neighbours if n.ip not in desired_neighbour_ips)),
        replace_neighbours=tuple(sorted(n for n in desired.neighbours if neighbours_by_ip.get(n.ip) != n)),
        replace_fdb=tuple(sorted(desired.fdb - actual.fdb)),
        replace_routes=tuple(sorted(r for r in desired.routes if routes_by_dst.get(r.dst) != r)),
    )
