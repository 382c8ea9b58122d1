"""The warm CNI service: does ADD, DEL, CHECK, GC and STATUS for the plugin client.

Design note
-----------
`overlayd` hosts it (`CniService(run_dir).start()`, `set_ready(True)`, `close()`), so pyroute2
is imported once per daemon rather than once per container, and it runs in the host's network
namespace, where the bridge and the host ends of the veth pairs live. It can also run on its own
(`python -m cni.service --run-dir DIR`), which the integration tests and benchmarks use.

Protocol on `<run-dir>/cni.sock` (mode 0600: only root may attach containers): the client sends
one JSON object `{"env": {CNI_*...}, "stdin": "<network config>"}` and closes its write side;
the service answers `<exit status>\\n<stdout>` and closes; or `elsewhere\\n` when the config's
runDir is not its run dir (it does nothing then; the client forwards to the right socket). Each connection gets its own thread;
calls for different containers run in parallel, and the allocation store keeps their addresses
apart (its file lock, with the changes of concurrent ADDs and DELs combined into one write: see
cni.allocator). The service re-parses the call with `cni.spec` (it trusts no client).

ADD order, chosen so that nothing is left half-made and a crash at any point leaves state that
DEL or GC can clean: (1) allocate the address (recorded before anything exists in the kernel),
(2) make sure the bridge is up with the gateway address (checked against the kernel at most once
a second), (3) create the veth pair in one netlink request, the host end already on the bridge and
up, the container end already in the container's namespace under CNI_IFNAME, (4) set the
container's address, link up and default route. A failure after (1) deletes the veth (if this
call created it) and releases the address (if this call allocated it), then reports the error.
On the kernel side an ADD is three netlink round trips on sockets of our own with hand-packed
messages (cni.links, cni.rtnl): the veth pair; the container end's index; its address, link up
and default route in one write. With pyroute2's codec (~0.5 ms of Python a message) the service
spent more time encoding than the kernel spent working, and a burst of ADDs queued on the GIL.
Measured here: about 1.6 ms of CPU per ADD in the service, most of it the kernel's.

DEL deletes the host end (the kernel removes the pair, wherever the container end is), then
releases the address; it needs neither the netns nor the subnet file. The host end's name is a
hash of (container ID, ifname), so a DEL for an old container ID can only ever reach that
container's own veth and allocation, never a newer attachment.

A requested address (CNI_ARGS IP=, runtimeConfig.ips) decides the path (overlay.moves.placement):
- in this host's subnet: allocated exactly, unless another container has it or another host
  claims it (the claim is read fresh from etcd first, so a workload moving home is not refused
  by a claim its last host has just withdrawn). The records may still hold it reserved for that
  withdrawn claim (the daemon drops the reservation once its watch shows the withdrawal): then
  the claim is read again *under the records' lock* and, if it is gone, the reservation is
  dropped and the address allocated in one update. The lock orders this with the daemon's
  grants: a claim made after that read is decided after the update, and refused;
- elsewhere in the overlay network (a workload moving in, keeping its address): (1) record it
  (claimed) in the allocation store, (2) plug it Calico style (cni.links: host end off the
  bridge, /32 in the container, gateway 169.254.1.1 on-link, host route <ip>/32 to the host
  end), (3) claim it in etcd, (4) wait for its origin host to grant the claim (overlay.claims:
  the origin refuses an address one of its containers has, and reserves any other). Plugging
  before claiming means that when the other hosts start routing the address here (on the
  grant), the route to the container is already in place. A lost claim, a refusal or an origin
  that does not answer undoes (2) and (1) and then withdraws the claim, leaving nothing behind,
  and fails: code 103 naming the holder or the origin, or 11 when the origin did not answer.
  DEL withdraws the claim after deleting the veth and the record; a withdrawal etcd cannot take
  now is done later by the daemon's ClaimKeeper, which keeps this host's claims equal to the
  claimed records (and claims again what a lost lease took along). The records go before the
  claim, in ADD's undoing as in DEL, or the keeper would claim again what a record still wants.
The service reaches etcd through `claims`, a hook the daemon passes in (overlay.claimhook): it
runs in the daemon's process, which holds the etcd lease that claims are bound to. Without it
(the standalone service of tests and benchmarks) a moved-in address fails with code 103.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import selectors
import signal
import socket
import socketserver
import struct
import sys
import threading
import time
from ipaddress import IPv4Address, IPv4Interface
from pathlib import Path

from overlay.moves import Placement, UnusableAddress, placement
from overlay.subnetfile import SubnetFile, SubnetFileError, read_subnet_file

from cni import spec
from cni.allocator import (AllocationStore, AttachmentKey, ReservedForClaim, allocate, record_claimed, release,
                           release_unlisted, store_dir, unreserve)
from cni.errors import (AddressUnavailable, AttachmentDrift, CniFailure, DecodingFailure, InterfaceConflict,
                        KernelFailure, NotReady, PermissionDenied, ServiceUnavailable, StateFailure, cni_code)
from cni.links import (CNI_ROUTE_PROTOCOL, MOVED_GATEWAY, LinkExists, Links, bridge_lock, container_links,
                       host_links, mac_for, open_netns)
from cni.results import Attachment, add_result, expected_in_prev_result

log = logging.getLogger("overlay.cni")

# The status line answering a call whose config names another run dir: the client was sent
# here by its launcher's hint (see cni.plugin) and goes to the config's runDir instead.
ELSEWHERE = "elsewhere"
HOST_VETH_PREFIX = "ovlv"
HOST_VETH_MAC_PREFIX = "0a:59"
BRIDGE_RECHECK_S = 1.0
REQUEST_TIMEOUT_S = 10.0
_HOST_VETH_HASH_LEN = 15 - len(HOST_VETH_PREFIX)
# What the client forwards at most: a config of up to 1 MiB (spec.MAX_CONFIG_BYTES) that JSON
# escaping can make 6 times longer (a control character becomes \u00XX, a 2-byte UTF-8
# character \uXXXX), plus its CNI_* variables (each at most 128 KiB, the kernel's limit on one
# environment string). A request refused for its size would reach the client as a reset.
_MAX_REQUEST_BYTES = 16 << 20


def host_ifname(container_id: str, ifname: str) -> str:
    """The host end's name: deterministic, so DEL and GC find it with no record, and unique per
    (container ID, ifname) for all practical purposes (44 bits of SHA-256)."""
    digest = hashlib.sha256(f"{container_id}/{ifname}".encode()).hexdigest()
    return HOST_VETH_PREFIX + digest[:_HOST_VETH_HASH_LEN]


def is_host_ifname(name: str) -> bool:
    suffix = name[len(HOST_VETH_PREFIX):]
    return (name.startswith(HOST_VETH_PREFIX) and len(suffix) == _HOST_VETH_HASH_LEN
            and all(c in "0123456789abcdef" for c in suffix))


def _roll_back_veth(host: Links, host_name: str, failure: BaseException) -> None:
    """Delete the veth of an ADD that failed after creating it. When that fails too, `failure`
    is marked (`veth_left`): the ADD keeps its record, so the address is not handed out again
    while it is still on a live link; DEL or GC removes both later."""
    try:
        host.delete(host_name)
    except CniFailure as exc:
        log.warning("a failed ADD could not remove its veth %s (%s): its record stays for DEL or GC",
                    host_name, exc.msg)
        failure.veth_left = host_name


class Attacher:
    """The CNI operations against the kernel and the allocation store of one run dir.

    `claims` (optional) is the daemon's hook into etcd address claims, called from the
    service's threads; every method may raise ServiceUnavailable (etcd unreachable, lease
    being re-acquired):
      reserved(pool) -> frozenset[IPv4Address]   addresses of pool other hosts claim (in memory)
      check_free(address)                         AddressUnavailable if another host claims it (fresh read)
      claim(address, container_id) -> claim       AddressUnavailable naming the holder if taken
      await_grant(claim)                          until the origin grants it: AddressUnavailable when
                                                  it refused, ServiceUnavailable when it did not answer
      release(address, container_id)              withdraw our claim; no error if already gone
    """

    def __init__(self, run_dir: Path, ready=lambda: True, claims=None):
        self.run_dir = Path(run_dir)
        self.store = AllocationStore(store_dir(self.run_dir))
        self.ready = ready
        self.claims = claims
        self._bridges: dict[str, tuple] = {}    # name -> (index, (gateway, mtu), checked at)

    def handle(self, invocation: spec.Invocation) -> str:
        """Run one call; returns stdout (empty except for ADD); raises a CniFailure."""
        operation = {"ADD": self.add, "DEL": self.delete, "CHECK": self.check, "GC": self.gc,
                     "STATUS": self.status}[invocation.command]
        return operation(invocation)

    def _release(self, key: AttachmentKey) -> None:
        self.store.update(lambda state: (release(state, key)[0], None))

    def _subnet(self) -> SubnetFile:
        try:
            return read_subnet_file(self.run_dir)
        except FileNotFoundError:
            raise ServiceUnavailable(f"{self.run_dir}/subnet.env is not written yet (the daemon has no lease); "
                                     "try again later") from None
        except (OSError, SubnetFileError) as exc:
            raise StateFailure(f"cannot read {self.run_dir}/subnet.env: {exc}") from None

    # ------------------------------------------------------------------ ADD

    def add(self, inv: spec.Invocation) -> str:
        if not self.ready():
            # The daemon lost its lease (or is not ready yet): its subnet may change, so no
            # address is handed out of it until the lease is held again.
            raise ServiceUnavailable("the overlay daemon is re-acquiring its subnet lease; try again later")
        subnet = self._subnet()
        gateway = subnet.subnet.ip
        pool = subnet.subnet.network
        key = AttachmentKey(inv.name, inv.container_id, inv.ifname)
        host_name = host_ifname(inv.container_id, inv.ifname)
        requested = IPv4Address(inv.requested_ip) if inv.requested_ip else None
        if requested is not None:
            try:
                where = placement(requested, pool, subnet.network)
            except UnusableAddress as exc:
                raise AddressUnavailable(f"cannot attach with the requested address: {exc}") from None
            if where is Placement.MOVED_IN:
                return self._add_moved_in(inv, key, host_name, requested, subnet)
        reserved = self.claims.reserved(pool) if self.claims is not None else frozenset()
        if requested is not None and self.claims is not None:
            self.claims.check_free(requested)
            reserved = reserved - {requested}   # the fresh read beats the watch's view
        netns_fd = open_netns(inv.netns)
        try:
            def take(state):
                existing = state.find(key)
                if existing is not None and (existing.address not in pool or existing.claimed):
                    # The daemon's subnet changed since this allocation: it cannot be used any more.
                    state, _ = release(state, key)
                state, allocation, new = allocate(state, key, pool, gateway, host_name, inv.netns,
                                                  requested=requested, reserved=reserved)
                return state, (allocation, new)
            try:
                allocation, new = self.store.update(take)
            except ReservedForClaim:
                if self.claims is None:
                    raise
                allocation, new = self._take_back(requested, take)
            try:
                attachment = self._plug(inv, host_name, netns_fd, IPv4Interface((allocation.address, pool.prefixlen)),
                                        subnet)
            except BaseException as failure:
                if new and not hasattr(failure, "veth_left"):
                    self._release(key)
                raise
        finally:
            os.close(netns_fd)
        return spec.dumps(add_result(inv.version, attachment, inv.dns, inv.prev_result))

    def _take_back(self, address: IPv4Address, take):
        """Allocate a requested address of our pool that the records hold reserved for a claim
        (see the design note): the claim is read again with the records locked, so no grant
        can come between the read and the allocation."""
        with self.store.transaction() as txn:
            if address in txn.state.reserved:
                self.claims.check_free(address)
                log.info("%s: its claim is gone; dropping the reservation the daemon has not dropped yet", address)
            state, result = take(unreserve(txn.state, {address}))
            txn.commit(state)
        return result

    def _plug(self, inv, host_name: str, netns_fd: int, address: IPv4Interface, subnet: SubnetFile) -> Attachment:
        gateway = subnet.subnet.ip
        host_mac = mac_for(address.ip, HOST_VETH_MAC_PREFIX)
        with host_links() as host:
            created = False
            try:
                with container_links(netns_fd) as container:
                    bridge_index = self._bridge(host, inv.bridge, subnet)
                    try:
                        try:
                            host.create_veth(host_name, host_mac, bridge_index, inv.ifname, netns_fd, subnet.mtu,
                                             mac_for(address.ip))
                        except KernelFailure as exc:
                            if isinstance(exc, LinkExists):
                                raise
                            # Perhaps the cached bridge is gone: check it once more, then retry.
                            self._bridges.pop(inv.bridge, None)
                            bridge_index = self._bridge(host, inv.bridge, subnet)
                            host.create_veth(host_name, host_mac, bridge_index, inv.ifname, netns_fd, subnet.mtu,
                                             mac_for(address.ip))
                        created = True
                    except LinkExists:
                        host_end = host.link(host_name)
                        if host_end is None:
                            raise InterfaceConflict(f"{inv.ifname} already exists in the container") from None
                        inside = container.link(inv.ifname)
                        if inside is not None and inside.kind == "veth":
                            # A repeated ADD: keep the pair, make sure of the rest.
                            host.attach(host_end.index, bridge_index)
                            host_mac = host_end.mac
                        else:
                            # A leftover pair whose container end is elsewhere (an old sandbox of
                            # this container ID): it is ours by name, replace it.
                            host.delete(host_name)
                            host.create_veth(host_name, host_mac, bridge_index, inv.ifname, netns_fd, subnet.mtu,
                                             mac_for(address.ip))
                            created = True
                    inside = container.configure_container_side(inv.ifname, address, gateway)
            except BaseException as failure:
                if created:
                    _roll_back_veth(host, host_name, failure)
                raise
        return Attachment(host_ifname=host_name, host_mac=host_mac, ifname=inv.ifname, mac=inside.mac,
                          sandbox=inv.netns, mtu=subnet.mtu, address=address, gateway=gateway)

    def _add_moved_in(self, inv, key: AttachmentKey, host_name: str, address: IPv4Address,
                      subnet: SubnetFile) -> str:
        """Attach with an address of another host's subnet, and claim it (see the design note)."""
        if self.claims is None:
            raise AddressUnavailable(f"{address} is outside this host's subnet {subnet.subnet.network}: keeping an "
                                     "address across hosts needs the overlay daemon's CNI service")
        netns_fd = open_netns(inv.netns)
        try:
            def record(state):
                state, _, new = record_claimed(state, key, address, host_name, inv.netns)
                return state, new
            new = self.store.update(record)
            created = claimed = False
            try:
                attachment, created = self._plug_moved_in(inv, host_name, netns_fd, address, subnet)
                claim = self.claims.claim(address, inv.container_id)
                claimed = True
                self.claims.await_grant(claim)
            except BaseException as failure:
                if created:
                    with host_links() as host:
                        _roll_back_veth(host, host_name, failure)
                if new and not hasattr(failure, "veth_left"):
                    self._release(key)
                    if claimed:
                        self._withdraw_quietly(address, inv.container_id)
                raise
        finally:
            os.close(netns_fd)
        log.info("attached %s to container %s with the address it keeps from another host's subnet",
                 address, inv.container_id[:12])
        return spec.dumps(add_result(inv.version, attachment, inv.dns, inv.prev_result))

    def _withdraw_quietly(self, address: IPv4Address, container_id: str) -> None:
        try:
            self.claims.release(address, container_id)
        except CniFailure as exc:
            log.warning("ADD of %s failed, and its claim on %s stays until the daemon withdraws it: %s",
                        container_id[:12], address, exc.msg)

    def _plug_moved_in(self, inv, host_name: str, netns_fd: int, address: IPv4Address,
                       subnet: SubnetFile) -> tuple[Attachment, bool]:
        host_mac = mac_for(address, HOST_VETH_MAC_PREFIX)
        created = False
        with host_links() as host:
            try:
                with container_links(netns_fd) as container:
                    try:
                        host.create_veth(host_name, host_mac, None, inv.ifname, netns_fd, subnet.mtu, mac_for(address))
                        created = True
                    except LinkExists:
                        host_end = host.link(host_name)
                        if host_end is None:
                            raise InterfaceConflict(f"{inv.ifname} already exists in the container") from None
                        inside = container.link(inv.ifname)
                        if inside is None or inside.kind != "veth" or host_end.master is not None:
                            # A leftover pair of this container ID elsewhere, or one plugged to
                            # the bridge by an ADD with a pool address: ours by name, replace it.
                            host.delete(host_name)
                            host.create_veth(host_name, host_mac, None, inv.ifname, netns_fd, subnet.mtu,
                                             mac_for(address))
                            created = True
                        else:
                            host_mac = host_end.mac
                    host_end = host.link(host_name)
                    host.proxy_arp(host_name)
                    inside = container.configure_moved_container_side(inv.ifname, address, host_mac)
                    host.route_to_container(address, host_end.index)
            except BaseException as failure:
                if created:
                    _roll_back_veth(host, host_name, failure)
                raise
        attachment = Attachment(host_ifname=host_name, host_mac=host_mac, ifname=inv.ifname, mac=inside.mac,
                                sandbox=inv.netns, mtu=subnet.mtu, address=IPv4Interface((address, 32)),
                                gateway=MOVED_GATEWAY)
        return attachment, created

    def _bridge(self, host: Links, name: str, subnet: SubnetFile) -> int:
        """The bridge's index, checked against the kernel at most once per BRIDGE_RECHECK_S: a
        burst of ADDs does not pay two netlink round trips each for a bridge that is there."""
        now = time.monotonic()
        with bridge_lock():
            cached = self._bridges.get(name)
            if cached is not None and cached[1] == (subnet.subnet, subnet.mtu) and now - cached[2] < BRIDGE_RECHECK_S:
                return cached[0]
            bridge = host.ensure_bridge(name, subnet.subnet, subnet.mtu)
            self._bridges[name] = (bridge.index, (subnet.subnet, subnet.mtu), now)
            return bridge.index

    # ------------------------------------------------------------------ DEL

    def delete(self, inv: spec.Invocation) -> str:
        key = AttachmentKey(inv.name, inv.container_id, inv.ifname)
        try:
            allocation, unreadable = self.store.lookup(key), None
        except StateFailure as exc:
            allocation, unreadable = None, exc
        host_name = allocation.host_ifname if allocation is not None else host_ifname(inv.container_id, inv.ifname)
        with host_links() as host:
            host.delete(host_name)     # absent is fine: DEL is idempotent
        if unreadable is not None:
            # The records cannot be read: the veth is gone (by the name ADD gives it), and the
            # DEL fails so that the runtime tries again once the records are readable.
            raise unreadable
        if allocation is not None:
            if allocation.claimed and self.claims is None:
                raise ServiceUnavailable(f"{allocation.address} is claimed in etcd and only the overlay "
                                         "daemon can withdraw the claim; try again later")
            # Released only after the veth is gone, so the address is never on two live links.
            self._release(key)
            if allocation.claimed:
                # After the record: the daemon's ClaimKeeper re-claims every recorded address
                # whose claim is missing, so the record must be gone first. If etcd cannot take
                # the withdrawal now, the keeper withdraws it later (a claim without a record).
                try:
                    self.claims.release(allocation.address, inv.container_id)
                except ServiceUnavailable as exc:
                    log.warning("DEL of %s: %s; the daemon withdraws the claim when etcd is back",
                                inv.container_id[:12], exc.msg)
        return ""

    # ------------------------------------------------------------------ CHECK

    def check(self, inv: spec.Invocation) -> str:
        key = AttachmentKey(inv.name, inv.container_id, inv.ifname)
        allocation = self.store.lookup(key)
        if allocation is None:
            raise AttachmentDrift(f"no address is allocated to container {inv.container_id} {inv.ifname} "
                                  f"on network {inv.name}")
        subnet = self._subnet()
        if allocation.claimed:
            return self._check_moved_in(inv, allocation, subnet)
        address = IPv4Interface((allocation.address, subnet.subnet.network.prefixlen))
        expected_in_prev_result(inv.prev_result, inv.ifname, inv.netns, address)
        netns_fd = open_netns(inv.netns)
        try:
            with host_links() as host, container_links(netns_fd) as container:
                bridge = host.link(inv.bridge)
                if bridge is None or not bridge.up:
                    raise AttachmentDrift(f"bridge {inv.bridge} is missing or down")
                if subnet.subnet not in host.addresses(bridge.index):
                    raise AttachmentDrift(f"bridge {inv.bridge} lacks the gateway address {subnet.subnet}")
                host_end = host.link(allocation.host_ifname)
                if host_end is None:
                    raise AttachmentDrift(f"host veth {allocation.host_ifname} is missing")
                if host_end.master != bridge.index or not host_end.up:
                    raise AttachmentDrift(f"host veth {allocation.host_ifname} is down or not on {inv.bridge}")
                inside = container.link(inv.ifname)
                if inside is None or inside.kind != "veth":
                    raise AttachmentDrift(f"{inv.ifname} is missing from the container or is not a veth")
                if not inside.up:
                    raise AttachmentDrift(f"{inv.ifname} is down in the container")
                if inside.mtu != subnet.mtu:
                    raise AttachmentDrift(f"{inv.ifname} has MTU {inside.mtu}, the overlay needs {subnet.mtu}")
                if address not in container.addresses(inside.index):
                    raise AttachmentDrift(f"{inv.ifname} lacks its address {address}")
                if subnet.subnet.ip not in container.default_gateways(inside.index):
                    raise AttachmentDrift(f"the container has no default route via {subnet.subnet.ip}")
        finally:
            os.close(netns_fd)
        return ""

    def _check_moved_in(self, inv, allocation, subnet: SubnetFile) -> str:
        address = IPv4Interface((allocation.address, 32))
        expected_in_prev_result(inv.prev_result, inv.ifname, inv.netns, address)
        netns_fd = open_netns(inv.netns)
        try:
            with host_links() as host, container_links(netns_fd) as container:
                host_end = host.link(allocation.host_ifname)
                if host_end is None or not host_end.up:
                    raise AttachmentDrift(f"host veth {allocation.host_ifname} is missing or down")
                if (host_end.index, CNI_ROUTE_PROTOCOL) not in host.routes_to(allocation.address):
                    raise AttachmentDrift(f"the host has no route of {allocation.address} to {allocation.host_ifname}")
                inside = container.link(inv.ifname)
                if inside is None or inside.kind != "veth" or not inside.up:
                    raise AttachmentDrift(f"{inv.ifname} is missing from the container, down, or not a veth")
                if inside.mtu != subnet.mtu:
                    raise AttachmentDrift(f"{inv.ifname} has MTU {inside.mtu}, the overlay needs {subnet.mtu}")
                if address not in container.addresses(inside.index):
                    raise AttachmentDrift(f"{inv.ifname} lacks its address {address}")
                if MOVED_GATEWAY not in container.default_gateways(inside.index):
                    raise AttachmentDrift(f"the container has no default route via {MOVED_GATEWAY}")
        finally:
            os.close(netns_fd)
        return ""

    # ------------------------------------------------------------------ GC and STATUS

    def gc(self, inv: spec.Invocation) -> str:
        with host_links() as host:
            listed = [link.name for link in host.links() if is_host_ifname(link.name)]
            with self.store.transaction() as txn:
                state, released = release_unlisted(txn.state, inv.name, inv.valid_attachments)
                for allocation in released:
                    host.delete(allocation.host_ifname)
                txn.commit(state)
                # Host ends nobody records: left by a crash between veth creation and rollback.
                # Links were listed before the records were read, and ADD records before it
                # creates, so an ADD in flight is never mistaken for an orphan; deleted with the
                # records still locked, so neither is an ADD that records the same name again.
                recorded = {a.host_ifname for a in state.allocations}
                orphans = [name for name in listed if name not in recorded]
                for name in orphans:
                    host.delete(name)
            # Claims after the records, as in DEL (a failed withdrawal is the daemon's to finish).
            for allocation in released:
                if allocation.claimed and self.claims is not None:
                    try:
                        self.claims.release(allocation.address, allocation.key.container_id)
                    except ServiceUnavailable as exc:
                        log.warning("GC: %s; the daemon withdraws the claim when etcd is back", exc.msg)
        if released or orphans:
            log.info("CNI GC on %s: released %s; removed orphan veths %s", inv.name,
                     ", ".join(f"{a.address} ({a.key.container_id} {a.key.ifname})" for a in released) or "nothing",
                     ", ".join(orphans) or "none")
        return ""

    def status(self, inv: spec.Invocation) -> str:
        if not self.ready():
            raise NotReady("the overlay daemon is not ready")
        try:
            read_subnet_file(self.run_dir)
        except (OSError, SubnetFileError) as exc:
            raise NotReady(f"no usable subnet file in {self.run_dir}: {exc}") from None
        return ""


