"""overlay.kernel against the real kernel: VXLAN between network namespaces.

Each test gets a fresh lab: a "switch" namespace holding a bridge, and two or three "host"
namespaces, each joined to the bridge by a veth pair (host side eth0, 198.18.200.<n>/24, default
route via 198.18.200.254). Every namespace is named ovl-kt-<random>-..., and all of them are
removed afterwards, also when a test fails; nothing is created in the root namespace.

The hosts are programmed the way the daemon does it: Kernel.apply(plan(desired_state(...),
Kernel.read_state(...))), from hand-made leases. End states are checked through Kernel.read_state
and, where it matters, independently through iproute2's own view (ip, bridge).
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import threading
import time
import uuid
from dataclasses import replace
from ipaddress import IPv4Address, IPv4Network

import pytest

from overlay.config import NetworkConfig, VxlanBackend
from overlay.dataplane import DataplaneState, desired_state, plan, vtep_mac
from overlay.errors import DeviceNotFound, KernelError
from overlay.kernel import ROUTE_PROTOCOL, Kernel
from overlay.lease import Lease, LeaseAttrs

DEVICE = "flannel.1"
CONFIG = NetworkConfig(IPv4Network("10.244.0.0/16"), 24, IPv4Address("10.244.1.0"),
                       IPv4Address("10.244.255.0"), VxlanBackend(vni=1, port=8472))


def sh(*argv: str, check: bool = True) -> str:
    done = subprocess.run(argv, capture_output=True, text=True, timeout=30)
    if check and done.returncode != 0:
        raise AssertionError(f"{' '.join(argv)} failed: {done.stderr.strip()}")
    return done.stdout


def in_ns(ns: str, *argv: str, check: bool = True) -> str:
    return sh("ip", "netns", "exec", ns, *argv, check=check)


def wait_for(condition, timeout: float = 10.0, what: str = "condition"):
    """Poll instead of sleeping: the test machines are small and noisy."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.05)


class Host:
    """One simulated host: its namespace, its Kernel and its lease."""

    def __init__(self, ns: str, number: int):
        self.ns = ns
        self.public_ip = IPv4Address(f"198.18.200.{number}")
        self.subnet = IPv4Network(f"10.244.{number}.0/24")
        self.kernel = Kernel(ns)
        self.underlay = self.kernel.underlay(None, None)
        self.lease = lease(self.subnet, self.public_ip)

    def desired(self, peers, config: NetworkConfig = CONFIG) -> DataplaneState:
        return desired_state(self.lease, [peer.lease if isinstance(peer, Host) else peer for peer in peers],
                             config, self.underlay)

    def converge(self, peers, config: NetworkConfig = CONFIG) -> DataplaneState:
        wanted = self.desired(peers, config)
        self.kernel.apply(plan(wanted, self.kernel.read_state(wanted.device.name)))
        return wanted

    def ip(self, *argv: str, check: bool = True) -> str:
        return sh("ip", "-n", self.ns, *argv, check=check)


def lease(subnet: IPv4Network, public_ip: IPv4Address, mac: str | None = None, revision: int = 1) -> Lease:
    return Lease(subnet, LeaseAttrs(public_ip, 1, mac or vtep_mac(public_ip, 1)), lease_id=1,
                 mod_revision=revision)


@pytest.fixture
def lab():
    """A factory of hosts on one bridged underlay; every namespace it made is removed at the end."""
    prefix = f"ovl-kt-{uuid.uuid4().hex[:6]}"
    switch = f"{prefix}-sw"
    made: list[str] = []
    hosts: list[Host] = []

    def add_host() -> Host:
        number = len(hosts) + 1
        ns = f"{prefix}-h{number}"
        sh("ip", "netns", "add", ns)
        made.append(ns)
        sh("ip", "-n", switch, "link", "add", f"port{number}", "type", "veth", "peer", "name", "eth0",
           "netns", ns)
        sh("ip", "-n", switch, "link", "set", f"port{number}", "master", "br0", "up")
        sh("ip", "-n", ns, "addr", "add", f"198.18.200.{number}/24", "dev", "eth0")
        sh("ip", "-n", ns, "link", "set", "eth0", "up")
        sh("ip", "-n", ns, "link", "set", "lo", "up")
        sh("ip", "-n", ns, "route", "add", "default", "via", "198.18.200.254")
        host = Host(ns, number)
        hosts.append(host)
        return host

    try:
        sh("ip", "netns", "add", switch)
        made.append(switch)
        sh("ip", "-n", switch, "link", "add", "br0", "type", "bridge")
        sh("ip", "-n", switch, "link", "set", "br0", "up")
        yield add_host
    finally:
        for host in hosts:
            host.kernel.close()
        for ns in reversed(made):
            sh("ip", "netns", "del", ns, check=False)


