"""The CNI side's netlink boundary: the bridge, veth pairs and container addresses, via pyroute2.

Design note
-----------
This is the only CNI module that talks to the kernel; it translates pyroute2's `NetlinkError`
into our domain exceptions (`KernelFailure`, `InterfaceConflict`, `ContainerNotFound`) and makes
every operation idempotent: a delete of something absent succeeds, an address or route is
replaced rather than added.

The service runs in the host's network namespace, in many threads at once. To work inside a
container's namespace it does not use `IPRoute(netns=...)`, which forks a helper process per
socket (slow, and unwise in a threaded daemon). `setns(2)` with CLONE_NEWNET changes the namespace
of the calling thread only, and a netlink socket stays bound to the namespace it was created in;
so `container_netlink` switches this thread into the container's namespace, opens one netlink
socket, and switches straight back, before anything else runs on the thread. Everything after
that is plain netlink over that socket.

The container end of the veth pair is created directly in the container's namespace under its
final name (the peer attributes carry IFLA_NET_NS_FD and IFLA_IFNAME), so no temporary name, move
or rename exists that a failure could leave behind. Its MAC is derived from its IPv4 address
(0a:58:<address>), so a reused address keeps its MAC and neighbours' ARP caches stay right.
"""

from __future__ import annotations

import ctypes
import errno
import os
import socket
import threading
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Interface

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from cni.errors import ContainerNotFound, InterfaceConflict, KernelFailure

_CLONE_NEWNET = 0x40000000
_NETLINK_ROUTE = 0
_libc = ctypes.CDLL(None, use_errno=True)


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


def _kernel_error(action: str, exc: NetlinkError) -> KernelFailure:
    return KernelFailure(f"{action}: {os.strerror(exc.code)} (errno {exc.code})")


def _setns(fd: int) -> None:
    if _libc.setns(fd, _CLONE_NEWNET) != 0:
        code = ctypes.get_errno()
        raise KernelFailure(f"setns: {os.strerror(code)}")