# ---------------------------------------------------------------------- the socket server

class _Handler(socketserver.StreamRequestHandler):
    # A client that never finishes its request must not hold a thread (or close()) forever.
    timeout = REQUEST_TIMEOUT_S

    def handle(self) -> None:
        started = time.monotonic()
        try:
            data = self.rfile.read(_MAX_REQUEST_BYTES + 1)
        except OSError:     # timed out or reset: the client is gone, there is no one to answer
            return
        uid = _peer_uid(self.connection)
        if uid != 0:
            # The socket's mode (0600, root) already keeps others out; this holds even when the
            # mode is loosened or the run dir is bind-mounted somewhere less guarded.
            log.warning("CNI request from uid %s refused: only root may attach containers", uid)
            status, command = 1, "?"
            text = spec.error_json(spec.LATEST_VERSION, cni_code(PermissionDenied("")),
                                   f"only root may use the CNI service (caller uid {uid})")
        else:
            status, text, command = self.server.service.answer(data)
        try:
            self.wfile.write(f"{status}\n{text}".encode())
        except OSError:
            pass    # the client gave up (its runtime timed out); nothing to tell anyone
        log.debug("CNI %s -> %d in %.1f ms", command, status, (time.monotonic() - started) * 1e3)


def _peer_uid(connection: socket.socket) -> int | None:
    """The uid of the process at the other end of a unix socket (SO_PEERCRED), None if unknown."""
    try:
        credentials = connection.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    except OSError:
        return None
    _pid, uid, _gid = struct.unpack("3i", credentials)
    return uid