def fdb_entries(host: Host) -> set[tuple[str, str]]:
    """(mac, dst) of the device's remotes as `bridge fdb` shows them."""
    out = sh("bridge", "-n", host.ns, "-j", "fdb", "show", "dev", DEVICE)
    return {(entry["mac"], entry["dst"]) for entry in json.loads(out or "[]") if "dst" in entry}


def our_routes(host: Host) -> set[str]:
    out = host.ip("-j", "route", "show", "proto", str(ROUTE_PROTOCOL))
    return {route["dst"] for route in json.loads(out or "[]")}


# ---------------------------------------------------------------------- convergence


def test_two_hosts_converge_and_a_second_pass_changes_nothing(lab):
    a, b = lab(), lab()
    wanted_a = a.converge([b])
    wanted_b = b.converge([a])

    assert a.kernel.read_state(DEVICE) == wanted_a
    assert b.kernel.read_state(DEVICE) == wanted_b
    assert plan(wanted_a, a.kernel.read_state(DEVICE)).empty
    # The kernel agrees, in iproute2's words: flannel's per-peer triple.
    assert our_routes(a) == {"10.244.2.0/24"}
    route = json.loads(a.ip("-j", "route", "show", "10.244.2.0/24"))[0]
    assert route["gateway"] == "10.244.2.0" and route["dev"] == DEVICE and "onlink" in route["flags"]
    assert fdb_entries(a) == {(b.lease.attrs.vtep_mac, "198.18.200.2")}
    details = json.loads(a.ip("-d", "-j", "link", "show", DEVICE))[0]
    vxlan = details["linkinfo"]["info_data"]
    assert (vxlan["id"], vxlan["port"], vxlan["local"], vxlan["learning"]) == (1, 8472, "198.18.200.1", False)
    assert details["mtu"] == 1450 and details["address"] == a.lease.attrs.vtep_mac

    # Applying a full plan again (everything "replace") is harmless.
    a.kernel.apply(plan(wanted_a, DataplaneState(None)))
    assert a.kernel.read_state(DEVICE) == wanted_a


def test_ping_between_overlay_addresses_over_vxlan(lab):
    a, b = lab(), lab()
    a.converge([b])
    b.converge([a])
    # The overlay addresses are the subnets' network addresses, on the VXLAN devices.
    wait_for(lambda: subprocess.run(["ip", "netns", "exec", a.ns, "ping", "-c", "1", "-W", "1", "10.244.2.0"],
                                    capture_output=True).returncode == 0,
             timeout=15, what="ping 10.244.1.0 -> 10.244.2.0 over VXLAN")
    out = in_ns(b.ns, "ping", "-c", "2", "-i", "0.2", "-W", "2", "10.244.1.0")
    assert " 0% packet loss" in out


def test_three_hosts_and_direct_routing_on_the_shared_underlay(lab):
    a, b, c = lab(), lab(), lab()
    direct = replace(CONFIG, backend=VxlanBackend(direct_routing=True))
    wanted = a.converge([b, c], direct)
    # Peers on the same underlay subnet are reached by plain routing: a route via the peer's
    # public IP on the underlay, no neighbour, no FDB entry.
    assert {(r.dst, r.gateway, r.device, r.onlink) for r in wanted.routes} == {
        (b.subnet, b.public_ip, "eth0", False), (c.subnet, c.public_ip, "eth0", False)}
    assert a.kernel.read_state(DEVICE) == wanted
    assert our_routes(a) == {"10.244.2.0/24", "10.244.3.0/24"}
    # Switching it off again moves the routes onto the VXLAN device.
    wanted = a.converge([b, c])
    assert a.kernel.read_state(DEVICE) == wanted
    assert {r.device for r in wanted.routes} == {DEVICE}


