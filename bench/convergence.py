"""Convergence: from a new host's lease appearing in etcd to its route, neighbour and FDB entry on
every other host, with N = 2, 5, 10, 20, 50 real lab hosts; and a daemon's start-to-ready time.

Design notes
- One lab grows through the sizes: for size N it holds N-1 converged "observer" hosts, and a
  newcomer (the N-th host) joins, is measured, leaves, and joins again, `joins` times.
- The two clocks are both this machine's wall clock, read by observers that do nothing else:
    * etcd side: our own watch of `<prefix>/` from the root namespace, reached over the same bridge
      as the daemons' watches, in a process of its own (bench.stampwatch) that stamps each event
      with time.time() on arrival and does nothing else (a thread of this busy process stamped
      late); its "created" answer proves the watch is live before anything is timed.
    * kernel side: `ip -ts monitor route neigh` in every observer's namespace: iproute2 stamps each
      netlink notification (microseconds, wall clock) as it receives it; FDB entries arrive on the
      same neighbour group (family AF_BRIDGE) and print as `<dst> dev flannel.1 lladdr <mac>`. A
      probe neighbour on eth0 proves each monitor is live. No polling, so nothing competes with
      the daemons for the two CPUs, and the stamp is the kernel event, not when we looked.
  Our watcher is one more etcd client in one more process, so on a loaded machine it can hear of
  a lease a few ms after a daemon has already programmed it. So t_lease is the first moment
  anyone shows the lease (our watch, or any observer's first kernel object): it cannot be before
  the etcd commit, and it is never later than our watch. Each join also keeps the figure from
  the watch stamp alone (converged_all_from_watch_s) and how late the watch was (watch_late_s).
  Per join: t_lease (above); for each observer the time its last of the
  three objects appeared; convergence = the latest observer - t_lease ("present on every other
  host"); the median observer is kept too. Ready = start_daemon() to /readyz answering 200
  (polled every 10 ms, so it includes the interpreter's start-up), with the daemon's own
  "ready ... s after start" from its log beside it.
- Leaving: SIGTERM the newcomer's daemon (which leaves its lease), delete its lease with etcdctl,
  and wait for all three "Deleted" events on every observer (that removal time is reported too,
  from the delete being in etcd: the earlier of our watch's DELETE and the first removal seen).
  The next join reuses the newcomer's namespace with its VXLAN device and subnet file removed:
  to the others it is a new host with a new lease (a random subnet); its public IP and VTEP MAC
  are the same, so the join must wait for that clean-up or it would find objects present. At
  the end of a size the newcomer stays (daemon started) as one more observer, and the next
  newcomer is a host the lab never had (see reset_newcomer for why not a recreated one).
- Target from issue 5: p99 under 200 ms at 50 hosts. With `joins` samples per size, p99 is
  close to the maximum; n is reported.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from datetime import datetime

from overlay.lab import Lab, LabHost
from overlay.lease import subnets_prefix

from .common import P99_SAMPLES, Progress, bench_lab, machine, now_iso, summary, write_result

_STAMP = re.compile(r"^\[(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d+)\]\s?(.*)$")
_READY_LOG = re.compile(r"ready: subnet \S+, \d+ peers, ([0-9.]+) s after start")
PROBE_MAC = "02:00:5e:00:53:01"


@dataclass(frozen=True)
class ConvergenceOptions:
    sizes: tuple[int, ...] = (2, 5, 10, 20, 50)
    joins: int = 10
    deadline: float = 60.0        # per join, for anything to show up

    @classmethod
    def smoke(cls) -> "ConvergenceOptions":
        return cls(sizes=(2,), joins=1)


# ------------------------------------------------------------------------------- observers

class LineStream:
    """A child process whose stdout lines are collected by a thread, each with a stamp."""

    def __init__(self, process: subprocess.Popen, stamp):
        self.process = process
        self.lines: list[tuple[float, str]] = []
        self._stamp = stamp
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        for raw in self.process.stdout:
            stamped = self._stamp(raw.rstrip("\n"))
            if stamped is not None:
                with self._lock:
                    self.lines.append(stamped)

    def since(self, start: int = 0) -> list[tuple[float, str]]:
        with self._lock:
            return self.lines[start:]

    def __len__(self) -> int:
        with self._lock:
            return len(self.lines)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
        try:
            self.process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def _ip_stamp(line: str) -> tuple[float, str] | None:
    match = _STAMP.match(line)
    if not match:
        return None
    return datetime.fromisoformat(match[1]).timestamp(), match[2].strip()


class EtcdWatch:
    """Every event under the lab's network prefix, stamped on arrival by bench.stampwatch:
    [(time seen, PUT|DELETE, key, value)]."""

    def __init__(self, lab: Lab, timeout: float = 30.0):
        self.lab = lab
        process = subprocess.Popen([sys.executable, "-m", "bench.stampwatch", lab.etcd_endpoints[0],
                                    lab.prefix.rstrip("/") + "/"],
                                   stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                   text=True, bufsize=1)
        self.created = threading.Event()
        self.stream = LineStream(process, self._parse)
        if not self.created.wait(timeout):
            self.stop()
            raise RuntimeError("the etcd watch (bench.stampwatch) was not created")

    def _parse(self, line: str):
        if line == "CREATED":
            self.created.set()
            return None
        stamp, kind, key, value = line.split("\t", 3)
        return float(stamp), kind, key, value

    def events(self, start: int = 0) -> list[tuple[float, str, str, str]]:
        return self.stream.since(start)

    def stop(self) -> None:
        self.stream.stop()


class KernelMonitor:
    """`ip -ts monitor route neigh` in one host's namespace."""

    def __init__(self, lab: Lab, host: LabHost):
        self.host = host
        process = lab.spawn(host, ["ip", "-ts", "monitor", "route", "neigh"], stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True, bufsize=1)
        self.stream = LineStream(process, _ip_stamp)
        self.lab = lab

    def probe(self) -> None:
        """Make and remove a neighbour on eth0 until the monitor reports it: then it is live."""
        address = "192.0.2.254"   # TEST-NET-1: never a real neighbour
        started = time.monotonic()
        while True:
            self.lab.exec(self.host, ["ip", "neigh", "replace", address, "lladdr", PROBE_MAC, "dev", "eth0",
                                      "nud", "permanent"], check=True)
            self.lab.exec(self.host, ["ip", "neigh", "del", address, "dev", "eth0"])
            if any(line.startswith(f"{address} dev eth0") or line.startswith(f"Deleted {address} dev eth0")
                   for _, line in self.stream.since(0)):
                return
            if time.monotonic() - started > 20:
                raise RuntimeError(f"ip monitor in {self.host.name} reports nothing")
            time.sleep(0.1)

    def stop(self) -> None:
        self.stream.stop()