def open_netns(path: str) -> int:
    """An fd on the container's namespace; ContainerNotFound when the path does not name one."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        raise ContainerNotFound(f"network namespace {path} does not exist") from None
    except OSError as exc:
        raise ContainerNotFound(f"cannot open network namespace {path}: {exc.strerror}") from None
    return fd


def host_netlink() -> IPRoute:
    # groups=0: a request/response socket; subscribing to events would fill its buffer.
    return IPRoute(groups=0)


def container_netlink(netns_fd: int) -> IPRoute:
    """An IPRoute whose socket lives in the namespace `netns_fd` (see the design note)."""
    home = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    try:
        try:
            _setns(netns_fd)
        except KernelFailure as exc:
            raise ContainerNotFound(f"the network namespace cannot be entered: {exc.msg}") from None
        try:
            sock = socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM, _NETLINK_ROUTE)
        finally:
            # If this fails the thread is in the wrong namespace for good: let it die loudly
            # (the service runs each request on a thread of its own).
            _setns(home)
    finally:
        os.close(home)
    return IPRoute(groups=0, fileno=sock.detach())


def _link_state(message) -> LinkState:
    kind = None
    info = message.get_attr("IFLA_LINKINFO")
    if info is not None:
        kind = info.get_attr("IFLA_INFO_KIND")
    return LinkState(
        index=message["index"],
        name=message.get_attr("IFLA_IFNAME"),
        mac=message.get_attr("IFLA_ADDRESS"),
        mtu=message.get_attr("IFLA_MTU"),
        up=bool(message["flags"] & 1),
        master=message.get_attr("IFLA_MASTER"),
        kind=kind,
    )


class Links:
    """Operations on one namespace's links, over one netlink socket."""

    def __init__(self, ipr: IPRoute):
        self.ipr = ipr

    def close(self) -> None:
        self.ipr.close()

    def __enter__(self) -> "Links":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    # ---- reading

    def link(self, name: str) -> LinkState | None:
        try:
            messages = tuple(self.ipr.link("get", ifname=name))
        except NetlinkError as exc:
            if exc.code in (errno.ENODEV, errno.ENOENT):
                return None
            raise _kernel_error(f"looking up {name}", exc) from None
        return _link_state(messages[0]) if messages else None

    def links(self) -> list[LinkState]:
        try:
            return [_link_state(m) for m in self.ipr.get_links()]
        except NetlinkError as exc:
            raise _kernel_error("listing links", exc) from None

    def addresses(self, index: int) -> set[IPv4Interface]:
        try:
            messages = self.ipr.get_addr(family=socket.AF_INET, index=index)
            return {IPv4Interface((m.get_attr("IFA_ADDRESS"), m["prefixlen"])) for m in messages}
        except NetlinkError as exc:
            raise _kernel_error("listing addresses", exc) from None

    def default_gateways(self, index: int) -> set[IPv4Address]:
        try:
            messages = self.ipr.get_routes(family=socket.AF_INET, oif=index, table=254)
        except NetlinkError as exc:
            raise _kernel_error("listing routes", exc) from None
        return {IPv4Address(m.get_attr("RTA_GATEWAY")) for m in messages
                if m["dst_len"] == 0 and m.get_attr("RTA_GATEWAY") and m.get_attr("RTA_OIF") == index}

    # ---- changing

    def ensure_bridge(self, name: str, gateway: IPv4Interface, mtu: int) -> LinkState:
        """The bridge exists, is up, has the gateway address and MTU; returns its state."""
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
        return bridge

    def create_veth(self, host_name: str, host_mac: str, bridge_index: int, peer_name: str, netns_fd: int,
                    mtu: int, peer_mac: str) -> None:
        """Both ends in one request: the host end already on the bridge and up, the container end
        in the container's namespace under its final name (down; the caller configures it)."""
        try:
            self.ipr.link("add", ifname=host_name, kind="veth", mtu=mtu, address=host_mac, master=bridge_index,
                          state="up",
                          peer={"ifname": peer_name, "net_ns_fd": netns_fd, "mtu": mtu, "address": peer_mac})
        except NetlinkError as exc:
            if exc.code == errno.EEXIST:
                raise LinkExists(f"{peer_name} already exists in the container or {host_name} on the host") from None
            raise _kernel_error(f"creating veth {host_name}", exc) from None

    def attach(self, index: int, bridge_index: int) -> None:
        try:
            self.ipr.link("set", index=index, master=bridge_index, state="up")
        except NetlinkError as exc:
            raise _kernel_error("attaching the host veth to the bridge", exc) from None

    def configure_container_side(self, name: str, address: IPv4Interface, gateway: IPv4Address) -> LinkState:
        """Address, up, default route via the gateway; idempotent (replace, not add)."""
        link = self.link(name)
        if link is None:
            raise KernelFailure(f"{name} vanished from the container while it was being set up")
        try:
            self.ipr.addr("replace", index=link.index, address=str(address.ip), prefixlen=address.network.prefixlen)
            if not link.up:
                self.ipr.link("set", index=link.index, state="up")
            self.ipr.route("replace", dst="0.0.0.0/0", gateway=str(gateway), oif=link.index)
        except NetlinkError as exc:
            raise _kernel_error(f"configuring {name} in the container", exc) from None
        return link

    def delete(self, name: str) -> bool:
        """Delete a link by name; True when it existed. Deleting one end of a veth removes both."""
        try:
            self.ipr.link("del", ifname=name)
            return True
        except NetlinkError as exc:
            if exc.code in (errno.ENODEV, errno.ENOENT):
                return False
            raise _kernel_error(f"deleting {name}", exc) from None


_bridge_lock = threading.Lock()


def bridge_lock() -> threading.Lock:
    """Serialises bridge set-up between the service's threads (creation is check-then-act)."""
    return _bridge_lock