# ---------------------------------------------------------------------- drift and repair


def test_hand_deleted_route_neighbour_and_fdb_entry_are_planned_and_restored(lab):
    a, b, c = lab(), lab(), lab()
    wanted = a.converge([b, c])
    a.ip("route", "del", "10.244.2.0/24")
    a.ip("neigh", "del", "10.244.3.0", "dev", DEVICE)
    sh("bridge", "-n", a.ns, "fdb", "del", b.lease.attrs.vtep_mac, "dev", DEVICE, "dst", "198.18.200.2")

    changes = plan(wanted, a.kernel.read_state(DEVICE))
    assert [str(r.dst) for r in changes.replace_routes] == ["10.244.2.0/24"]
    assert [str(n.ip) for n in changes.replace_neighbours] == ["10.244.3.0"]
    assert [f.mac for f in changes.replace_fdb] == [b.lease.attrs.vtep_mac]
    assert not (changes.create_device or changes.update_device or changes.delete_routes
                or changes.delete_fdb or changes.delete_neighbours)

    a.kernel.apply(changes)
    assert a.kernel.read_state(DEVICE) == wanted
    assert fdb_entries(a) == {(b.lease.attrs.vtep_mac, "198.18.200.2"), (c.lease.attrs.vtep_mac, "198.18.200.3")}


def test_changed_vtep_mac_leaves_no_stale_fdb_entry_or_neighbour(lab):
    a, b = lab(), lab()
    a.converge([b])
    old_mac = b.lease.attrs.vtep_mac
    new_mac = "0a:bb:cc:dd:ee:01"
    moved = lease(b.subnet, b.public_ip, mac=new_mac, revision=2)
    wanted = a.converge([moved])

    assert a.kernel.read_state(DEVICE) == wanted
    assert fdb_entries(a) == {(new_mac, "198.18.200.2")}
    neighbours = json.loads(a.ip("-j", "neigh", "show", "dev", DEVICE, "nud", "permanent"))
    assert [(n["dst"], n["lladdr"]) for n in neighbours] == [("10.244.2.0", new_mac)]
    assert old_mac not in a.ip("neigh", "show", "dev", DEVICE)


def test_changed_public_ip_moves_the_fdb_entry(lab):
    a, b = lab(), lab()
    a.converge([b])
    moved = Lease(b.subnet, LeaseAttrs(IPv4Address("198.18.200.77"), 1, b.lease.attrs.vtep_mac), 1, 2)
    a.converge([moved])
    assert fdb_entries(a) == {(b.lease.attrs.vtep_mac, "198.18.200.77")}


def test_removed_peer_is_removed_from_the_kernel(lab):
    a, b, c = lab(), lab(), lab()
    a.converge([b, c])
    assert our_routes(a) == {"10.244.2.0/24", "10.244.3.0/24"}
    wanted = a.converge([b])
    assert a.kernel.read_state(DEVICE) == wanted
    assert our_routes(a) == {"10.244.2.0/24"}
    assert fdb_entries(a) == {(b.lease.attrs.vtep_mac, "198.18.200.2")}
    assert "10.244.3.0" not in a.ip("neigh", "show", "dev", DEVICE)
    # Every peer gone: nothing of ours is left but the device.
    wanted = a.converge([])
    assert a.kernel.read_state(DEVICE) == wanted
    assert our_routes(a) == set() and fdb_entries(a) == set()


def test_changed_port_recreates_the_device(lab):
    a, b = lab(), lab()
    a.converge([b])
    index_before = json.loads(a.ip("-j", "link", "show", DEVICE))[0]["ifindex"]

    other_port = replace(CONFIG, backend=VxlanBackend(port=4789))
    wanted = a.desired([b], other_port)
    changes = plan(wanted, a.kernel.read_state(DEVICE))
    assert changes.create_device is not None and changes.recreate_device
    a.kernel.apply(changes)

    assert a.kernel.read_state(DEVICE) == wanted
    details = json.loads(a.ip("-d", "-j", "link", "show", DEVICE))[0]
    assert details["linkinfo"]["info_data"]["port"] == 4789
    assert details["ifindex"] != index_before
    assert our_routes(a) == {"10.244.2.0/24"}