def _objects_seen(lines: list[tuple[float, str]], subnet: str, gateway: str, public_ip: str, mac: str,
                  device: str, deleted: bool) -> dict[str, float]:
    """{route|neighbour|fdb: first stamp} of the newcomer's three objects in a monitor's lines."""
    head = "Deleted " if deleted else ""
    wanted = {
        "route": f"{head}{subnet} via {gateway} dev {device}",
        # A deleted neighbour is reported without its address (it passes through FAILED first).
        "neighbour": f"{head}{gateway} dev {device}" + ("" if deleted else f" lladdr {mac}"),
        "fdb": f"{head}{public_ip} dev {device} lladdr {mac}",
    }
    seen: dict[str, float] = {}
    for stamp, line in lines:
        for kind, prefix in wanted.items():
            if kind not in seen and line.startswith(prefix):
                seen[kind] = stamp
    return seen


# ------------------------------------------------------------------------------- one join

def _daemon_reported_ready(lab: Lab, host: LabHost) -> float | None:
    matches = _READY_LOG.findall(lab.daemon_log(host, lines=400))
    return float(matches[-1]) if matches else None


def reset_newcomer(lab: Lab, host: LabHost) -> None:
    """Make the newcomer's namespace a host that never ran a daemon: no device, no subnet file.

    The namespace itself is kept across joins on purpose: a new namespace for the same index gets
    a new eth0 MAC while the root namespace and the observers still hold an ARP entry for that
    public IP with the old one, and /readyz and VXLAN packets go nowhere for 30-50 s."""
    lab.exec(host, ["ip", "link", "del", lab.vxlan_device])
    for leftover in host.run_dir.glob("*"):
        if leftover.is_file():
            leftover.unlink()