class _Server(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    # close() waits for requests in flight: a daemon stopping (restart, SIGTERM) lets an ADD
    # finish, or roll back, rather than leaving it half-made.
    daemon_threads = False
    block_on_close = True
    # A runtime may start dozens of containers at once; socketserver's default backlog of 5
    # would turn the excess into EAGAIN at connect.
    request_queue_size = 256
    # The address is bound to a temporary name first (see CniService.start).
    allow_reuse_address = False

    def serve_until(self, wake_fd: int) -> None:
        """Accept requests until wake_fd turns readable. socketserver's serve_forever wakes every
        poll interval to look for shutdown(); this sleeps until a client or close() calls."""
        with selectors.DefaultSelector() as selector:
            selector.register(self, selectors.EVENT_READ)
            selector.register(wake_fd, selectors.EVENT_READ)
            while True:
                for key, _ in selector.select():
                    if key.fileobj == wake_fd:
                        return
                    self._handle_request_noblock()


class CniService:
    """The plugin's server side: `start()`, `set_ready(bool)`, `close()`."""

    def __init__(self, run_dir, claims=None):
        self.run_dir = Path(run_dir)
        self.socket_path = self.run_dir / spec.SOCKET_NAME
        self._ready = threading.Event()
        self.attacher = Attacher(self.run_dir, ready=self._ready.is_set, claims=claims)
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        self._wake: tuple[int, int] | None = None   # pipe: close() writes, the accept loop returns
        self._inode: int | None = None

    def start(self) -> None:
        self.run_dir.mkdir(parents=True, exist_ok=True, mode=0o755)
        # Bind under a temporary name, restrict it to root, then rename it over cni.sock: a client
        # never sees a socket with looser permissions, and a stale socket from a crashed daemon is
        # replaced atomically. (umask would do it too, but it is process-wide and the daemon has
        # other threads creating files.)
        tmp = self.run_dir / f".{spec.SOCKET_NAME}.{os.getpid()}.tmp"
        tmp.unlink(missing_ok=True)
        server = _Server(str(tmp), _Handler, bind_and_activate=False)
        try:
            server.server_bind()
            os.chmod(tmp, 0o600)
            server.server_activate()
            os.replace(tmp, self.socket_path)
        except BaseException:
            server.server_close()
            tmp.unlink(missing_ok=True)
            raise
        server.service = self
        self._inode = self.socket_path.stat().st_ino
        self._server = server
        self._wake = os.pipe()
        self._thread = threading.Thread(target=server.serve_until, args=(self._wake[0],),
                                        name="cni-service", daemon=True)
        self._thread.start()
        log.info("CNI service listening on %s", self.socket_path)

    def set_ready(self, ready: bool) -> None:
        if ready:
            self._ready.set()
        else:
            self._ready.clear()

    def close(self) -> None:
        """Stop accepting, let requests in flight finish, remove the socket."""
        if self._server is None:
            return
        try:
            # First the name, so new clients fail fast with "try again later" instead of waiting
            # in the backlog; and only if it is still ours (a newer daemon may have replaced it).
            if self.socket_path.stat().st_ino == self._inode:
                self.socket_path.unlink()
        except FileNotFoundError:
            pass
        os.write(self._wake[1], b"x")
        self._thread.join()             # the accept loop has returned: no new request starts
        self._server.server_close()     # joins the request threads (block_on_close)
        for fd in self._wake:
            os.close(fd)
        self._server = self._wake = None

    def _serves(self, run_dir: str) -> bool:
        """Whether the config's runDir is this service's run dir (the same directory, by
        device and inode: a symlinked spelling is the same run dir)."""
        try:
            theirs = os.stat(run_dir)
            ours = os.stat(self.run_dir)
        except OSError:
            return False
        return (theirs.st_dev, theirs.st_ino) == (ours.st_dev, ours.st_ino)

    def answer(self, data: bytes) -> tuple[int | str, str, str]:
        """(exit status, stdout, command) for one request; never raises."""
        version, command = spec.LATEST_VERSION, "?"
        try:
            if len(data) > _MAX_REQUEST_BYTES:
                raise DecodingFailure("request too large")
            try:
                request = json.loads(data)
                environ, stdin = request["env"], request["stdin"]
                if not isinstance(environ, dict) or not isinstance(stdin, str):
                    raise TypeError("env must be an object and stdin a string")
            except (ValueError, KeyError, TypeError) as exc:
                raise DecodingFailure(f"malformed request from the plugin: {exc}") from None
            version = spec.version_for_errors(stdin)
            command = spec.parse_command(environ)
            if command == "VERSION":
                return 0, spec.version_answer(stdin), command
            invocation = spec.parse_invocation(environ, stdin)
            if not self._serves(invocation.run_dir):
                return ELSEWHERE, "", command
            return 0, self.attacher.handle(invocation), command
        except CniFailure as exc:
            log.warning("CNI %s failed: %s", command, exc.msg)
            return 1, spec.error_json(version, cni_code(exc), exc.msg, exc.details), command
        except Exception as exc:    # a bug: report it to the runtime rather than hang up
            log.exception("CNI %s failed unexpectedly", command)
            return 1, spec.error_json(version, cni_code(exc), f"internal error: {exc}"), command


def main(argv=None) -> int:
    """Standalone mode, for tests and benchmarks: serve until SIGTERM or SIGINT."""
    parser = argparse.ArgumentParser(prog="python -m cni.service", description=__doc__.splitlines()[0])
    parser.add_argument("--run-dir", default=spec.DEFAULT_RUN_DIR)
    parser.add_argument("--not-ready", action="store_true", help="answer STATUS with 50")
    parser.add_argument("--log-level", default="WARNING")
    args = parser.parse_args(argv)
    # Our logger only: pyroute2's debug output would drown it.
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    log.setLevel(args.log_level.upper())
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    service = CniService(Path(args.run_dir))
    service.start()
    service.set_ready(not args.not_ready)
    try:
        stop.wait()
    finally:
        service.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