def test_a_foreign_device_with_our_name_is_replaced(lab):
    a, b = lab(), lab()
    a.ip("link", "add", DEVICE, "type", "bridge")
    wanted = a.desired([b])
    changes = plan(wanted, a.kernel.read_state(DEVICE))
    assert changes.recreate_device
    a.kernel.apply(changes)
    assert a.kernel.read_state(DEVICE) == wanted


def test_downed_device_is_brought_up_and_its_routes_return(lab):
    a, b = lab(), lab()
    wanted = a.converge([b])
    a.ip("link", "set", DEVICE, "down")
    actual = a.kernel.read_state(DEVICE)
    assert actual.device.up is False
    changes = plan(wanted, actual)
    assert changes.update_device is not None
    a.kernel.apply(changes)
    assert a.kernel.read_state(DEVICE) == wanted
    assert "UP" in json.loads(a.ip("-j", "link", "show", DEVICE))[0]["flags"]


def test_wrong_mtu_mac_and_extra_address_are_fixed_in_place(lab):
    a, b = lab(), lab()
    wanted = a.converge([b])
    index_before = json.loads(a.ip("-j", "link", "show", DEVICE))[0]["ifindex"]
    a.ip("link", "set", DEVICE, "mtu", "1300", "address", "0a:00:00:00:00:99")
    a.ip("addr", "add", "10.244.77.1/24", "dev", DEVICE)
    changes = plan(wanted, a.kernel.read_state(DEVICE))
    assert changes.update_device is not None and not changes.create_device
    a.kernel.apply(changes)
    assert a.kernel.read_state(DEVICE) == wanted
    addresses = json.loads(a.ip("-4", "-j", "addr", "show", "dev", DEVICE))[0]["addr_info"]
    assert [(x["local"], x["prefixlen"]) for x in addresses] == [("10.244.1.0", 32)]
    assert json.loads(a.ip("-j", "link", "show", DEVICE))[0]["ifindex"] == index_before


def test_foreign_routes_and_neighbours_are_left_alone(lab):
    a, b, c = lab(), lab(), lab()
    a.converge([b, c])
    a.ip("route", "add", "10.244.99.0/24", "via", "10.244.99.0", "dev", DEVICE, "onlink")  # proto boot
    a.ip("route", "add", "192.0.2.0/24", "via", "198.18.200.9", "proto", "static")
    a.ip("neigh", "add", "198.18.200.9", "lladdr", "0a:00:00:00:00:09", "dev", "eth0", "nud", "permanent")

    wanted = a.converge([])
    assert a.kernel.read_state(DEVICE) == wanted
    assert our_routes(a) == set()
    routes = a.ip("route", "show")
    assert "10.244.99.0/24 via 10.244.99.0 dev flannel.1 onlink" in routes
    assert "192.0.2.0/24 via 198.18.200.9 dev eth0 proto static" in routes
    assert "0a:00:00:00:00:09" in a.ip("neigh", "show", "dev", "eth0")


# ---------------------------------------------------------------------- drift watch


def test_watch_drift_fires_on_a_deleted_route_ignores_noise_and_stops(lab):
    a, b = lab(), lab()
    a.converge([b])
    fired = threading.Event()
    watch = a.kernel.watch_drift(fired.set, DEVICE)
    try:
        # Noise: a neighbour on the underlay and a route of another protocol.
        a.ip("neigh", "add", "198.18.200.9", "lladdr", "0a:00:00:00:00:09", "dev", "eth0", "nud", "permanent")
        a.ip("route", "add", "192.0.2.0/24", "via", "198.18.200.9", "proto", "static")
        assert not fired.wait(0.5), "an unrelated change woke the reconciler"

        a.ip("route", "del", "10.244.2.0/24")
        assert fired.wait(10), "deleting our route was not noticed"
        fired.clear()
        sh("bridge", "-n", a.ns, "fdb", "del", b.lease.attrs.vtep_mac, "dev", DEVICE, "dst", "198.18.200.2")
        assert fired.wait(10), "deleting our FDB entry was not noticed"
        fired.clear()
        a.ip("link", "set", DEVICE, "mtu", "1400")
        assert fired.wait(10), "an MTU change on our device was not noticed"
    finally:
        started = time.monotonic()
        watch.stop()
        stopped_in = time.monotonic() - started
    assert not watch.alive
    assert stopped_in < 2.0


