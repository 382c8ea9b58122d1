"""The CNI side's netlink boundary: the bridge, veth pairs and container addresses.

Design note
-----------
This is the only CNI module that talks to the kernel. The requests of the hot path (ADD, DEL,
CHECK) go over sockets of our own with hand-packed messages (cni.rtnl: pyroute2's generic codec
cost more Python time per message than the kernel takes to do the work, and the service's
threads share one GIL); the rare, rich ones (bridge set-up, a moved workload's neighbour and
routes) over pyroute2. It translates both kinds of netlink error
into our domain exceptions (`KernelFailure`, `InterfaceConflict`, `ContainerNotFound`) and makes
every operation idempotent: a delete of something absent succeeds, an address or route is
replaced rather than added.

The service runs in the host's network namespace, in many threads at once. To work inside a
container's namespace it does not use `IPRoute(netns=...)`, which forks a helper process per
socket (slow, and unwise in a threaded daemon). `setns(2)` with CLONE_NEWNET changes the namespace
of the calling thread only, and a netlink socket stays bound to the namespace it was created in;
so `container_links` switches this thread into the container's namespace, opens one netlink
socket, and switches straight back, before anything else runs on the thread. Everything after
that is plain netlink over that socket.

The container end of the veth pair is created directly in the container's namespace under its
final name (the peer attributes carry IFLA_NET_NS_FD and IFLA_IFNAME), so no temporary name,
move or rename exists that a failure could leave behind; the container side is then one lookup
and one write (address, link up, default route, applied by the kernel in that order). Its MAC is derived from its IPv4 address
(0a:58:<address>), so a reused address keeps its MAC and neighbours' ARP caches stay right.

A moved workload (an address of another host's subnet, see overlay.moves) is attached Calico
style, so nothing inside it depends on a bridge: the host end of its veth stays off the bridge,
the container gets its address as a /32, a link-scope route to MOVED_GATEWAY (169.254.1.1, an
address no host has) and a default route via it, and a permanent neighbour entry mapping
MOVED_GATEWAY to the host end's MAC, so the container never even has to ARP for its gateway.
(The host end also answers ARP by proxy, as a fallback should that entry be removed.) The host
routes the address to the host end with a /32 of protocol CNI_ROUTE_PROTOCOL; the kernel
removes that route with the veth.

The bridge answers ARP by proxy (proxy_arp, with no proxy delay) for the addresses it routes
through another device: those are exactly the moved-away addresses of its own subnet, whose /32
goes to the VXLAN device. Containers still on the bridge see them as on-link in their /24 and
ARP for them; the bridge's answer brings their packets up to the host and on to the claimant.
Every other address of the subnet is routed onto the bridge itself and gets no proxy answer.
"""

from __future__ import annotations

import errno
import os
import socket
import threading
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Interface

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from cni import rtnl
from cni.errors import ContainerNotFound, InterfaceConflict, KernelFailure
from cni.rtnl import NamespaceFailure, NetlinkFailure, RtnlSocket

MOVED_GATEWAY = IPv4Address("169.254.1.1")
# Routes the CNI service makes to moved containers' veths carry this protocol number: not the
# daemon's 211 (whose reconcile removes every route of its number it did not compute), and named
# by no entry of /etc/iproute2/rt_protos either. `ip route show proto 212` lists them.
CNI_ROUTE_PROTOCOL = 212
_NUD_PERMANENT = 0x80


def mac_for(address: IPv4Address, prefix: str = "0a:58") -> str:
    """A locally administered MAC carrying the IPv4 address, as OVN-Kubernetes does (0a:58:...).
    The host end of a container's veth uses 0a:59 with the container's address."""
    return prefix + ":" + ":".join(f"{b:02x}" for b in address.packed)


class LinkExists(InterfaceConflict):
    """A link of the requested name exists already (the caller finds out which one)."""


@dataclass(frozen=True)
class LinkState:
    index: int
    name: str
    mac: str
    mtu: int
    up: bool
    master: int | None
    kind: str | None


def _kernel_error(action: str, exc) -> KernelFailure:
    detail = f" ({exc.detail})" if getattr(exc, "detail", "") else ""
    return KernelFailure(f"{action}: {os.strerror(exc.code)}{detail} (errno {exc.code})")


def open_netns(path: str) -> int:
    """An fd on the container's namespace; ContainerNotFound when the path does not name one."""
    try:
        # O_NONBLOCK: a path naming a FIFO must not hang the call (setns refuses it next).
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
    except FileNotFoundError:
        raise ContainerNotFound(f"network namespace {path} does not exist") from None
    except OSError as exc:
        raise ContainerNotFound(f"cannot open network namespace {path}: {exc.strerror}") from None
    return fd


def write_sysctl(path: str, value: str) -> None:
    """Write /proc/sys/<path> in the calling thread's network namespace (the host's, for the
    service: /proc/sys/net follows the namespace of the thread that opens the file)."""
    try:
        with open(f"/proc/sys/{path}", "w") as sysctl:
            sysctl.write(value)
    except OSError as exc:
        raise KernelFailure(f"cannot set {path.replace('/', '.')} to {value}: {exc.strerror}") from None


