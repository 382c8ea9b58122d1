"""overlayd: the host daemon.

Design
------
One asyncio process per host. etcd is the source of truth; the kernel is converged towards it by
a single level-triggered reconcile loop:

    etcd watch events ─┐
    netlink drift ─────┼──> mark dirty ──> reconcile: desired_state() ─ plan() ─ Kernel.apply()
    jittered timer ────┘

Nothing is programmed from inside an event handler: handlers only update the in-memory lease map
(noting which subnets changed) and set the `dirty` event. The desired state is kept up to date
lease by lease (DesiredTracker: equal to desired_state() of every lease, but a lease event costs
what it changes); every resync tick reads the whole kernel back and diffs it against the whole
desired state, so a missed or duplicated event cannot leave the kernel wrong for longer than one
resync interval.

Moved workloads (overlay.moves): a ClaimFollower keeps every address claim in view with a watch
of its own; the reconcile adds a /32 route per granted claim of another host to the subnet data
plane, and the CNI service claims and withdraws addresses through a ClaimHook into this
process's etcd store and lease. A ClaimGranter decides the pending claims on addresses of our own
subnet (refused while a container here has the address, else reserved in the allocator and
granted), and a ClaimKeeper keeps this host's claims equal to its claimed records.

Start-up: read the network config (refusing a bad one, programming nothing), find the underlay,
take a lease (adopting the one this host already holds, so a restart keeps its subnet, VTEP MAC
and every live route), reconcile once, then write the subnet file and tell systemd READY=1.
SIGTERM stops the daemon but leaves the data plane and the lease in place: containers keep
talking while it restarts.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import random
import signal
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path

from . import firewall, sdnotify
from .config import NetworkConfig, parse_config
from .claimhook import ClaimFollower, ClaimGranter, ClaimHook, ClaimKeeper
from .dataplane import (DataplaneState, DesiredTracker, Neighbour, Plan, Route, Underlay, plan,
                        vtep_mac)
from .errors import (ConfigError, LeaseLost, OverlayError, StoreError, StoreUnavailable,
                     SubnetsExhausted, WatchCompacted)
from .etcd import EtcdSettings, EtcdStore, LeaseEvent, listing_not_older
from .health import DaemonStatus, serve_health
from .kernel import Kernel, KernelChange
from .lease import DEFAULT_PREFIX, Lease, LeaseAttrs, choose_subnet
from .moves import moved_away, moved_routes
from .subnetfile import for_subnet, read_subnet_file, write_subnet_file

log = logging.getLogger("overlayd")

DEFAULT_RUN_DIR = Path("/run/overlay")
DEFAULT_LEASE_TTL = 24 * 3600
CLAIM_ATTEMPTS = 20
LEASE_RELIST_INTERVAL = 300.0  # seconds between full re-listings of the leases (a safety net)


@dataclass(frozen=True)
class DaemonSettings:
    etcd: EtcdSettings
    iface: str | None = None
    public_ip: IPv4Address | None = None
    run_dir: Path = DEFAULT_RUN_DIR
    ip_masq: bool = False
    healthz_ip: str = "0.0.0.0"
    healthz_port: int = 0              # 0: no health endpoint
    lease_ttl: int = DEFAULT_LEASE_TTL
    resync_interval: float = 10.0      # the longest a drifted kernel object stays wrong
    cni_service: bool = True           # serve the CNI plugin on <run-dir>/cni.sock
    vxlan_source_filter: bool = True   # accept VXLAN only from current peers' public IPs


class Daemon:
    def __init__(self, settings: DaemonSettings):
        self.settings = settings
        self.status = DaemonStatus()
        self.store = EtcdStore(settings.etcd)
        self.kernel: Kernel | None = None
        self.config: NetworkConfig | None = None
        self.underlay: Underlay | None = None
        self.own: Lease | None = None
        self._peers: dict[IPv4Network, Lease] = {}
        # Subnets whose lease changed since the desired state last saw them (None: rebuild it).
        self._changed_subnets: set[IPv4Network] | None = None
        self._tracker: DesiredTracker | None = None   # the desired state, kept lease by lease
        self.revision = 0                 # etcd revision the lease map reflects
        self.listed_revision = 0          # revision of the last full listing: older events are stale
        self.dirty = asyncio.Event()
        self.moves = ClaimFollower(self.store, self._claims_changed)
        self.keeper = ClaimKeeper(self.store, self.moves, settings.run_dir,
                                  self._live_own, lambda: self.peers)
        self.granter = ClaimGranter(self.store, self.moves, settings.run_dir,
                                    self._live_own)
        self._announced: frozenset[IPv4Address] = frozenset()   # moved-away addresses told to the bridge
        self.lease_lost = asyncio.Event()
        self.own_ttl = settings.lease_ttl   # the TTL etcd granted our lease (an adopted one keeps its own)
        self._renewing: asyncio.Task | None = None   # from the moment a lease is held
        self.stopping = asyncio.Event()
        self._last_logged_peers: int | None = None
        self._vxlan_filter_removed = False
        self.cni = None                   # the CNI service, once the data plane is ready
        # Whether the kernel holds what the last successful reconcile left: the tracker's state
        # at its last commit, plus the /32 routes of moved addresses then (_moved_believed).
        # False: read it back next time.
        self._kernel_known = False
        self._moved_believed: frozenset[Route] = frozenset()
        self._filter_known = False        # the VXLAN filter holds the tracker's committed sources
        self._rules_subnet: IPv4Network | None = None   # our subnet as the iptables rules last written name it
        self._suspicions = 0              # counts netlink events and resync ticks
        # What the kernel is being made to hold (or was, by the last successful reconcile), for
        # telling the echo of our own changes from drift: the tracker, or with moved addresses a
        # whole DataplaneState. None after a failure: every event is drift.
        self._expected: DesiredTracker | DataplaneState | None = None
        # Every kernel call runs on this one thread: pyroute2's synchronous API drives an event
        # loop of its own and refuses to run inside ours, and one thread keeps the calls in order.
        self._netlink_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="netlink")

    @property
    def peers(self) -> dict[IPv4Network, Lease]:
        """The peers' leases by subnet. Changed in place only by _on_lease_event, which notes
        what it changed; a whole new map (a listing) is compared with the old one here."""
        return self._peers

    @peers.setter
    def peers(self, leases: dict[IPv4Network, Lease]) -> None:
        old, self._peers = self._peers, leases
        if self._changed_subnets is not None:
            self._changed_subnets.update(subnet for subnet in old.keys() | leases.keys()
                                         if old.get(subnet) is not leases.get(subnet)
                                         and old.get(subnet) != leases.get(subnet))

    def _note_changed(self, subnet: IPv4Network) -> None:
        if self._changed_subnets is not None:
            self._changed_subnets.add(subnet)

    async def _in_netlink_thread(self, function, *args):
        return await asyncio.get_running_loop().run_in_executor(self._netlink_thread, function, *args)

    # ---------------------------------------------------------------- start-up

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, self.stopping.set)
        health = None
        if self.settings.healthz_port:
            try:
                health = await serve_health(self.status, self.settings.healthz_ip, self.settings.healthz_port)
            except OSError as exc:
                raise ConfigError("--healthz-ip/--healthz-port", f"cannot listen on {self.settings.healthz_ip}:"
                                  f"{self.settings.healthz_port}: {exc.strerror or exc}") from None
        try:
            self.kernel = await self._in_netlink_thread(Kernel)
            self.underlay = await self._in_netlink_thread(
                self.kernel.underlay, self.settings.iface, self.settings.public_ip)
            log.info("underlay: %s, public IP %s, MTU %d", self.underlay.iface,
                     self.underlay.public_ip, self.underlay.mtu)
            if not await self._until_stopped(self._start()):
                return 0
            return await self._serve()
        finally:
            if self._renewing is not None:
                self._renewing.cancel()
                await asyncio.gather(self._renewing, return_exceptions=True)
            await self._close_cni_service()
            if health is not None:
                health.close()
            if self.kernel is not None:
                await self._in_netlink_thread(self.kernel.close)
            self._netlink_thread.shutdown(wait=False)
            await self.store.close()
            log.info("stopped; the data plane and the lease are left in place")

    async def _until_stopped(self, coroutine) -> bool:
        """Run a start-up step unless SIGTERM comes first; False when stopped."""
        task = asyncio.ensure_future(coroutine)
        stop = asyncio.ensure_future(self.stopping.wait())
        done, _ = await asyncio.wait({task, stop}, return_when=asyncio.FIRST_COMPLETED)
        if task in done:
            stop.cancel()
            task.result()
            return True
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        return False

    async def _start(self) -> None:
        self.config = await self._wait_for_config()
        await self._acquire_lease()
        # Renewing starts now, not once serving: start-up can take long (a first reconcile is
        # retried until it succeeds) and an adopted lease may have little time left.
        self._renewing = asyncio.create_task(self._renew_loop(), name="renew")
        backoff = Backoff()
        while True:
            try:
                await self.moves.relist()
                break
            except StoreUnavailable as exc:
                log.warning("etcd unreachable while listing the address claims: %s", exc)
                await asyncio.sleep(backoff.next())
        # Ready means programmed: a first reconcile that fails (say, the underlay device is
        # briefly missing) is retried before the subnet file tells the CNI plugin to go ahead.
        backoff = Backoff()
        await self._reconcile_once()
        while not self.status.in_sync:
            await asyncio.sleep(backoff.next())
            await self._reconcile_once()
        self._write_subnet_file()
        # The CNI service first, then ready: whoever waits for /readyz or READY=1 to run
        # containers finds the plugin's socket answering.
        self.cni = self._start_cni_service()
        self.status.data_plane_ready = True
        log.info("ready: subnet %s, %d peers, %.2f s after start", self.own.subnet, len(self.peers),
                 time.monotonic() - self.status.started_at)
        sdnotify.notify(f"READY=1\nSTATUS=subnet {self.own.subnet}")

    async def _wait_for_config(self) -> NetworkConfig:
        """Read the network config; a missing or bad one is logged and waited out, never programmed."""
        backoff = Backoff()
        last_problem = ""
        while True:
            try:
                raw = await self.store.get_config()
                self.status.store_reachable = True
                if raw is None:
                    problem = f"no network config at {self.settings.etcd.prefix}/config (set one with `overlayctl config set`)"
                else:
                    return parse_config(raw)
            except ConfigError as exc:
                self.status.store_reachable = True
                problem = f"network config refused: {exc}; nothing is programmed until it is fixed"
            except StoreUnavailable as exc:
                self.status.store_reachable = False
                problem = f"etcd unreachable: {exc}"
            if problem != last_problem:
                log.error("%s", problem)
                last_problem = problem
            self.status.problem = problem
            await asyncio.sleep(backoff.next())

    # ---------------------------------------------------------------- the lease

    def _own_attrs(self) -> LeaseAttrs:
        vni = self.config.backend.vni
        return LeaseAttrs(self.underlay.public_ip, vni, vtep_mac(self.underlay.public_ip, vni))

    async def _acquire_lease(self) -> None:
        """Adopt the lease this host holds, else claim a subnet (the previous one if free).

        A lost create-if-absent race is not an error: re-list and try another subnet.
        """
        attrs = self._own_attrs()
        backoff = Backoff()
        attempts = 0
        while True:
            try:
                leases, revision = await self.store.list_leases()
                self.status.store_reachable = True
                mine = [lease for lease in leases if lease.attrs.public_ip == attrs.public_ip
                        and self.config.holds(lease.subnet)]
                for lease in sorted(mine, key=lambda lease: -lease.mod_revision):
                    adopted, granted_ttl = await self._adopt(lease, attrs)
                    if adopted is not None:
                        self._set_own(adopted, "adopted the lease this host already held", granted_ttl)
                        break
                else:
                    taken = {lease.subnet for lease in leases}
                    subnet = choose_subnet(self.config, taken, self._previous_subnets())
                    claimed = await self.store.claim_subnet(subnet, attrs, self.settings.lease_ttl)
                    if claimed is None:
                        attempts += 1
                        log.info("lost the race for %s to another host; trying another subnet", subnet)
                        if attempts >= CLAIM_ATTEMPTS:
                            raise OverlayError(f"could not claim a subnet in {attempts} attempts")
                        continue
                    self._set_own(claimed, "claimed a new lease", self.settings.lease_ttl)
                self.peers = {lease.subnet: lease for lease in leases if lease.subnet != self.own.subnet}
                # Watch from the listing's revision, not from our own claim's (which is later):
                # leases other hosts claimed in between are only seen by a watch that starts
                # here. Starting after our claim lost them, the bug flannel has when many hosts
                # join at once.
                self.revision = self.listed_revision = revision
                self.lease_lost.clear()
                self.dirty.set()
                return
            except SubnetsExhausted as exc:
                self.status.problem = str(exc)
                log.error("%s; waiting for a subnet to be released", exc)
                await asyncio.sleep(backoff.next())
            except StoreUnavailable as exc:
                self.status.store_reachable = False
                self.status.problem = f"etcd unreachable: {exc}"
                log.warning("etcd unreachable while taking a lease: %s", exc)
                await asyncio.sleep(backoff.next())
            except LeaseLost as exc:
                # The etcd lease granted for a claim expired before the claim landed (a short
                # TTL and a slow member): claim again.
                log.warning("the new lease expired before the claim landed (%s); claiming again", exc)
                await asyncio.sleep(backoff.next())

    async def _adopt(self, lease: Lease, attrs: LeaseAttrs) -> tuple[Lease | None, int]:
        """The lease, ours again (its attributes brought up to date), and the TTL etcd granted
        it; (None, 0) when it cannot be had. Adopting renews it: a restart must not let a lease
        with little time left lapse while the first reconcile runs (its peers would drop their
        routes to a data plane that still carries traffic)."""
        if not lease.lease_id:
            return None, 0
        try:
            granted_ttl = await self.store.keepalive(lease.lease_id)
        except LeaseLost:
            return None, 0
        if granted_ttl <= 0:
            return None, 0
        if lease.attrs != attrs:
            log.info("lease %s: announcing %s (was %s)", lease.subnet, attrs, lease.attrs)
            try:
                return await self.store.update_lease_attrs(lease, attrs), granted_ttl
            except LeaseLost:
                log.info("lease %s changed under us while adopting it: claiming instead", lease.subnet)
                return None, 0
        return lease, granted_ttl

    def _previous_subnets(self) -> list[IPv4Network]:
        """The subnet in our subnet file: a host that returns after its lease expired gets it back."""
        try:
            return [read_subnet_file(self.settings.run_dir).subnet.network]
        except (OSError, ValueError):
            return []

    def _set_own(self, lease: Lease, why: str, granted_ttl: int) -> None:
        self.own = lease
        self.own_ttl = granted_ttl
        self.status.subnet = str(lease.subnet)
        self.status.lease_expires_at = time.monotonic() + granted_ttl
        log.info("lease %s (public IP %s, VTEP MAC %s, etcd lease %x): %s", lease.subnet,
                 lease.attrs.public_ip, lease.attrs.vtep_mac, lease.lease_id, why)

    # ---------------------------------------------------------------- running

    async def _serve(self) -> int:
        loop = asyncio.get_running_loop()
        drift = await self._in_netlink_thread(
            self.kernel.watch_drift,
            lambda changes: loop.call_soon_threadsafe(self._on_kernel_changes, changes), None, True)
        tasks = [self._renewing] + [asyncio.create_task(coro, name=name) for name, coro in (
            ("reconcile", self._reconcile_loop()),
            ("watch", self._watch_loop()),
            ("resync", self._resync_timer()),
            ("relist", self._relist_timer()),
            ("claims", self.moves.run()),
            ("relist-claims", self.moves.relist_now_and_then()),
            ("keep-claims", self.keeper.run()),
            ("grant-claims", self.granter.run()),
        )]
        stop = asyncio.create_task(self.stopping.wait())
        try:
            done, _ = await asyncio.wait([stop, *tasks], return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                if task is not stop and task.exception() is not None:
                    # A broken invariant: end the process and let the supervisor restart it.
                    log.critical("%s failed: %r", task.get_name(), task.exception())
                    return 1
            return 0
        finally:
            sdnotify.notify("STOPPING=1")
            # The CNI service first, off the loop and with the tasks still running: a call in
            # flight may need them (a claim is made and decided through the loop and the watch).
            await self._close_cni_service()
            for task in [stop, *tasks]:
                task.cancel()
            await asyncio.gather(stop, *tasks, return_exceptions=True)
            drift.stop()

    async def _close_cni_service(self) -> None:
        """Stop taking calls and wait for those in flight (idempotent)."""
        if self.cni is not None:
            await asyncio.get_running_loop().run_in_executor(None, self.cni.close)

    async def _resync_timer(self) -> None:
        interval = self.settings.resync_interval
        while True:
            await asyncio.sleep(interval * random.uniform(0.5, 1.0))
            self._mark_kernel_suspect()

    def _on_kernel_changes(self, changes: list[KernelChange] | None) -> None:
        """Netlink events about our objects. Those that only say what we believe (the echo of
        our own changes) need no second look; anything else, or anything not described, is drift."""
        expected = self._expected
        if changes is None or expected is None or not _all_as_expected(changes, expected):
            self._mark_kernel_suspect()

    def _mark_kernel_suspect(self) -> None:
        """The kernel may differ from what we believe (a netlink event, or the resync timer):
        the next reconcile reads it back, and checks forwarding and firewall too."""
        self._kernel_known = False
        self._suspicions += 1
        self.dirty.set()

    async def _relist_timer(self) -> None:
        """Re-read every lease now and then, as the kernel is re-read every resync.

        The watch is lossless as far as we can test, but the lease map is what every route is
        computed from: a full listing every few minutes bounds how long any missed event (a
        bug of ours or of etcd's) could keep a peer unreachable. 5000 leases list in ~15 ms.
        """
        while True:
            await asyncio.sleep(LEASE_RELIST_INTERVAL * random.uniform(0.8, 1.0))
            await self._relist_quietly()

    async def _reconcile_loop(self) -> None:
        while True:
            await self.dirty.wait()
            self.dirty.clear()
            await self._reconcile_once()

    async def _reconcile_once(self) -> None:
        """Converge the kernel on the desired state computed from every lease and claim.

        Two depths, one result. When the kernel is suspect (start, resync timer, a netlink event,
        a failure) the actual state is read back and forwarding and firewall are checked: the
        level-triggered repair. When only etcd changed, the kernel is taken to hold what the last
        successful reconcile left (anything else since would have raised a netlink event and made
        it suspect), so a lease event costs no dump of thousands of objects and no fork of
        iptables or nft; and the changes are worked out from the changed leases alone
        (DesiredTracker.pending_plan(), equal to plan() of the whole states): one lease event
        costs what it changes, not what exists, also with 5000 peers.
        """
        started = time.monotonic()
        tracker = self._track_leases()
        claims = self.moves.claims
        moved = (moved_routes(tracker.state().routes, self.own, self.peers.values(), claims.values())
                 if claims else frozenset())
        desired = replace(tracker.state(), routes=tracker.state().routes | moved) if moved else None
        suspect, self._kernel_known = not self._kernel_known, False   # stays False unless this run succeeds
        filter_known, self._filter_known = self._filter_known, False
        suspicions = self._suspicions
        self._expected = desired or tracker
        try:
            changes = None
            if not suspect and not moved and not self._moved_believed:
                changes = tracker.pending_plan()
            if changes is None:
                desired = desired or tracker.state()
                if suspect:
                    actual = await self._in_netlink_thread(self.kernel.read_state, desired.device.name, desired)
                else:
                    actual = tracker.committed_state()
                    if self._moved_believed:
                        actual = replace(actual, routes=actual.routes | self._moved_believed)
                changes = plan(desired, actual)
            # Also at a resync the filter is changed by difference when it is known: the update
            # checks the nftables generation, and any commit since our last one (drift in the
            # filter, whoever made it) turns it into a whole sync that lists the table.
            whole_filter = not filter_known
            added, removed = (frozenset(), frozenset()) if whole_filter else tracker.pending_sources()
            if not changes.empty:
                described = changes.describe()
                for line in described:
                    log.info("%s", line)
                self.status.changes_applied += len(described)
            if (not changes.empty or suspect or whole_filter or added or removed
                    or not self.status.data_plane_ready):
                await self._in_netlink_thread(self._program, changes, suspect, whole_filter, tracker, added,
                                              removed)
            self._filter_known = True
            await self._announce_moved_away(moved)
            tracker.commit()
            self._moved_believed = moved
            if self._suspicions == suspicions:
                # Nothing reported a change meanwhile (our own changes echo back as netlink
                # events, so after a change the next run reads the kernel once more).
                self._kernel_known = True
            self.status.in_sync = True
        except OverlayError as exc:
            self._expected = None
            self.status.in_sync = False
            self.status.reconcile_failures += 1
            self.status.problem = f"reconcile failed: {exc}"
            log.error("reconcile failed: %s; retrying", exc)
            asyncio.get_running_loop().call_later(1.0, self.dirty.set)
        finally:
            elapsed = time.monotonic() - started
            self.status.reconcile_runs += 1
            self.status.last_reconcile_seconds = elapsed
            self.status.reconcile_seconds_total += elapsed
            self.status.peers = len(tracker)
            if self.status.peers != self._last_logged_peers:
                log.info("%d peers programmed (reconcile %.1f ms)", self.status.peers, elapsed * 1000)
                self._last_logged_peers = self.status.peers

    def _program(self, changes: Plan, suspect: bool, whole_filter: bool, tracker: DesiredTracker,
                 added: frozenset[IPv4Address], removed: frozenset[IPv4Address]) -> None:
        """A reconcile's kernel work, in the netlink thread, in one hop from the event loop (each
        hop is a thread wake-up both ways, which at 50 daemons on 2 cores adds up): the plan;
        forwarding and the iptables rules (when the device is new, at start, and checked when the
        kernel is suspect); then the VXLAN filter, after the routes, so a new peer's traffic is
        accepted in the same reconcile that makes it reachable."""
        try:
            if not changes.empty:
                self.kernel.apply(changes)
        finally:
            # Also when the plan failed in part (a peer's entry the kernel refused): the other
            # peers' traffic must not wait on it. The reconcile still fails and is retried.
            if (changes.create_device is not None or not self.status.data_plane_ready
                    or self._rules_subnet != self.own.subnet):   # a lease re-acquired with another subnet
                self._apply_host_settings()
            elif suspect and not self._host_settings_present():
                log.info("ip forwarding off or firewall rules changed: restoring them")
                self._apply_host_settings()
            if whole_filter:
                self._sync_vxlan_filter(tracker.sources())
            elif added or removed or suspect:
                self._update_vxlan_filter(tracker, added, removed)

    def _live_own(self) -> Lease | None:
        """Our lease, or None once it is lost (claims are made and decided only with a live one)."""
        return None if self.lease_lost.is_set() else self.own

    def _track_leases(self) -> DesiredTracker:
        """The desired state brought up to date with the leases changed since the last call: a
        new tracker (from every lease, and a kernel read to diff against) when our own lease,
        the config or the underlay changed, or the lease map was replaced wholesale."""
        tracker = self._tracker
        if (tracker is None or self._changed_subnets is None
                or not tracker.matches(self.own, self.config, self.underlay)):
            tracker = self._tracker = DesiredTracker(self.own, self.config, self.underlay, self.peers.values())
            self._kernel_known = self._filter_known = False
        else:
            for subnet in self._changed_subnets:
                tracker.update(subnet, self.peers.get(subnet))
        self._changed_subnets = set()
        return tracker

    def _claims_changed(self) -> None:
        self.dirty.set()
        self.keeper.wake.set()
        self.granter.wake.set()

    async def _announce_moved_away(self, moved: frozenset[Route]) -> None:
        """Once the /32 of an address moved away from our subnet is in place, tell the bridge's
        containers (gratuitous ARP): they may hold its old MAC. (Only the routes of moved
        addresses can lead out of our own subnet: a peer's subnet never overlaps it.)"""
        away = moved_away(moved, self.own.subnet) if moved else frozenset()
        fresh = away - self._announced
        if fresh:
            sent = await self._in_netlink_thread(self.kernel.announce_moved, sorted(fresh),
                                                 self.own.subnet.network_address + 1)
            if sent:
                log.info("announced %s on the CNI bridge: moved to other hosts", ", ".join(map(str, sorted(fresh))))
        self._announced = away

    def _host_settings_present(self) -> bool:
        return self.kernel.ip_forward() and firewall.rules_present()

    def _apply_host_settings(self) -> None:
        self.kernel.set_ip_forward(True)
        firewall.apply_rules(self.config.network, self.own.subnet, self.settings.ip_masq)
        self._rules_subnet = self.own.subnet

    def _sync_vxlan_filter(self, sources: frozenset[IPv4Address]) -> None:
        """Drop VXLAN from anyone but the current peers (after the routes, so a new peer's
        traffic is accepted in the same reconcile that makes it reachable)."""
        if not self.settings.vxlan_source_filter:
            if not self._vxlan_filter_removed:
                firewall.remove_vxlan_filter()   # switched off: a filter left by an earlier run goes
                self._vxlan_filter_removed = True
            return
        done = firewall.sync_vxlan_filter(self.config.backend.port, sources)
        if done:
            log.info("VXLAN accepted from %d peer address(es) (%s rewritten)", len(sources),
                     "set" if done == "elements" else "filter table")

    def _update_vxlan_filter(self, tracker: DesiredTracker, added: frozenset[IPv4Address],
                             removed: frozenset[IPv4Address]) -> None:
        """A lease event's change to the VXLAN filter: the changed addresses alone when the
        filter is known to be as we left it (firewall.update_vxlan_filter), else a whole sync."""
        if not self.settings.vxlan_source_filter:
            return
        if not firewall.update_vxlan_filter(self.config.backend.port, added, removed):
            self._sync_vxlan_filter(tracker.sources())

    def _write_subnet_file(self) -> None:
        contents = for_subnet(self.config.network, self.own.subnet,
                              self.underlay.mtu - 50, self.settings.ip_masq)
        path = write_subnet_file(self.settings.run_dir, contents)
        log.info("wrote %s (FLANNEL_SUBNET=%s)", path, contents.subnet)

    def _mark_lease_lost(self) -> None:
        """Our subnet may change: until it is claimed again, the CNI service answers ADD with
        "try again later" rather than hand out addresses from a subnet we may not keep."""
        self.lease_lost.set()
        if self.cni is not None:
            self.cni.set_ready(False)

    def _start_cni_service(self):
        if not self.settings.cni_service:
            return None
        try:
            from cni.service import CniService
        except ImportError:
            log.warning("CNI service not available: the plugin will work in its slow, standalone mode")
            return None
        hook = ClaimHook(asyncio.get_running_loop(), self.store,
                         self._live_own,
                         self.moves, self._claims_changed, leases=lambda: self.peers)
        service = CniService(self.settings.run_dir, claims=hook)
        service.start()
        service.set_ready(True)
        return service

    # ---------------------------------------------------------------- watching etcd

    async def _watch_loop(self) -> None:
        backoff = Backoff()
        while True:
            try:
                if self.lease_lost.is_set():
                    await self._acquire_lease()
                    self.keeper.wake.set()   # claims bound to the old lease went with it
                    self._write_subnet_file()
                    if self.cni is not None:
                        self.cni.set_ready(True)
                await self._watch_until_lease_lost(backoff)
            except WatchCompacted as exc:
                log.warning("watch from revision %d compacted (now %d): re-listing every lease",
                            self.revision + 1, exc.compact_revision)
                # etcd may go away right then: not a broken invariant, the next watch tries again
                # (after a pause: a watch from the same revision is compacted again).
                if not await self._relist_quietly():
                    await asyncio.sleep(backoff.next())
            except (StoreUnavailable, StoreError) as exc:
                # StoreError: etcd refused the watch itself. Not a broken invariant of ours, so
                # no reason to take the data plane's supervisor down with it: retry, say why.
                self.status.store_reachable = False
                self.status.problem = f"etcd unreachable: {exc}"
                log.warning("etcd watch interrupted: %s; resuming from revision %d", exc, self.revision + 1)
                await asyncio.sleep(backoff.next())
                await self._relist_quietly()

    async def _watch_until_lease_lost(self, backoff: Backoff) -> None:
        """Apply lease events until our lease is found lost, by an event or by anyone else (the
        renewal, a re-listing): a quiet cluster may send no event for a long while."""
        async def follow() -> None:
            async for event in self.store.watch_leases(self.revision + 1):
                self.status.store_reachable = True
                backoff.reset()
                self._on_lease_event(event)
                if self.lease_lost.is_set():
                    return
        following = asyncio.ensure_future(follow())
        lost = asyncio.ensure_future(self.lease_lost.wait())
        try:
            await asyncio.wait({following, lost}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (following, lost):
                task.cancel()
            await asyncio.gather(following, lost, return_exceptions=True)
        if not following.cancelled():
            following.result()   # its failure is the caller's to handle (compaction, etcd away)

    def _on_lease_event(self, event: LeaseEvent) -> None:
        if event.revision <= self.listed_revision:
            return  # already reflected by a listing taken after it
        self.revision = max(self.revision, event.revision)
        if self.own is not None and event.subnet == self.own.subnet:
            if event.lease is None:
                log.warning("our lease %s was deleted from etcd: re-acquiring", event.subnet)
                self._mark_lease_lost()
            elif event.lease.attrs.public_ip != self.underlay.public_ip:
                log.warning("our lease %s was taken over by %s in etcd: re-acquiring", event.subnet,
                            event.lease.attrs.public_ip)
                self._mark_lease_lost()
            return
        if event.lease is None:
            if self.peers.pop(event.subnet, None) is not None:
                self._note_changed(event.subnet)
                log.info("peer %s left", event.subnet)
                self.dirty.set()
        elif self.peers.get(event.subnet) != event.lease:
            previous = self.peers.get(event.subnet)
            self.peers[event.subnet] = event.lease
            self._note_changed(event.subnet)
            if previous is None or previous.attrs != event.lease.attrs:
                log.info("peer %s %s: public IP %s, VTEP MAC %s", event.subnet,
                         "joined" if previous is None else "changed",
                         event.lease.attrs.public_ip, event.lease.attrs.vtep_mac)
                self.dirty.set()

    async def _relist(self) -> None:
        # Not older than what the watch applied meanwhile (the timer's re-list runs beside it).
        leases, revision = await listing_not_older(self.store.list_leases, lambda: self.revision)
        self.status.store_reachable = True
        own_subnet = self.own.subnet if self.own else None
        mine = next((lease for lease in leases if lease.subnet == own_subnet), None)
        if mine is None or mine.attrs.public_ip != self.underlay.public_ip:
            log.warning("our lease %s is gone from etcd: re-acquiring", own_subnet)
            self._mark_lease_lost()
        self.peers = {lease.subnet: lease for lease in leases if lease.subnet != own_subnet}
        self.revision = max(self.revision, revision)
        self.listed_revision = revision
        self.dirty.set()

    async def _relist_quietly(self) -> bool:
        """Whether the leases could be listed."""
        try:
            await self._relist()
            return True
        except (StoreUnavailable, StoreError) as exc:
            log.warning("re-listing the leases failed: %s; the watch will try again", exc)
            return False

    # ---------------------------------------------------------------- renewing the lease

    async def _renew_loop(self) -> None:
        """Keep the etcd lease alive well before it expires; notice quickly if it was lost."""
        while True:
            # The TTL of the lease held now: an adopted lease keeps the one it was granted.
            ttl = self.own_ttl
            interval = max(0.5, min(ttl / 3, 60.0))
            # A member that hangs (neither answers nor resets the connection) costs one attempt's
            # wait before the next member is tried: keep interval + that wait well inside the TTL.
            attempt_timeout = max(0.2, min(2.0, ttl / 6))
            await asyncio.sleep(interval)
            lease = self.own
            if self.lease_lost.is_set() or lease is None:
                continue
            try:
                left, gone = await self.store.keepalive(lease.lease_id, attempt_timeout), None
            except LeaseLost as exc:
                left, gone = 0, exc
            except (StoreUnavailable, StoreError) as exc:
                # StoreError too: a member answering "context deadline exceeded" mid-election is
                # no reason to end the daemon, whose lease the next renewal may still save.
                self.status.store_reachable = False
                self.status.problem = f"etcd unreachable: {exc}"
                log.warning("lease renewal failed: %s (lease has %.0f s left)", exc,
                            self.status.lease_seconds_left())
                continue
            if self.own is not lease or self.lease_lost.is_set():
                continue   # lost and re-acquired meanwhile: this answer is about the old lease
            if gone is None:
                self.status.store_reachable = True
            if left > 0:
                self.status.lease_expires_at = time.monotonic() + left
                continue
            log.warning("etcd lease of %s %s: re-acquiring", lease.subnet, f"is gone ({gone})" if gone else "expired")
            self._mark_lease_lost()
            self.dirty.set()


def _all_as_expected(changes: list[KernelChange], expected: DataplaneState | DesiredTracker) -> bool:
    """Whether netlink events say only what `expected` holds: objects of it present, objects not
    in it gone. (A gone neighbour is known by its address alone.)"""
    for change in changes:
        item = change.item
        if isinstance(item, Neighbour) and not change.present:
            if expected.wants_neighbour_at(item.ip):
                return False
        elif expected.wants(item) != change.present:
            return False
    return True


class Backoff:
    """Exponential backoff with jitter, 0.2 s doubling to 5 s."""

    def __init__(self, first: float = 0.2, cap: float = 5.0):
        self.first, self.cap, self.current = first, cap, first

    def next(self) -> float:
        delay = self.current * random.uniform(0.8, 1.2)
        self.current = min(self.cap, self.current * 2)
        return delay

    def reset(self) -> None:
        self.current = self.first


# -------------------------------------------------------------------- command line

def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").lower() in ("1", "true", "yes", "on")


LOG_LEVELS = ("debug", "info", "warning", "error", "critical")


def build_parser() -> argparse.ArgumentParser:
    env = os.environ.get
    parser = argparse.ArgumentParser(
        prog="overlayd",
        description="Lease a subnet from etcd and keep this host's VXLAN overlay in sync. "
                    "Every flag has an environment-variable twin, shown in brackets.")
    parser.add_argument("--etcd-endpoints", default=env("OVERLAY_ETCD_ENDPOINTS", "http://127.0.0.1:2379"),
                        help="comma-separated etcd client URLs [OVERLAY_ETCD_ENDPOINTS]")
    parser.add_argument("--etcd-prefix", default=env("OVERLAY_ETCD_PREFIX", DEFAULT_PREFIX),
                        help="etcd key prefix of the network [OVERLAY_ETCD_PREFIX]")
    parser.add_argument("--etcd-cafile", default=env("OVERLAY_ETCD_CAFILE"), help="[OVERLAY_ETCD_CAFILE]")
    parser.add_argument("--etcd-certfile", default=env("OVERLAY_ETCD_CERTFILE"), help="[OVERLAY_ETCD_CERTFILE]")
    parser.add_argument("--etcd-keyfile", default=env("OVERLAY_ETCD_KEYFILE"), help="[OVERLAY_ETCD_KEYFILE]")
    parser.add_argument("--iface", default=env("OVERLAY_IFACE"),
                        help="underlay interface (default: the default route's) [OVERLAY_IFACE]")
    parser.add_argument("--public-ip", default=env("OVERLAY_PUBLIC_IP"),
                        help="address peers send VXLAN to (default: the interface's first) [OVERLAY_PUBLIC_IP]")
    parser.add_argument("--run-dir", default=env("OVERLAY_RUN_DIR", str(DEFAULT_RUN_DIR)),
                        help="where subnet.env and the CNI socket live [OVERLAY_RUN_DIR]")
    parser.add_argument("--ip-masq", action="store_true", default=_env_flag("OVERLAY_IP_MASQ"),
                        help="masquerade traffic leaving the overlay network, and entering it from outside "
                             "other than to this host's own subnet (flannel's rules) [OVERLAY_IP_MASQ]")
    parser.add_argument("--healthz-ip", default=env("OVERLAY_HEALTHZ_IP", "0.0.0.0"), help="[OVERLAY_HEALTHZ_IP]")
    # Defaults from the environment stay strings: argparse converts them with `type`, so a bad
    # value is reported as a usage error naming the option, not as a traceback.
    parser.add_argument("--healthz-port", type=int, default=env("OVERLAY_HEALTHZ_PORT", "0"),
                        help="serve /healthz, /readyz, /metrics here; 0 = off [OVERLAY_HEALTHZ_PORT]")
    parser.add_argument("--subnet-lease-ttl", type=int, default=env("OVERLAY_SUBNET_LEASE_TTL", str(DEFAULT_LEASE_TTL)),
                        help="seconds a lease lives unless renewed (default 24 h) [OVERLAY_SUBNET_LEASE_TTL]")
    parser.add_argument("--resync-interval", type=float, default=env("OVERLAY_RESYNC_INTERVAL", "10"),
                        help="longest time between full reconciles, jittered (max 10) [OVERLAY_RESYNC_INTERVAL]")
    parser.add_argument("--no-cni-service", action="store_true", default=_env_flag("OVERLAY_NO_CNI_SERVICE"),
                        help="do not serve the CNI plugin from this process [OVERLAY_NO_CNI_SERVICE]")
    parser.add_argument("--no-vxlan-source-filter", action="store_true",
                        default=_env_flag("OVERLAY_NO_VXLAN_SOURCE_FILTER"),
                        help="accept VXLAN from any address, not only from current peers' public IPs "
                             "(for peers whose VXLAN source is not the public IP of their lease) "
                             "[OVERLAY_NO_VXLAN_SOURCE_FILTER]")
    parser.add_argument("--log-level", type=str.lower, choices=LOG_LEVELS, default=env("OVERLAY_LOG_LEVEL", "info"),
                        help="[OVERLAY_LOG_LEVEL]")
    return parser


def settings_from_args(args: argparse.Namespace) -> DaemonSettings:
    def path(value):
        return Path(value) if value else None
    try:
        public_ip = IPv4Address(args.public_ip) if args.public_ip else None
    except ValueError:
        raise ConfigError("--public-ip", f"{args.public_ip!r} is not an IPv4 address") from None
    if not 0 < args.resync_interval <= 10:
        raise ConfigError("--resync-interval", "must be more than 0 and at most 10 seconds")
    if args.subnet_lease_ttl < 2:
        raise ConfigError("--subnet-lease-ttl", "must be at least 2 seconds")
    if not 0 <= args.healthz_port <= 65535:
        raise ConfigError("--healthz-port", f"{args.healthz_port} is not a TCP port (0 turns the endpoint off)")
    etcd = EtcdSettings.from_flags(args.etcd_endpoints, args.etcd_prefix, path(args.etcd_cafile),
                                   path(args.etcd_certfile), path(args.etcd_keyfile))
    return DaemonSettings(
        etcd=etcd, iface=args.iface, public_ip=public_ip, run_dir=Path(args.run_dir),
        ip_masq=args.ip_masq, healthz_ip=args.healthz_ip, healthz_port=args.healthz_port,
        lease_ttl=args.subnet_lease_ttl, resync_interval=args.resync_interval,
        cni_service=not args.no_cni_service, vxlan_source_filter=not args.no_vxlan_source_filter)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.log_level not in LOG_LEVELS:   # from OVERLAY_LOG_LEVEL: argparse checks only what it parsed
        print(f"overlayd: log level {args.log_level!r} is not one of {', '.join(LOG_LEVELS)}", file=sys.stderr)
        return 2
    logging.basicConfig(level=args.log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # Nobody prints a record's caller (file, line, function), thread or process: not working
    # them out for every record (the logging HOWTO's "Optimization") saves a fifth of what a
    # lease event's few log lines cost, and with 50 daemons on two cores every event counts.
    logging._srcfile = None
    logging.logThreads = logging.logProcesses = logging.logMultiprocessing = False
    try:
        settings = settings_from_args(args)
    except (ConfigError, ValueError) as exc:
        print(f"overlayd: {exc}", file=sys.stderr)
        return 2
    try:
        return asyncio.run(Daemon(settings).run())
    except OverlayError as exc:
        log.critical("%s", exc)
        return 1


if __name__ == "__main__":
    sys.exit(main())