def test_watch_drift_follows_a_recreated_device(lab):
    a, b = lab(), lab()
    a.converge([b])
    fired = threading.Event()
    with_watch = a.kernel.watch_drift(fired.set, DEVICE)
    try:
        a.ip("link", "del", DEVICE)
        assert fired.wait(10)
        a.converge([b])  # a new device, with a new index
        fired.clear()
        a.ip("neigh", "del", "10.244.2.0", "dev", DEVICE)
        assert fired.wait(10), "a neighbour deleted on the recreated device was not noticed"
    finally:
        with_watch.stop()


# ---------------------------------------------------------------------- underlay and errors


def test_underlay_defaults_and_checks(lab):
    a = lab()
    a.ip("addr", "add", "198.18.210.1/24", "dev", "eth0")
    underlay = a.kernel.underlay(None, None)
    assert (underlay.iface, underlay.public_ip, underlay.mtu, underlay.network) == (
        "eth0", IPv4Address("198.18.200.1"), 1500, IPv4Network("198.18.200.0/24"))
    second = a.kernel.underlay("eth0", IPv4Address("198.18.210.1"))
    assert second.network == IPv4Network("198.18.210.0/24")
    assert a.kernel.underlay(None, IPv4Address("198.18.210.1")).iface == "eth0"
    with pytest.raises(KernelError, match="198.18.9.9 is not an address of underlay interface eth0"):
        a.kernel.underlay("eth0", IPv4Address("198.18.9.9"))
    with pytest.raises(DeviceNotFound, match="nosuch0"):
        a.kernel.underlay("nosuch0", None)
    a.ip("route", "del", "default")
    with pytest.raises(KernelError, match="no IPv4 default route"):
        a.kernel.underlay(None, None)


def test_kernel_errors_name_the_object(lab):
    a, b = lab(), lab()
    # An MTU the underlay cannot carry.
    too_big = replace(a.desired([b]).device, mtu=9000)
    with pytest.raises(KernelError, match="flannel.1"):
        a.kernel.apply(plan(replace(a.desired([b]), device=too_big), a.kernel.read_state(DEVICE)))
    # A route onto a device that vanished.
    wanted = a.converge([b])
    a.ip("link", "del", DEVICE)
    with pytest.raises(DeviceNotFound, match="flannel.1"):
        a.kernel.apply(replace(plan(wanted, DataplaneState(None)), create_device=None))
    # Deleting what is already gone is not an error.
    gone = plan(a.desired([]), wanted)
    a.converge([b])
    a.ip("route", "del", "10.244.2.0/24")
    a.ip("neigh", "del", "10.244.2.0", "dev", DEVICE)
    sh("bridge", "-n", a.ns, "fdb", "del", b.lease.attrs.vtep_mac, "dev", DEVICE, "dst", "198.18.200.2")
    a.kernel.apply(replace(gone, create_device=None, update_device=None))


def test_an_entry_the_kernel_refuses_keeps_no_other_peer_out(lab):
    a, b = lab(), lab()
    # A peer whose VTEP MAC the kernel refuses as an FDB entry (multicast; the lease parser
    # turns such a lease away, so only a hand-made Lease gets here).
    odd = lease(IPv4Network("10.244.9.0/24"), IPv4Address("198.18.200.9"), mac="01:00:5e:00:00:09")
    wanted = a.desired([b, odd])
    with pytest.raises(KernelError):
        a.kernel.apply(plan(wanted, a.kernel.read_state(DEVICE)))
    # The stages after the failed one ran: every route is there, and b's entries.
    assert our_routes(a) == {"10.244.2.0/24", "10.244.9.0/24"}
    assert (b.lease.attrs.vtep_mac, "198.18.200.2") in fdb_entries(a)