def host_links() -> "Links":
    """Links of the calling thread's namespace (the host's, for the service)."""
    return Links(None)


def container_links(netns_fd: int) -> "Links":
    """Links of the container's namespace `netns_fd` (see the design note)."""
    return Links(netns_fd)


def _link_state(fields: dict) -> LinkState:
    return LinkState(**fields)


_GONE = (errno.ENODEV, errno.ENOENT)


class Links:
    """Operations on one namespace's links.

    The hot path (ADD, DEL, CHECK) goes over a socket of our own with hand-packed messages
    (cni.rtnl); the rare, rich requests (bridge set-up, a moved workload's routes and neighbour)
    over a pyroute2 IPRoute, created only when one of them is needed."""

    def __init__(self, netns_fd: int | None = None):
        self.netns_fd = netns_fd
        try:
            self.rtnl = RtnlSocket(netns_fd)
        except NamespaceFailure as exc:
            raise ContainerNotFound(f"the network namespace cannot be entered: {exc}") from None
        except OSError as exc:
            raise KernelFailure(f"cannot open a netlink socket: {exc}") from None
        self._ipr = None

    @property
    def ipr(self) -> IPRoute:
        if self._ipr is None:
            if self.netns_fd is None:
                # groups=0: a request/response socket; subscribing to events would fill its buffer.
                self._ipr = IPRoute(groups=0)
            else:
                # A plain socket for pyroute2 (it wants SOCK_DGRAM and its own options).
                try:
                    plain = rtnl.in_netns(self.netns_fd, lambda: socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM,
                                                                                rtnl.NETLINK_ROUTE))
                except NamespaceFailure as exc:
                    raise ContainerNotFound(f"the network namespace cannot be entered: {exc}") from None
                self._ipr = IPRoute(groups=0, fileno=plain.detach())
        return self._ipr

    def close(self) -> None:
        self.rtnl.close()
        if self._ipr is not None:
            self._ipr.close()

    def __enter__(self) -> "Links":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    # ---- reading

    def link(self, name: str) -> LinkState | None:
        try:
            return _link_state(rtnl.parse_link(self.rtnl.get(rtnl.get_link_request(name))))
        except NetlinkFailure as exc:
            if exc.code in _GONE:
                return None
            raise _kernel_error(f"looking up {name}", exc) from None
        except OSError as exc:
            raise KernelFailure(f"looking up {name}: {exc}") from None

    def links(self) -> list[LinkState]:
        try:
            return [_link_state(rtnl.parse_link(body))
                    for body in self.rtnl.dump(rtnl.RTM_GETLINK, rtnl.link_dump_header())]
        except NetlinkFailure as exc:
            raise _kernel_error("listing links", exc) from None

    def addresses(self, index: int) -> set[IPv4Interface]:
        try:
            bodies = self.rtnl.dump(rtnl.RTM_GETADDR, rtnl.address_dump_header())
        except NetlinkFailure as exc:
            raise _kernel_error("listing addresses", exc) from None
        found = set()
        for body in bodies:
            owner, packed, prefixlen = rtnl.parse_address(body)
            if owner == index and packed is not None and len(packed) == 4:
                found.add(IPv4Interface((IPv4Address(packed), prefixlen)))
        return found

    def _main_routes(self) -> list[dict]:
        try:
            routes = [rtnl.parse_route(body) for body in self.rtnl.dump(rtnl.RTM_GETROUTE, rtnl.route_dump_header())]
        except NetlinkFailure as exc:
            raise _kernel_error("listing routes", exc) from None
        return [route for route in routes if route["table"] == rtnl.RT_TABLE_MAIN]

    def default_gateways(self, index: int) -> set[IPv4Address]:
        return {IPv4Address(r["gateway"]) for r in self._main_routes()
                if r["dst_len"] == 0 and r["gateway"] and r["oif"] == index}

    # ---- changing

    def ensure_bridge(self, name: str, gateway: IPv4Interface, mtu: int) -> LinkState:
        """The bridge exists, is up, has the gateway address and MTU, answers ARP by proxy for
        moved-away addresses; returns its state."""
        bridge = self.link(name)
        if bridge is not None and bridge.kind != "bridge":
            raise KernelFailure(f"{name} exists but is a {bridge.kind or 'plain'} device, not a bridge")
        try:
            if bridge is None:
                try:
                    # A fixed MAC: a bridge otherwise takes the lowest MAC of its ports and
                    # changes it as containers come and go, flushing every neighbour's ARP entry.
                    self.ipr.link("add", ifname=name, kind="bridge", address=mac_for(gateway.ip), mtu=mtu)
                except NetlinkError as exc:
                    if exc.code != errno.EEXIST:     # another thread won the race: fine
                        raise
                bridge = self.link(name)
            if bridge.mtu != mtu or not bridge.up:
                self.ipr.link("set", index=bridge.index, mtu=mtu, state="up")
            if gateway not in self.addresses(bridge.index):
                self.ipr.addr("replace", index=bridge.index, address=str(gateway.ip), prefixlen=gateway.network.prefixlen)
        except NetlinkError as exc:
            raise _kernel_error(f"setting up bridge {name}", exc) from None
        # Answer ARP for moved-away addresses of the subnet at once (see the design note); a
        # proxy answer is otherwise delayed by up to proxy_delay (0.8 s).
        write_sysctl(f"net/ipv4/neigh/{name}/proxy_delay", "0")
        write_sysctl(f"net/ipv4/conf/{name}/proxy_arp", "1")
        return bridge

    def create_veth(self, host_name: str, host_mac: str, bridge_index: int | None, peer_name: str, netns_fd: int,
                    mtu: int, peer_mac: str) -> None:
        """Both ends in one request: the host end already on the bridge (if one is given) and
        up, the container end in the container's namespace under its final name (down; the
        caller configures it)."""
        try:
            self.rtnl.check(rtnl.veth_request(host_name, host_mac, mtu, bridge_index, peer_name, netns_fd, peer_mac))
        except NetlinkFailure as exc:
            if exc.code == errno.EEXIST:
                raise LinkExists(f"{peer_name} already exists in the container or {host_name} on the host") from None
            raise _kernel_error(f"creating veth {host_name}", exc) from None

    def attach(self, index: int, bridge_index: int) -> None:
        try:
            self.rtnl.check(rtnl.set_link_request(index, up=True, master=bridge_index))
        except NetlinkFailure as exc:
            raise _kernel_error("attaching the host veth to the bridge", exc) from None

    def configure_container_side(self, name: str, address: IPv4Interface, gateway: IPv4Address) -> LinkState:
        """Address, up, default route via the gateway; idempotent (replace, not add). One
        lookup, then the changes in a single write (the kernel applies them in order)."""
        link = self.link(name)
        if link is None:
            raise KernelFailure(f"{name} vanished from the container while it was being set up")
        requests = [rtnl.replace_address_request(link.index, address.ip.packed, address.network.prefixlen)]
        if not link.up:
            requests.append(rtnl.set_link_request(link.index, up=True))
        requests.append(rtnl.replace_default_route_request(gateway.packed, link.index))
        try:
            self.rtnl.check(*requests)
        except NetlinkFailure as exc:
            raise _kernel_error(f"configuring {name} in the container", exc) from None
        return link

    def configure_moved_container_side(self, name: str, address: IPv4Address, host_mac: str) -> LinkState:
        """A moved workload's side: address/32, up, MOVED_GATEWAY on-link with a permanent
        neighbour entry for it, default route via it; idempotent."""
        link = self.link(name)
        if link is None:
            raise KernelFailure(f"{name} vanished from the container while it was being set up")
        try:
            self.ipr.addr("replace", index=link.index, address=str(address), prefixlen=32)
            if not link.up:
                self.ipr.link("set", index=link.index, state="up")
            self.ipr.neigh("replace", ifindex=link.index, dst=str(MOVED_GATEWAY), lladdr=host_mac,
                           state=_NUD_PERMANENT)
            self.ipr.route("replace", dst=f"{MOVED_GATEWAY}/32", oif=link.index, scope=253)   # scope link
            self.ipr.route("replace", dst="0.0.0.0/0", gateway=str(MOVED_GATEWAY), oif=link.index)
        except NetlinkError as exc:
            raise _kernel_error(f"configuring {name} in the container", exc) from None
        return link

    def route_to_container(self, address: IPv4Address, index: int) -> None:
        """<address>/32 dev <host end>, scope link, our CNI route protocol; and proxy ARP on the
        host end (the fallback for the container's gateway, see the design note)."""
        try:
            self.ipr.route("replace", dst=f"{address}/32", oif=index, scope=253, proto=CNI_ROUTE_PROTOCOL)
        except NetlinkError as exc:
            raise _kernel_error(f"routing {address} to its veth", exc) from None

    def proxy_arp(self, name: str) -> None:
        write_sysctl(f"net/ipv4/neigh/{name}/proxy_delay", "0")
        write_sysctl(f"net/ipv4/conf/{name}/proxy_arp", "1")

    def routes_to(self, address: IPv4Address) -> list[tuple[int, int]]:
        """(oif, protocol) of each main-table route whose destination is exactly address/32."""
        # A dump filtered here: a `dst=` request would be a FIB lookup, which reports no protocol.
        return [(r["oif"], r["protocol"]) for r in self._main_routes()
                if r["dst_len"] == 32 and r["dst"] == address.packed]

    def delete(self, name: str) -> bool:
        """Delete a link by name; True when it existed. Deleting one end of a veth removes both."""
        try:
            self.rtnl.check(rtnl.del_link_request(name))
            return True
        except NetlinkFailure as exc:
            if exc.code in _GONE:
                return False
            raise _kernel_error(f"deleting {name}", exc) from None


_bridge_lock = threading.Lock()


def bridge_lock() -> threading.Lock:
    """Serialises bridge set-up between the service's threads (creation is check-then-act)."""
    return _bridge_lock