def join_once(lab: Lab, host: LabHost, watch: EtcdWatch, monitors: dict[str, KernelMonitor],
              deadline: float) -> dict:
    device = lab.vxlan_device
    reset_newcomer(lab, host)
    marks = {name: len(monitor.stream) for name, monitor in monitors.items()}
    first_event = len(watch.events())
    started = time.time()
    lab.start_daemon(host)
    limit = time.monotonic() + deadline
    lease = None
    ready_at = None
    seen: dict[str, dict[str, float]] = {}
    while True:
        if ready_at is None and lab.ready(host, timeout=0.5):
            ready_at = time.time()
        if lease is None:
            for stamp, kind, key, value in watch.events(first_event):
                if kind == "PUT" and key.startswith(subnets_prefix(lab.prefix)):
                    attrs = json.loads(value)
                    if attrs.get("PublicIP") == str(host.public_ip):
                        lease = (stamp, key, attrs)
                        break
        if lease is not None:
            subnet = lease[1].rsplit("/", 1)[1].replace("-", "/")
            gateway = subnet.split("/")[0]
            mac = lease[2]["BackendData"]["VtepMAC"]
            seen = {name: _objects_seen(monitor.stream.since(marks[name]), subnet, gateway, str(host.public_ip),
                                        mac, device, deleted=False)
                    for name, monitor in monitors.items()}
            if ready_at is not None and all(len(kinds) == 3 for kinds in seen.values()):
                break
        if time.monotonic() > limit:
            missing = {name: sorted({"route", "neighbour", "fdb"} - set(kinds)) for name, kinds in seen.items()
                       if len(kinds) < 3}
            raise RuntimeError(f"join of {host.name} not converged after {deadline:.0f} s: lease "
                               f"{'seen' if lease else 'never seen'}, ready {ready_at is not None}, "
                               f"missing {missing}; log:\n{lab.daemon_log(host)}")
        time.sleep(0.02)
    # The lease was in etcd no later than the first moment anyone shows it: our watch, or a
    # daemon's kernel object (our watcher can hear of it a few ms after the daemons did).
    watch_at = lease[0]
    t_lease = min([watch_at] + [min(kinds.values()) for kinds in seen.values()])
    per_observer = {name: max(kinds.values()) - t_lease for name, kinds in seen.items()}
    result = {
        "host": host.name, "subnet": subnet,
        "lease_after_start_s": t_lease - started,
        "ready_s": ready_at - started,
        "ready_self_reported_s": _daemon_reported_ready(lab, host),
        "converged_all_s": max(per_observer.values()) if per_observer else 0.0,
        "converged_median_observer_s": sorted(per_observer.values())[len(per_observer) // 2] if per_observer else 0.0,
        "converged_all_from_watch_s": max(per_observer.values()) + t_lease - watch_at if per_observer else 0.0,
        "watch_late_s": watch_at - t_lease,
    }
    # Leave: lease deleted by hand (SIGTERM leaves it), every observer removes all three objects.
    lab.stop_daemon(host)
    marks = {name: len(monitor.stream) for name, monitor in monitors.items()}
    first_delete_event = len(watch.events())
    lab.etcdctl("del", lease[1])
    limit = time.monotonic() + deadline
    while True:
        gone = {name: _objects_seen(monitor.stream.since(marks[name]), subnet, gateway, str(host.public_ip),
                                    mac, device, deleted=True)
                for name, monitor in monitors.items()}
        deleted = next((stamp for stamp, kind, key, _ in watch.events(first_delete_event)
                        if kind == "DELETE" and key == lease[1]), None)
        if deleted is not None and all(len(kinds) == 3 for kinds in gone.values()):
            break
        if time.monotonic() > limit:
            raise RuntimeError(f"{host.name} left, but not every observer removed its objects: "
                               f"{ {n: sorted({'route', 'neighbour', 'fdb'} - set(k)) for n, k in gone.items() if len(k) < 3} }")
        time.sleep(0.01)
    # From the delete being in etcd, stamped as the join is (not from etcdctl's start, which
    # added its process start-up and connection to every figure).
    deleted_at = min([deleted] + [min(kinds.values()) for kinds in gone.values()])
    result["removed_all_s"] = max(max(kinds.values()) for kinds in gone.values()) - deleted_at if gone else 0.0
    return result


# ------------------------------------------------------------------------------- the benchmark

def run(results_dir, options: ConvergenceOptions | None = None, progress: Progress | None = None) -> dict:
    options = options or ConvergenceOptions()
    progress = progress or Progress("convergence")
    payload = {"benchmark": "convergence", "started": now_iso(), "machine": machine(),
               "options": {**options.__dict__, "sizes": list(options.sizes)}, "sizes": {}}
    sizes = sorted(options.sizes)
    with bench_lab() as lab:
        payload["lab"] = lab.name
        progress(f"lab {lab.name}: {sizes[0] - 1} observer host(s)")
        lab.up(hosts=sizes[0] - 1)
        lab.wait_converged(timeout=120)
        watch = EtcdWatch(lab)
        monitors: dict[str, KernelMonitor] = {}
        try:
            newcomer = lab.add_host(start_daemon=False)
            for size in sizes:
                missing = size - 1 - (len(lab.hosts) - 1)
                if missing > 0:
                    progress(f"N={size}: {missing} more observer hosts")
                    newcomer_was = newcomer
                    reset_newcomer(lab, newcomer_was)
                    lab.start_daemon(newcomer_was)
                    for _ in range(missing - 1):
                        lab.add_host()
                    newcomer = lab.add_host(start_daemon=False)
                    observers = [host for host in lab.hosts if host.name != newcomer.name]
                    lab.wait_converged(observers, timeout=60 + 10 * size)
                for host in lab.hosts:
                    if host.name not in monitors and host.name != newcomer.name:
                        monitors[host.name] = KernelMonitor(lab, host)
                for monitor in monitors.values():
                    monitor.probe()
                joins = []
                for index in range(options.joins):
                    sample = join_once(lab, newcomer, watch, monitors, options.deadline)
                    joins.append(sample)
                    progress(f"N={size} join {index + 1}/{options.joins}: on all {size - 1} others "
                             f"{sample['converged_all_s'] * 1000:6.1f} ms after the lease, ready "
                             f"{sample['ready_s']:.2f} s after start, removed everywhere "
                             f"{sample['removed_all_s'] * 1000:.0f} ms after the delete")
                payload["sizes"][str(size)] = {
                    "hosts": size,
                    "converged_all_ms": summary([j["converged_all_s"] * 1000 for j in joins], tail=True, digits=2),
                    "converged_median_observer_ms": summary([j["converged_median_observer_s"] * 1000 for j in joins],
                                                            tail=True, digits=2),
                    "removed_all_ms": summary([j["removed_all_s"] * 1000 for j in joins], tail=True, digits=2),
                    "ready_s": summary([j["ready_s"] for j in joins], tail=True, digits=3),
                    "ready_self_reported_s": summary([j["ready_self_reported_s"] for j in joins
                                                      if j["ready_self_reported_s"] is not None], tail=True, digits=3),
                    "lease_after_start_s": summary([j["lease_after_start_s"] for j in joins], digits=3),
                    "joins": joins,
                }
        finally:
            for monitor in monitors.values():
                monitor.stop()
            watch.stop()
    largest = payload["sizes"][str(sizes[-1])]["converged_all_ms"]
    # A p99 needs about 100 joins; with fewer, their p99 is about their maximum, and the target is
    # judged on the slowest join (which the true p99 is below 9 times in 10 at 10 joins).
    tail = largest.get("p99") if largest.get("n", 0) >= P99_SAMPLES else largest.get("max")
    payload["target"] = {"what": "lease-to-every-host under 200 ms at 50 hosts, p99 (the slowest join when "
                                 f"there are fewer than {P99_SAMPLES})",
                         "hosts": sizes[-1], "limit_ms": 200, "p99_ms": largest.get("p99"), "tail_ms": tail,
                         # None: the run did not reach 50 hosts, so the target was not tested.
                         "met": (tail if tail is not None else 1e9) < 200 if sizes[-1] >= 50 else None}
    payload["finished"] = now_iso()
    written = write_result(results_dir, "convergence", payload)
    progress(f"wrote {written}")
    return payload