def test_a_missing_namespace_is_an_error_and_is_not_created():
    name = f"ovl-kt-{uuid.uuid4().hex[:6]}-missing"
    with pytest.raises(KernelError, match=name):
        Kernel(name)
    assert name not in sh("ip", "netns", "list")


def test_usable_from_a_thread_running_an_event_loop(lab):
    """The daemon makes and calls its Kernel inside asyncio.run(), and in to_thread() workers."""
    a, b = lab(), lab()

    async def like_the_daemon():
        kernel = Kernel(a.ns)
        try:
            underlay = kernel.underlay(None, None)
            wanted = desired_state(a.lease, [b.lease], CONFIG, underlay)
            changes = plan(wanted, await asyncio.to_thread(kernel.read_state, DEVICE))
            await asyncio.to_thread(kernel.apply, changes)
            watch = kernel.watch_drift(lambda: None)
            watch.stop()
            return wanted, await asyncio.to_thread(kernel.read_state, DEVICE)
        finally:
            kernel.close()
            kernel.close()

    wanted, actual = asyncio.run(like_the_daemon())
    assert actual == wanted


def test_ip_forward(lab):
    a = lab()
    a.kernel.set_ip_forward(True)
    assert in_ns(a.ns, "sysctl", "-n", "net.ipv4.ip_forward").strip() == "1"
    a.kernel.set_ip_forward(False)
    assert in_ns(a.ns, "sysctl", "-n", "net.ipv4.ip_forward").strip() == "0"


# ---------------------------------------------------------------------- scale


def test_thousand_peers(lab):
    a = lab()
    peers = [lease(IPv4Network((int(IPv4Address("10.244.2.0")) + i * 256, 24)),
                   IPv4Address(int(IPv4Address("198.19.0.1")) + i)) for i in range(1000)]
    config = replace(CONFIG, network=IPv4Network("10.240.0.0/12"), subnet_max=IPv4Address("10.255.255.0"))
    wanted = a.desired(peers, config)
    actual = a.kernel.read_state(DEVICE)
    changes = plan(wanted, actual)
    started = time.monotonic()
    a.kernel.apply(changes)
    applied = time.monotonic() - started
    started = time.monotonic()
    actual = a.kernel.read_state(DEVICE)
    read = time.monotonic() - started
    print(f"\n1000 peers: apply {applied:.3f} s, read_state {read:.3f} s")
    assert actual == wanted
    assert len(actual.routes) == len(actual.neighbours) == len(actual.fdb) == 1000


def test_detailed_drift_tells_the_echo_of_our_changes_from_drift(lab):
    """The daemon skips re-reading the kernel when events only echo what it just applied: the
    detailed watch must describe both kinds exactly."""
    from overlay.daemon import _all_as_expected

    a, b, c = lab(), lab(), lab()
    a.converge([b])
    batches: list = []
    arrived = threading.Event()

    def collect(changes):
        batches.append(changes)
        arrived.set()

    watch = a.kernel.watch_drift(collect, DEVICE, detailed=True)
    try:
        # Our own change: c joins. Every event describes an object of the new desired state.
        want = a.desired([b, c])
        a.converge([b, c])
        assert arrived.wait(10)
        wait_for(lambda: sum(len(batch or []) for batch in batches) >= 3, what="three echoes (neigh, fdb, route)")
        assert all(batch is not None for batch in batches)
        echoed = [change for batch in batches for change in batch]
        assert {type(change.item).__name__ for change in echoed} == {"Route", "Neighbour", "FdbEntry"}
        assert _all_as_expected(echoed, want)

        # Drift: a route and a neighbour of the desired state deleted by hand.
        for delete in (["route", "del", str(c.subnet), "dev", DEVICE],
                       ["neigh", "del", str(c.subnet.network_address), "dev", DEVICE]):
            batches.clear()
            arrived.clear()
            a.ip(*delete)
            assert arrived.wait(10), delete
            drift = [change for batch in batches for change in (batch or [])]
            assert drift and not _all_as_expected(drift, want), delete
    finally:
        watch.stop()
