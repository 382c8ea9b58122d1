"""The lab: several simulated hosts, a real etcd and one overlayd per host, on one machine.

Design notes
- Everything a lab makes is named `ovl-<name>-<role>` with a name of at most 4 lowercase letters
  and digits (so `ovl-abcd-h123` stays inside the kernel's 15-character interface limit, and no
  lab's prefix is a prefix of another's): the underlay bridge `ovl-<name>-br` in the root
  namespace, host namespaces `ovl-<name>-h<i>` and etcd namespaces `ovl-<name>-e<i>`, each joined
  to the bridge by a veth whose root end has the namespace's name and whose inner end is `eth0`.
  The name is the ownership mark: clean-up deletes exactly the namespaces and links that carry
  `ovl-<name>-`, and kills exactly the processes living in those namespaces.
- Underlay: one /24 of 198.18.0.0/15 (RFC 2544 benchmarking space) per lab: the bridge is .1,
  etcd members .2.., hosts .11... The /24 is the first one that nothing in the root namespace
  routes and no other lab's state claims; the choice and the bridge creation happen under a file
  lock, so two `lab up` running at once cannot pick the same one. The root namespace reaches every
  member and host directly over the bridge: `overlayctl leases --lab NAME` and the /readyz probes
  run from here, and nothing is forwarded or NATed by the root namespace.
- State lives in /run/overlay-lab/<name>/: state.json (what was made, written atomically, and
  written *before* each kernel change, so a crash leaves a record of at least everything that
  exists), etcd data, per-host run dirs (the daemons' --run-dir) and logs/. /run is a tmpfs, so a
  reboot, which also drops namespaces and processes, drops the state too.
- Tear-down never trusts the state: `teardown(name)` lists the `ovl-<name>-*` namespaces and links
  that exist, kills every process inside those namespaces (`ip netns pids`: SIGTERM, then SIGKILL
  after a grace period), deletes the root veth ends (which takes their peers along), the bridge
  and the namespaces, then removes the state dir, and checks that nothing is left. So `down` works
  after a crash, after a `kill -9` of everything, and after an `up` that stopped half-way (which
  `up` itself also rolls back when it fails in-process).
- etcd with TLS (`up(etcd_tls=True)`, `lab up --etcd-tls`): the lab makes its own CA, one server
  certificate for every member's underlay IP and one client certificate (make_test_pki, under
  <state dir>/pki, 0700, keys 0600); members serve https with client-cert-auth, and everything
  the lab runs against etcd (the daemons' --etcd-cafile/--etcd-certfile/--etcd-keyfile, its own
  etcdctl, etcd_settings() behind `overlayctl leases --lab`) presents that client certificate.
  Peers stay plain http on the underlay (etcd_server's choice). A fresh CA per lab means a
  certificate of one lab is refused by every other.
- Processes (etcd members, daemons) are started detached: own session, stdin from /dev/null,
  output appended to a log in the state dir, pid recorded. A lab outlives the `overlayctl lab up`
  that made it; a `Lab` object in a test is just a handle on the same state and also reaps the
  children it started itself.
- The network config (flannel JSON, VXLAN VNI 1, port 8472) is validated with the daemon's own
  parser and written to etcd with etcdctl before any daemon starts, so every daemon finds it at
  once. etcdctl rather than our client keeps the lab's mechanics independent of the code under test.
- Waiting is polling against a deadline (`wait_until`), never a fixed sleep: readiness is the
  daemon's /readyz; convergence is the kernel's end state (a route to every peer's subnet on the
  VXLAN device in each host namespace); reachability is a ping over the overlay.
- Containers are attached exactly as a runtime attaches them, so the lab exercises the real CNI
  path: every host gets the `overlay` plugin and a conflist installed in the state dir
  (cni/<host>/bin, cni/<host>/net.d, runDir = the host's run dir), a container is a network
  namespace `ovl-<name>-<host>c<j>`, and `cni.runtime.ConfList` execs the plugin from the host's
  namespace (nsenter) with the CNI environment and the conflist's config on stdin, as libcni does.
  A container is recorded in state.json before its namespace exists, and its ADD result is kept
  (libcni caches it too) to be passed to DEL. `down` first runs DEL for every recorded container
  while the daemons still live (best effort: a dead daemon only costs a code 11), then removes
  whatever `ovl-<name>-*` exists as for every other object; a crash leaves nothing `down` misses.
- A move (`move_container`, `overlayctl lab move`) is a runtime migrating a workload: the
  container's namespace stays (as a live migration keeps a VM's memory, its sockets survive), the
  plugin's DEL runs on the old host, then its ADD on the new host with CNI_ARGS `IP=` the address
  it had. The new host's plugin runs in the new host's namespace with CNI_NETNS naming the same
  container namespace, so the new veth pair has its host end there. The record's host changes
  before the ADD: a crash in between leaves a container that `down` DELs on its new host.
- The lab's root namespace is its outside world: it routes only the underlay /24 on the bridge
  and never the overlay network, so a container's packet to the bridge address can only be
  answered if its host masqueraded it (overlayd runs with --ip-masq); `masquerade_probe` shows
  the source address the packet carried on the underlay, read from the host's veth.

The API at a glance (the CLI, the demo, the tests and the benchmarks all use it):

    with Lab("t1") as lab:                  # leaving the block always tears the lab down
        lab.up(hosts=3, etcd_members=1)     # network=, subnet_lease_ttl=, start_daemons=, daemon_args=, etcd_tls=
        lab.wait_converged(timeout=60)      # wait_ready(); then a VXLAN route to every peer everywhere
        lab.reachability()                  # {(from, to): rtt ms or None} over the overlay
        lab.exec("h1", ["ip", "route"])     # spawn() for background work; nsenter=True for runtimes
        lab.restart("h2"); lab.stop_daemon("h2", sig); lab.kill_daemon("h2"); lab.start_daemon("h2")
        lab.add_host(); lab.remove_host("h3"); lab.status(); lab.etcdctl("get", ...); lab.etcd_settings(); lab.etcd_tls
        lab.add_container("h1"); lab.remove_container("h1c1"); lab.containers  # also up(containers=M)
        lab.move_container("h1c1", "h3")    # same netns, same address: DEL on h1, ADD with IP= on h3
        lab.container_reachability(); lab.masquerade_probe("h1c1"); lab.detach_containers()
    teardown("t1"); teardown_all()          # from what exists, whatever the state
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Interface, IPv4Network
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence, TypeVar

from .config import DEFAULT_VNI, DEFAULT_VXLAN_PORT, parse_config
from .errors import ConfigError, OverlayError
from .etcd_server import EtcdMember, EtcdProcess, EtcdTLS, make_test_pki, start_cluster, stop_cluster
from .lease import DEFAULT_PREFIX, config_key

LAB_ROOT = Path(os.environ.get("OVERLAY_LAB_ROOT", "/run/overlay-lab"))
DEFAULT_LAB_NAME = "lab"
DEFAULT_NETWORK = "10.244.0.0/16"
UNDERLAY_POOL = IPv4Network("198.18.0.0/15")
# Public IPs of fake peers (leases written straight into etcd by tests and benchmarks): inside
# the range set aside for network benchmarks, and never a lab's underlay. Nothing is sent to
# them; the FDB entries and the VXLAN filter only name them.
FAKE_PEER_POOL = IPv4Network("198.19.224.0/19")
GATEWAY_HOST = 1          # the bridge's address in the lab's /24
FIRST_ETCD_HOST = 2       # e1 = .2, e2 = .3, ...
FIRST_HOST_HOST = 11      # h1 = .11, h2 = .12, ...
MAX_HOSTS = 254 - FIRST_HOST_HOST
HEALTHZ_PORT = 9180
ETCD_CLIENT_PORT = 2379
ETCD_PEER_PORT = 2380
STATE_VERSION = 1
HOST_IFACE = "eth0"
CONTAINER_IFACE = "eth0"
CNI_NETWORK_NAME = "overlay"
CNI_CALL_TIMEOUT = 30.0   # seconds one plugin call may take before the lab gives up on it

_NAME = re.compile(r"[a-z][a-z0-9]{0,3}")
# What a lab's own objects look like, for `down --all`: a stranger's `ovl-kt-probe` does not match.
_OBJECT = re.compile(r"ovl-([a-z][a-z0-9]{0,3})-(?:br|h[0-9]+|e[0-9]+|h[0-9]+c[0-9]+)")
# A container's own name becomes its namespace `ovl-<lab>-<name>`; names of hosts, etcd members
# and the bridge are taken.
_CONTAINER_NAME = re.compile(r"[a-z0-9][a-z0-9-]{0,23}")
_RESERVED_NAME = re.compile(r"br|h[0-9]+|e[0-9]+")
_ETH_P_ALL = 0x0003
_ETH_P_IP = 0x0800
_RTT = re.compile(r"= [0-9.]+/([0-9.]+)/")

T = TypeVar("T")


class LabError(OverlayError):
    """A lab could not be made, found, or cleaned up; the message says what and how to recover."""


class LabNotFound(LabError):
    """No state for a lab of that name."""


# ------------------------------------------------------------------------------- small helpers

def wait_until(predicate: Callable[[], T], deadline: float, what: str, interval: float = 0.1) -> T:
    """Poll predicate until it returns something truthy (returned) or time.monotonic() > deadline.

    On timeout raises LabError naming `what`. The interval is the polling period, not a wait.
    """
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise LabError(f"timed out waiting for {what}")
        time.sleep(interval)


def validate_name(name: str) -> str:
    if not _NAME.fullmatch(name or ""):
        raise LabError(f"lab name {name!r}: use 1 to 4 lowercase letters or digits, starting with a "
                       f"letter (names must fit the 15-character interface limit)")
    return name


def _run(argv: Sequence[str], input: str | None = None, check: bool = True,
         timeout: float = 30.0) -> subprocess.CompletedProcess:
    result = subprocess.run(list(argv), input=input, capture_output=True, text=True, timeout=timeout,
                            stdin=None if input is not None else subprocess.DEVNULL)
    if check and result.returncode != 0:
        raise LabError(f"`{' '.join(argv)}` failed ({result.returncode}): "
                       f"{(result.stderr or result.stdout).strip()}")
    return result


def _ip_batch(commands: Iterable[str], netns: str | None = None, force: bool = False) -> None:
    """Run ip commands as one `ip -batch` (one process for many changes). force: go on after errors."""
    lines = [line for line in commands if line]
    if not lines:
        return
    argv = ["ip"] + (["-n", netns] if netns else []) + (["-force"] if force else []) + ["-batch", "-"]
    _run(argv, input="\n".join(lines) + "\n", check=not force)


def list_netns() -> list[str]:
    result = _run(["ip", "-j", "netns", "list"], check=False)
    try:
        return [entry["name"] for entry in json.loads(result.stdout or "[]")]
    except (ValueError, KeyError, TypeError):
        return [line.split()[0] for line in result.stdout.splitlines() if line.strip()]


def list_links() -> list[dict]:
    """Links of the root namespace as `ip -j link` reports them."""
    result = _run(["ip", "-j", "link", "show"], check=False)
    try:
        return json.loads(result.stdout or "[]")
    except ValueError:
        return []


def netns_pids(netns: str) -> list[int]:
    result = _run(["ip", "netns", "pids", netns], check=False)
    return [int(word) for word in result.stdout.split() if word.isdigit()]


def pid_alive(pid: int | None) -> bool:
    """A process that exists and is not a zombie (a zombie holds no namespace and does nothing)."""
    if not pid:
        return False
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    # The state letter follows the command name, which is in parentheses and may hold spaces.
    return stat[stat.rfind(")") + 2:stat.rfind(")") + 3] not in ("Z", "X")


def pid_in_netns(pid: int | None, netns: str) -> bool:
    """pid is alive and lives in network namespace netns: a recorded pid is only trusted (and
    signalled) when both hold, so a pid the kernel reused for another process is left alone."""
    if not pid_alive(pid):
        return False
    try:
        return os.stat(f"/proc/{pid}/ns/net").st_ino == os.stat(f"/run/netns/{netns}").st_ino
    except OSError:
        return False


def kill_pids(pids: Iterable[int], grace: float = 3.0, first_signal: int = signal.SIGTERM) -> list[int]:
    """first_signal to every pid, SIGKILL to those still alive after grace; returns the survivors."""
    pids = [pid for pid in set(pids) if pid_alive(pid)]

    def send(signum: int, targets: Iterable[int]) -> None:
        for pid in targets:
            try:
                os.kill(pid, signum)
            except ProcessLookupError:
                pass
            _reap(pid)

    def alive() -> list[int]:
        for pid in pids:
            _reap(pid)
        return [pid for pid in pids if pid_alive(pid)]

    if first_signal != signal.SIGKILL:
        send(first_signal, pids)
        deadline = time.monotonic() + grace
        while alive() and time.monotonic() < deadline:
            time.sleep(0.05)
    send(signal.SIGKILL, alive())
    deadline = time.monotonic() + 10
    while alive() and time.monotonic() < deadline:
        time.sleep(0.05)
    return alive()


def _reap(pid: int) -> None:
    """Collect a child of ours that has exited, so it does not linger as a zombie."""
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass


def _command_name(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


def _log_tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


@contextmanager
def _allocation_lock() -> Iterator[None]:
    LAB_ROOT.mkdir(parents=True, exist_ok=True)
    with open(LAB_ROOT / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _routed_networks() -> list[IPv4Network]:
    """Every IPv4 destination the root namespace routes or holds an address in (default excluded)."""
    found: list[IPv4Network] = []
    result = _run(["ip", "-j", "-4", "route", "show", "table", "all"], check=False)
    try:
        routes = json.loads(result.stdout or "[]")
    except ValueError:
        routes = []
    for route in routes:
        dst = route.get("dst", "")
        if dst and dst != "default":
            try:
                found.append(IPv4Network(dst if "/" in dst else f"{dst}/32", strict=False))
            except ValueError:
                pass
    result = _run(["ip", "-j", "-4", "addr", "show"], check=False)
    try:
        for link in json.loads(result.stdout or "[]"):
            for info in link.get("addr_info", []):
                found.append(IPv4Interface(f"{info['local']}/{info['prefixlen']}").network)
    except (ValueError, KeyError):
        pass
    return found


def underlay_warnings() -> list[str]:
    """Machine settings that would silently break a lab's underlay, in words an operator can act on.

    With br_netfilter loaded and bridge-nf-call-iptables=1 (the kernel's global switch; a bridge's
    own nf_call_iptables option can only add to it), frames crossing the lab bridge go through the
    root namespace's FORWARD chain. The lab does not change the machine's firewall; it says so."""
    try:
        bridged = Path("/proc/sys/net/bridge/bridge-nf-call-iptables").read_text().strip() == "1"
    except OSError:
        return []
    if not bridged or shutil.which("iptables") is None:
        return []
    policy = _run(["iptables", "-w", "5", "-S", "FORWARD"], check=False).stdout.splitlines()[:1]
    if policy and policy[0].strip() in ("-P FORWARD DROP", "-P FORWARD REJECT"):
        return ["bridged traffic goes through this machine's iptables FORWARD chain (br_netfilter, "
                "net.bridge.bridge-nf-call-iptables=1), whose policy is DROP: hosts of the lab may not "
                "reach each other. Allow them with: iptables -I FORWARD -s 198.18.0.0/15 -d 198.18.0.0/15 -j ACCEPT"]
    return []


def underlay_mac(address: IPv4Address) -> str:
    """A lab endpoint's eth0 MAC: locally administered, unicast, the IPv4 address in its last
    four bytes (a /24 of 198.18.0.0/15 is unique within a lab, labs use disjoint /24s)."""
    return "02:00:" + ":".join(f"{octet:02x}" for octet in address.packed)


def first_free_underlay(taken: Iterable[IPv4Network], pool: IPv4Network = UNDERLAY_POOL) -> IPv4Network:
    """The first /24 of pool that overlaps nothing in taken (routes, addresses, other labs)."""
    taken = [*taken, FAKE_PEER_POOL]
    for candidate in pool.subnets(new_prefix=24):
        if not any(candidate.overlaps(network) for network in taken):
            return candidate
    raise LabError(f"every /24 of {pool} is in use; take a lab down (overlayctl lab down --all)")


def _state_path(name: str) -> Path:
    return LAB_ROOT / name / "state.json"


def _read_state(name: str) -> dict | None:
    try:
        return json.loads(_state_path(name).read_text())
    except FileNotFoundError:
        return None
    except ValueError as exc:
        raise LabError(f"lab {name}: unreadable {_state_path(name)} ({exc}); "
                       f"`overlayctl lab down --name {name}` still cleans up") from None


def _claimed_underlays() -> list[IPv4Network]:
    claimed = []
    if LAB_ROOT.is_dir():
        for path in LAB_ROOT.glob("*/state.json"):
            try:
                claimed.append(IPv4Network(json.loads(path.read_text())["underlay"]["cidr"]))
            except (OSError, ValueError, KeyError, TypeError):
                pass
    return claimed


def _overlayd_argv() -> list[str]:
    """The venv's console script next to this interpreter, else this interpreter running the module."""
    script = Path(sys.executable).parent / "overlayd"
    if script.exists():
        return [str(script)]
    found = shutil.which("overlayd")
    return [found] if found else [sys.executable, "-m", "overlay.daemon"]


# ------------------------------------------------------------------------------- lab objects

@dataclass(frozen=True)
class LabHost:
    """One simulated host: a namespace whose eth0 is on the lab's underlay."""
    name: str            # "h1"
    index: int
    netns: str           # "ovl-lab-h1"; the root end of its veth has the same name
    public_ip: IPv4Address
    run_dir: Path        # the daemon's --run-dir (subnet.env lives here)
    log_path: Path

    @property
    def link(self) -> str:
        return self.netns

    def url(self, path: str, port: int = HEALTHZ_PORT) -> str:
        return f"http://{self.public_ip}:{port}{path}"

    def to_state(self) -> dict:
        return {"name": self.name, "index": self.index, "netns": self.netns,
                "public_ip": str(self.public_ip), "run_dir": str(self.run_dir),
                "log": str(self.log_path)}

    @classmethod
    def from_state(cls, raw: dict) -> "LabHost":
        return cls(raw["name"], raw["index"], raw["netns"], IPv4Address(raw["public_ip"]),
                   Path(raw["run_dir"]), Path(raw["log"]))


@dataclass(frozen=True)
class LabEtcdTLS:
    """The files of a lab whose etcd speaks TLS to clients and wants their certificates: one CA,
    one server certificate for every member's underlay IP (it allows client auth too, so a
    member's own pair probes its health), and the client certificate the daemons, etcdctl and
    `overlayctl leases --lab` present. All under <state dir>/pki, keys 0600."""
    ca_file: Path
    cert_file: Path          # the client's
    key_file: Path
    server_cert_file: Path
    server_key_file: Path

    def server(self) -> EtcdTLS:
        return EtcdTLS(self.server_cert_file, self.server_key_file, self.ca_file)

    def client_flags(self, style: str = "overlayd") -> list[str]:
        """The client's flags for overlayd/overlayctl (`--etcd-cafile ...`) or for etcdctl (`--cacert ...`)."""
        names = (("--cacert", "--cert", "--key") if style == "etcdctl"
                 else ("--etcd-cafile", "--etcd-certfile", "--etcd-keyfile"))
        return [item for name, path in zip(names, (self.ca_file, self.cert_file, self.key_file))
                for item in (name, str(path))]

    def to_state(self) -> dict:
        return {"ca_file": str(self.ca_file), "cert_file": str(self.cert_file), "key_file": str(self.key_file),
                "server_cert_file": str(self.server_cert_file), "server_key_file": str(self.server_key_file)}

    @classmethod
    def from_state(cls, raw: dict | None) -> "LabEtcdTLS | None":
        if not raw:
            return None
        return cls(Path(raw["ca_file"]), Path(raw["cert_file"]), Path(raw["key_file"]),
                   Path(raw["server_cert_file"]), Path(raw["server_key_file"]))


@dataclass(frozen=True)
class LabEtcdMember:
    name: str            # "e1"
    netns: str
    ip: IPv4Address
    data_dir: Path
    tls: LabEtcdTLS | None = None

    @property
    def client_url(self) -> str:
        return f"{'https' if self.tls else 'http'}://{self.ip}:{ETCD_CLIENT_PORT}"

    @property
    def peer_url(self) -> str:
        return f"http://{self.ip}:{ETCD_PEER_PORT}"

    def member(self) -> EtcdMember:
        return EtcdMember(self.name, self.client_url, self.peer_url, self.data_dir, netns=self.netns,
                          tls=self.tls.server() if self.tls else None)


@dataclass(frozen=True)
class LabContainer:
    """A container attached to a host through the CNI plugin: a network namespace whose eth0 is
    the container end of the plugin's veth. ip is None until ADD has answered."""
    name: str            # "h1c1"
    host: str            # "h1"
    netns: str           # "ovl-lab-h1c1"
    container_id: str    # 64 hex digits, as podman and containerd make them
    ip: IPv4Interface | None = None
    result: dict | None = None   # the ADD result, passed back to DEL as libcni does

    @property
    def netns_path(self) -> str:
        return f"/run/netns/{self.netns}"

    @property
    def address(self) -> IPv4Address | None:
        return self.ip.ip if self.ip else None

    def to_state(self) -> dict:
        return {"name": self.name, "host": self.host, "netns": self.netns, "container_id": self.container_id,
                "ip": str(self.ip) if self.ip else None, "result": self.result}

    @classmethod
    def from_state(cls, raw: dict) -> "LabContainer":
        return cls(raw["name"], raw["host"], raw["netns"], raw["container_id"],
                   IPv4Interface(raw["ip"]) if raw.get("ip") else None, raw.get("result"))


@dataclass(frozen=True)
class MasqueradeProbe:
    """One ping from a container to an address outside the overlay, and what the underlay saw."""
    container: str
    container_ip: IPv4Address
    target: IPv4Address
    host_public_ip: IPv4Address
    rtt_ms: float | None              # None: no reply
    underlay_source: IPv4Address | None   # source of the echo request on the host's underlay link
    route_back: str                   # how the target's namespace routes the container's address

    @property
    def masqueraded(self) -> bool:
        return self.rtt_ms is not None and self.underlay_source == self.host_public_ip


class Lab:
    """A handle on the lab called `name`: make it (`up`), drive it, and always `down` it.

    A context manager: leaving the `with` block tears the lab down, also on an exception.
    Not thread-safe; state.json is re-read by every `Lab` made for the same name.
    """

    def __init__(self, name: str = DEFAULT_LAB_NAME, daemon_argv: Sequence[str] | None = None):
        self.name = validate_name(name)
        self.state_dir = LAB_ROOT / name
        self.daemon_argv = list(daemon_argv) if daemon_argv else _overlayd_argv()
        self.etcd_processes: list[EtcdProcess] = []       # only for members this object started
        self._daemons: dict[str, subprocess.Popen] = {}  # only for daemons this object started
        self._state: dict | None = _read_state(name)

    # ---------------------------------------------------------------- context manager

    def __enter__(self) -> "Lab":
        return self

    def __exit__(self, *exc_info) -> None:
        self.down()

    @classmethod
    def load(cls, name: str = DEFAULT_LAB_NAME) -> "Lab":
        lab = cls(name)
        if lab._state is None:
            raise LabNotFound(f"no lab named {name!r} (no {_state_path(name)}); "
                              f"start one with `overlayctl lab up --name {name}`")
        return lab

    # ---------------------------------------------------------------- what the lab holds

    @property
    def state(self) -> dict:
        if self._state is None:
            raise LabNotFound(f"lab {self.name!r} is not up")
        return self._state

    @property
    def exists(self) -> bool:
        return self._state is not None

    @property
    def prefix(self) -> str:
        return self.state["prefix"]

    @property
    def bridge(self) -> str:
        return f"ovl-{self.name}-br"

    @property
    def underlay(self) -> IPv4Network:
        return IPv4Network(self.state["underlay"]["cidr"])

    @property
    def gateway(self) -> IPv4Address:
        return IPv4Address(self.state["underlay"]["gateway"])

    @property
    def hosts(self) -> list[LabHost]:
        return [LabHost.from_state(raw) for raw in self.state["hosts"]]

    @property
    def etcd_tls(self) -> LabEtcdTLS | None:
        """The lab's TLS files when its etcd wants client certificates (`up(etcd_tls=True)`), else None."""
        return LabEtcdTLS.from_state(self.state["etcd"].get("tls"))

    @property
    def etcd_members(self) -> list[LabEtcdMember]:
        tls = self.etcd_tls
        return [LabEtcdMember(raw["name"], raw["netns"], IPv4Address(raw["ip"]), Path(raw["data_dir"]), tls)
                for raw in self.state["etcd"]["members"]]

    @property
    def etcd_endpoints(self) -> list[str]:
        return [member.client_url for member in self.etcd_members]

    @property
    def vxlan_device(self) -> str:
        return parse_config(self.state["network_config"]).backend.device_name

    def host(self, which: "str | int | LabHost") -> LabHost:
        """A host by name ("h1"), namespace ("ovl-lab-h1"), index (1) or LabHost."""
        if isinstance(which, LabHost):
            return which
        for host in self.hosts:
            if which in (host.name, host.netns, host.index):
                return host
        raise LabError(f"lab {self.name}: no host {which!r} "
                       f"(hosts: {', '.join(host.name for host in self.hosts) or 'none'})")

    def etcd_settings(self):
        """EtcdSettings for a client in the root namespace (reaches the members over the bridge)."""
        from .etcd import EtcdSettings
        tls = self.etcd_tls
        if tls is None:
            return EtcdSettings.from_flags(",".join(self.etcd_endpoints), self.prefix)
        return EtcdSettings.from_flags(",".join(self.etcd_endpoints), self.prefix,
                                       tls.ca_file, tls.cert_file, tls.key_file)

    # ---------------------------------------------------------------- up

    def up(self, hosts: int = 3, etcd_members: int = 1, network: str = DEFAULT_NETWORK,
           subnet_lease_ttl: int | None = None, network_config: str | None = None,
           start_daemons: bool = True, daemon_args: Sequence[str] = (),
           prefix: str = DEFAULT_PREFIX, etcd_timeout: float = 30.0, containers: int = 0,
           timeout: float = 90.0, etcd_tls: bool = False) -> "Lab":
        """Make the underlay, start etcd, store the network config, make hosts, start daemons.

        Returns once the daemons are started (see wait_ready); with containers=M, once M
        containers per host are attached through the plugin (which needs the daemons ready, so
        that waits up to `timeout` s). Any failure rolls back everything made so far before the
        error propagates. network_config, when given, is stored verbatim instead of the config
        built from `network` (it is still validated first). etcd_tls: the members serve clients
        over TLS and refuse any without a certificate from the lab's own CA (made here, see
        LabEtcdTLS); the daemons, etcdctl and etcd_settings() present the lab's client certificate.
        """
        if os.geteuid() != 0:
            raise LabError("the lab needs root (network namespaces, veth, bridge)")
        if not 0 <= hosts <= MAX_HOSTS:
            raise LabError(f"--hosts must be between 0 and {MAX_HOSTS}")
        if not 1 <= etcd_members <= FIRST_HOST_HOST - FIRST_ETCD_HOST:
            raise LabError("etcd members: 1 or 3 (at most 9)")
        if containers < 0 or (containers and not start_daemons):
            raise LabError("containers: a number >= 0, and only with the daemons started (they serve the plugin)")
        for tool in ("ip", "etcd", "etcdctl") + (("openssl",) if etcd_tls else ()):
            if shutil.which(tool) is None:
                raise LabError(f"{tool} not found on PATH (run scripts/bootstrap, or `make demo`)")
        raw_config = network_config or json.dumps(
            {"Network": network, "Backend": {"Type": "vxlan", "VNI": DEFAULT_VNI, "Port": DEFAULT_VXLAN_PORT}})
        try:
            parse_config(raw_config)
        except ConfigError as exc:
            raise LabError(f"network config refused: {exc}") from None
        with _allocation_lock():
            # Checked and claimed (the state dir) under the lock: of two `up`s of one name, the
            # second is refused here, before the rollback below, which would take down the first.
            leftovers = self.leftovers()
            if self._state is not None or leftovers or self.state_dir.exists():
                raise LabError(f"lab {self.name!r} already exists ({', '.join(leftovers) or self.state_dir}); "
                               f"take it down first: overlayctl lab down --name {self.name}")
            self.state_dir.mkdir(parents=True)
        try:
            with _allocation_lock():
                underlay = self._choose_underlay()
                (self.state_dir / "logs").mkdir(exist_ok=True)
                self._state = {
                    "version": STATE_VERSION, "name": self.name, "phase": "creating",
                    "created": time.time(), "prefix": prefix, "network_config": raw_config,
                    "underlay": {"cidr": str(underlay), "bridge": self.bridge,
                                 "gateway": str(underlay.network_address + GATEWAY_HOST)},
                    "daemon": {"argv": self.daemon_argv, "subnet_lease_ttl": subnet_lease_ttl,
                               "extra_args": list(daemon_args), "healthz_port": HEALTHZ_PORT},
                    "etcd": {"members": [], "pids": {}, "tls": None},
                    "hosts": [],
                    "containers": [],
                }
                self._save()
                _ip_batch([f"link add {self.bridge} type bridge",
                           f"addr add {self.gateway}/{underlay.prefixlen} dev {self.bridge}",
                           f"link set {self.bridge} up"])
            self._start_etcd(etcd_members, etcd_timeout, etcd_tls)
            self.put_config(raw_config)
            self._make_hosts(hosts)
            if start_daemons:
                for host in self.hosts:
                    self.start_daemon(host)
            if containers and self.hosts:
                deadline = time.monotonic() + timeout
                self.wait_ready(deadline=deadline)
                self.add_containers({host.name: containers for host in self.hosts}, deadline=deadline)
            self.state["phase"] = "up"
            self._save()
        except BaseException as exc:
            try:
                self.down()
            except Exception as cleanup:  # keep the first error; say what is left
                exc.add_note(f"rolling back lab {self.name} failed too: {cleanup}; "
                             f"run: overlayctl lab down --name {self.name}")
            raise
        return self

    def _choose_underlay(self) -> IPv4Network:
        return first_free_underlay(_routed_networks() + _claimed_underlays())

    def _address(self, host_part: int) -> IPv4Address:
        return self.underlay.network_address + host_part

    def _plug(self, endpoints: Sequence[tuple[str, IPv4Address]]) -> None:
        """Make a namespace per (name, address), with eth0 on the bridge and a default route."""
        root = []
        for netns, _ in endpoints:
            root += [f"netns add {netns}",
                     f"link add {netns} type veth peer name {HOST_IFACE} netns {netns}",
                     f"link set {netns} master {self.bridge} up"]
        _ip_batch(root)
        for netns, address in endpoints:
            _ip_batch(["link set lo up",
                       # A MAC derived from the address: a host removed and added again with the
                       # same address keeps it, so no neighbour on the underlay holds a stale one.
                       f"link set {HOST_IFACE} address {underlay_mac(address)}",
                       f"addr add {address}/{self.underlay.prefixlen} dev {HOST_IFACE}",
                       f"link set {HOST_IFACE} up",
                       f"route add default via {self.gateway}"], netns=netns)

    def _start_etcd(self, count: int, timeout: float, tls: bool = False) -> None:
        addresses = [self._address(FIRST_ETCD_HOST + index - 1) for index in range(1, count + 1)]
        lab_tls = self._make_pki(addresses) if tls else None
        members = [LabEtcdMember(f"e{index}", f"ovl-{self.name}-e{index}", address,
                                 self.state_dir / "etcd" / f"e{index}.etcd", lab_tls)
                   for index, address in enumerate(addresses, start=1)]
        self.state["etcd"]["members"] = [{"name": m.name, "netns": m.netns, "ip": str(m.ip),
                                          "data_dir": str(m.data_dir)} for m in members]
        self._save()
        self._plug([(member.netns, member.ip) for member in members])
        self.etcd_processes = start_cluster([member.member() for member in members],
                                            self.state_dir / "logs", timeout=timeout,
                                            cluster_token=f"ovl-{self.name}-{os.urandom(4).hex()}")
        self.state["etcd"]["pids"] = {process.member.name: process.pid for process in self.etcd_processes}
        self._save()

    def _make_pki(self, member_ips: Sequence[IPv4Address]) -> LabEtcdTLS:
        """A fresh CA, a server certificate for the member IPs and a client certificate, under
        <state dir>/pki (0700, made before any key is written; make_test_pki makes each key 0600).
        Nothing outside the state dir, so tear-down's removal of that dir takes them along."""
        directory = self.state_dir / "pki"
        directory.mkdir(mode=0o700, exist_ok=True)
        directory.chmod(0o700)   # mkdir's mode is filtered by the umask
        pki = make_test_pki(directory, [str(ip) for ip in member_ips])
        made = LabEtcdTLS(pki.ca_cert, pki.client_cert, pki.client_key, pki.server_cert, pki.server_key)
        self.state["etcd"]["tls"] = made.to_state()
        self._save()
        return made

    def put_config(self, raw_config: str) -> None:
        """Store a network config (verbatim, not validated: tests store bad ones on purpose)."""
        self.etcdctl("put", config_key(self.prefix), raw_config)
        self.state["network_config"] = raw_config
        self._save()

    def etcdctl_argv(self, *args: str) -> list[str]:
        """etcdctl (v3) against the lab's etcd from the root namespace, with the lab's client
        certificate when its etcd wants one."""
        tls = self.etcd_tls
        return ["etcdctl", "--endpoints", ",".join(self.etcd_endpoints), "--command-timeout", "5s",
                *(tls.client_flags("etcdctl") if tls else []), *args]

    def etcdctl(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        """Run etcdctl (v3) against the lab's etcd from the root namespace."""
        return _run(self.etcdctl_argv(*args), check=check, timeout=15)

    def _make_hosts(self, count: int) -> list[LabHost]:
        used = {host.index for host in self.hosts}
        indices = []
        index = 1
        while len(indices) < count:
            if index not in used:
                indices.append(index)
            index += 1
        if indices and indices[-1] > MAX_HOSTS:
            raise LabError(f"lab {self.name}: at most {MAX_HOSTS} hosts")
        made = [LabHost(f"h{index}", index, f"ovl-{self.name}-h{index}",
                        self._address(FIRST_HOST_HOST + index - 1),
                        self.state_dir / f"h{index}", self.state_dir / "logs" / f"h{index}-overlayd.log")
                for index in indices]
        # Recorded before the namespaces exist: a crash in between leaves a record, not an orphan.
        self.state["hosts"] += [host.to_state() for host in made]
        self._save()
        self._plug([(host.netns, host.public_ip) for host in made])
        for host in made:
            host.run_dir.mkdir(parents=True, exist_ok=True)
            self.install_cni(host)
        return made

    def add_host(self, start_daemon: bool = True) -> LabHost:
        """One more host (the lowest free index), with its daemon started unless told otherwise."""
        host = self._make_hosts(1)[0]
        if start_daemon:
            self.start_daemon(host)
        return host

    def remove_host(self, which: "str | int | LabHost") -> None:
        """Stop the host's daemon and delete its namespace and link. Its lease stays in etcd until
        its TTL runs out, as when a real host dies."""
        host = self.host(which)
        self.detach_containers([c for c in self.containers if c.host == host.name])
        kill_pids(netns_pids(host.netns))
        self._daemons.pop(host.name, None)
        _ip_batch([f"link del {host.link}", f"netns del {host.netns}"], force=True)
        shutil.rmtree(host.run_dir, ignore_errors=True)
        shutil.rmtree(self.state_dir / "cni" / host.name, ignore_errors=True)
        self.state["hosts"] = [raw for raw in self.state["hosts"] if raw["name"] != host.name]
        self._save()

    # ---------------------------------------------------------------- daemons

    def daemon_command(self, host: LabHost, extra_args: Sequence[str] = (), etcd_tls_flags: bool = True) -> list[str]:
        """The argv that starts the host's overlayd. With a TLS etcd it carries the lab's client
        certificate, unless etcd_tls_flags=False (a test of a daemon that lacks it)."""
        daemon = self.state["daemon"]
        tls = self.etcd_tls
        argv = ["ip", "netns", "exec", host.netns, *daemon.get("argv", self.daemon_argv),
                "--etcd-endpoints", ",".join(self.etcd_endpoints),
                "--etcd-prefix", self.prefix,
                "--iface", HOST_IFACE,
                "--public-ip", str(host.public_ip),
                "--run-dir", str(host.run_dir),
                "--ip-masq",
                "--healthz-ip", str(host.public_ip),
                "--healthz-port", str(daemon.get("healthz_port", HEALTHZ_PORT))]
        if tls is not None and etcd_tls_flags:
            argv += tls.client_flags()
        if daemon.get("subnet_lease_ttl"):
            argv += ["--subnet-lease-ttl", str(daemon["subnet_lease_ttl"])]
        return argv + list(daemon.get("extra_args", [])) + list(extra_args)

    def start_daemon(self, which: "str | int | LabHost", extra_args: Sequence[str] = (),
                     etcd_tls_flags: bool = True) -> int:
        """Start overlayd in the host's namespace, detached; returns its pid."""
        host = self.host(which)
        if self.daemon_pid(host) is not None:
            raise LabError(f"{host.name}: overlayd is already running (pid {self.daemon_pid(host)})")
        argv = self.daemon_command(host, extra_args, etcd_tls_flags)
        host.run_dir.mkdir(parents=True, exist_ok=True)
        host.log_path.parent.mkdir(parents=True, exist_ok=True)
        # The operator's OVERLAY_* settings are for their own daemon, not the lab's.
        env = {key: value for key, value in os.environ.items() if not key.startswith("OVERLAY_")}
        env["PYTHONUNBUFFERED"] = "1"
        with open(host.log_path, "ab") as log:
            log.write(f"--- {time.strftime('%Y-%m-%d %H:%M:%S')} lab: {' '.join(argv)}\n".encode())
            log.flush()
            process = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                       env=env, cwd="/", start_new_session=True)
        self._daemons[host.name] = process
        self._set_host_field(host, "daemon_pid", process.pid)
        return process.pid

    def daemon_pid(self, which: "str | int | LabHost") -> int | None:
        host = self.host(which)
        raw = next(raw for raw in self.state["hosts"] if raw["name"] == host.name)
        pid = raw.get("daemon_pid")
        child = self._daemons.get(host.name)
        if child is not None and child.pid == pid:
            # Our own child: trusted without the namespace check, which fails for the first
            # milliseconds, before `ip netns exec` has entered the namespace.
            return pid if child.poll() is None else None
        return pid if pid_in_netns(pid, host.netns) else None

    def stop_daemon(self, which: "str | int | LabHost", sig: int = signal.SIGTERM,
                    timeout: float = 10.0) -> None:
        """Send sig to the host's daemon and wait until it is gone (SIGKILL after timeout)."""
        host = self.host(which)
        pid = self.daemon_pid(host)
        if pid is not None:
            survivors = kill_pids([pid], grace=timeout, first_signal=sig)
            if survivors:
                raise LabError(f"{host.name}: overlayd pid {pid} survived SIGKILL")
        child = self._daemons.pop(host.name, None)
        if child is not None:
            child.poll()
        self._set_host_field(host, "daemon_pid", None)

    def kill_daemon(self, which: "str | int | LabHost") -> None:
        """SIGKILL, as a crash would: no clean shutdown."""
        self.stop_daemon(which, sig=signal.SIGKILL)

    def restart(self, which: "str | int | LabHost", extra_args: Sequence[str] = ()) -> int:
        """Stop the host's daemon (SIGTERM, leaving its data plane) and start it again."""
        self.stop_daemon(which)
        return self.start_daemon(which, extra_args)

    def daemon_log(self, which: "str | int | LabHost", lines: int = 30) -> str:
        return _log_tail(self.host(which).log_path, lines)

    def etcd_log(self, member: str = "e1", lines: int = 30) -> str:
        """The tail of an etcd member's log (where it says why it rejected a client's connection)."""
        return _log_tail(self.state_dir / "logs" / f"{member}.log", lines)

    def _set_host_field(self, host: LabHost, field: str, value: Any) -> None:
        for raw in self.state["hosts"]:
            if raw["name"] == host.name:
                raw[field] = value
        self._save()

    # ---------------------------------------------------------------- observing

    def in_netns(self, which: "str | int | LabHost", argv: Sequence[str], nsenter: bool = False) -> list[str]:
        """argv prefixed to run in the host's network namespace.

        `ip netns exec` also gives the command a private /sys for the namespace (what most tools
        want); nsenter=True enters only the network namespace, which container runtimes need: under
        `ip netns exec` runc finds no cgroup mount (shared FACTS)."""
        host = self.host(which)
        if nsenter:
            return ["nsenter", f"--net=/run/netns/{host.netns}", "--", *argv]
        return ["ip", "netns", "exec", host.netns, *argv]

    def exec(self, which: "str | int | LabHost", argv: Sequence[str], check: bool = False,
             timeout: float = 30.0, input: str | None = None, nsenter: bool = False) -> subprocess.CompletedProcess:
        """Run argv inside the host's namespace; text output captured."""
        return _run(self.in_netns(which, argv, nsenter), input=input, check=check, timeout=timeout)

    def spawn(self, which: "str | int | LabHost", argv: Sequence[str], nsenter: bool = False,
              **popen_kwargs) -> subprocess.Popen:
        """Start argv in the host's namespace in the background (an iperf3 server, a sniffer).

        The caller waits for or kills it; `down` kills whatever is still running in the namespace."""
        popen_kwargs.setdefault("stdin", subprocess.DEVNULL)
        return subprocess.Popen(self.in_netns(which, argv, nsenter), **popen_kwargs)

    def subnet(self, which: "str | int | LabHost") -> IPv4Network | None:
        """The host's subnet from its subnet.env, or None before the daemon wrote it."""
        from .subnetfile import read_subnet_file
        try:
            return read_subnet_file(self.host(which).run_dir).subnet.network
        except (OSError, ValueError):
            return None

    def overlay_address(self, which: "str | int | LabHost") -> IPv4Address | None:
        """The address of the host's VXLAN device: its subnet's network address (as flannel)."""
        subnet = self.subnet(which)
        return subnet.network_address if subnet else None

    def ready(self, which: "str | int | LabHost", timeout: float = 1.0) -> bool:
        """The daemon's /readyz answers 200."""
        host = self.host(which)
        try:
            with urllib.request.urlopen(host.url("/readyz", self.state["daemon"].get("healthz_port", HEALTHZ_PORT)),
                                        timeout=timeout) as response:
                return response.status == 200
        except (OSError, urllib.error.URLError, ValueError):
            return False

    def status(self) -> dict:
        """What `lab status --json` prints."""
        hosts = self.hosts
        with ThreadPoolExecutor(max_workers=max(1, min(16, len(hosts)))) as pool:
            readiness = list(pool.map(self.ready, hosts))
        vxlan_device = self.vxlan_device
        members = self.etcd_members
        pids = self.state["etcd"].get("pids", {})
        tls = self.etcd_tls
        return {
            "name": self.name,
            "phase": self.state.get("phase"),
            "state_dir": str(self.state_dir),
            "underlay": dict(self.state["underlay"]),
            "network_config": json.loads(self.state["network_config"]),
            "etcd": {
                "endpoints": self.etcd_endpoints,
                "netns": [member.netns for member in members],
                "prefix": self.prefix,
                "tls": tls is not None,
                # What a client needs (the flags of overlayd and overlayctl take these paths).
                "ca_file": str(tls.ca_file) if tls else None,
                "cert_file": str(tls.cert_file) if tls else None,
                "key_file": str(tls.key_file) if tls else None,
                "members": [{"name": member.name, "netns": member.netns, "client_url": member.client_url,
                             "pid": pids.get(member.name) if pid_in_netns(pids.get(member.name), member.netns)
                             else None}
                            for member in members],
            },
            "hosts": [{
                "name": host.name,
                "netns": host.netns,
                "public_ip": str(host.public_ip),
                "subnet": str(subnet) if (subnet := self.subnet(host)) else None,
                "vxlan_device": vxlan_device,
                "daemon_pid": self.daemon_pid(host),
                "ready": ready,
                "run_dir": str(host.run_dir),
                "log": str(host.log_path),
                "containers": [{"name": c.name, "netns": c.netns, "ip": str(c.address) if c.ip else None,
                                "container_id": c.container_id}
                               for c in self.containers if c.host == host.name],
            } for host, ready in zip(hosts, readiness)],
        }

    def wait_ready(self, hosts: Iterable["str | int | LabHost"] | None = None,
                   deadline: float | None = None, timeout: float = 60.0) -> float:
        """Poll /readyz of each host until all answer 200; returns seconds waited.

        A daemon that exits meanwhile fails the wait at once, with its log tail.
        """
        started = time.monotonic()
        deadline = deadline if deadline is not None else started + timeout
        pending = [self.host(which) for which in (hosts if hosts is not None else self.hosts)]
        while pending:
            with ThreadPoolExecutor(max_workers=max(1, min(16, len(pending)))) as pool:
                readiness = list(pool.map(self.ready, pending))
            pending = [host for host, ready in zip(pending, readiness) if not ready]
            for host in pending:
                if self.daemon_pid(host) is None:
                    raise LabError(f"{host.name}: overlayd is not running; log {host.log_path}:\n"
                                   f"{self.daemon_log(host)}")
            if not pending:
                break
            if time.monotonic() > deadline:
                raise LabError(f"not ready after {time.monotonic() - started:.0f} s: "
                               f"{', '.join(host.name for host in pending)}; last log lines of "
                               f"{pending[0].name}:\n{self.daemon_log(pending[0])}")
            time.sleep(0.1)
        return time.monotonic() - started

    def overlay_routes(self, which: "str | int | LabHost") -> set[IPv4Network]:
        """Destinations routed over the VXLAN device in the host's namespace."""
        host = self.host(which)
        result = _run(["ip", "-n", host.netns, "-j", "-4", "route", "show", "dev", self.vxlan_device],
                      check=False)
        try:
            return {IPv4Network(route["dst"]) for route in json.loads(result.stdout or "[]")
                    if "/" in route.get("dst", "")}
        except (ValueError, KeyError):
            return set()

    def convergence_gaps(self, hosts: Iterable["str | int | LabHost"] | None = None) -> dict[str, list[str]]:
        """{host: [peers it has no VXLAN route to]} for hosts missing something; {} when converged.

        A host without a subnet yet is missing every peer (and is listed as missing itself)."""
        chosen = [self.host(which) for which in (hosts if hosts is not None else self.hosts)]
        subnets = {host.name: self.subnet(host) for host in chosen}
        gaps: dict[str, list[str]] = {}
        for host in chosen:
            routes = self.overlay_routes(host) if subnets[host.name] else set()
            missing = [name for name, subnet in subnets.items()
                       if name != host.name and (subnet is None or subnet not in routes)]
            if subnets[host.name] is None or missing:
                gaps[host.name] = missing
        return gaps

    def converged(self, hosts: Iterable["str | int | LabHost"] | None = None) -> bool:
        """Every host has its subnet and a route over VXLAN to every other host's subnet."""
        return not self.convergence_gaps(hosts)

    def wait_converged(self, hosts: Iterable["str | int | LabHost"] | None = None,
                       deadline: float | None = None, timeout: float = 60.0) -> float:
        """wait_ready, then poll until every host routes to every other's subnet; returns seconds."""
        started = time.monotonic()
        deadline = deadline if deadline is not None else started + timeout
        chosen = list(hosts) if hosts is not None else None
        self.wait_ready(chosen, deadline=deadline)
        while gaps := self.convergence_gaps(chosen):
            if time.monotonic() > deadline:
                detail = "; ".join(f"{host} lacks routes to {', '.join(missing) or '(has no subnet)'}"
                                   for host, missing in sorted(gaps.items()))
                raise LabError(f"not converged after {time.monotonic() - started:.0f} s: {detail}")
            time.sleep(0.1)
        return time.monotonic() - started

    def ping(self, source: "str | int | LabHost", destination: IPv4Address | str,
             count: int = 1, wait: float = 1.0) -> float | None:
        """Ping from a host's namespace; the average round trip in ms, or None when unanswered."""
        result = self.exec(source, ["ping", "-n", "-q", "-c", str(count), "-W", str(wait), str(destination)],
                           timeout=count * wait + 10)
        if result.returncode != 0:
            return None
        match = _RTT.search(result.stdout)
        return float(match.group(1)) if match else 0.0

    def reachability(self, hosts: Iterable["str | int | LabHost"] | None = None,
                     attempts: int = 3) -> dict[tuple[str, str], float | None]:
        """Ping from every host to every host's overlay address; {(from, to): rtt ms or None}.

        A pair that fails is tried again up to `attempts` times (one lost echo on a busy machine
        is not a broken overlay)."""
        chosen = [self.host(which) for which in (hosts if hosts is not None else self.hosts)]
        targets = {host.name: self.overlay_address(host) for host in chosen}
        pairs = [(source, destination) for source in chosen for destination in chosen]
        results: dict[tuple[str, str], float | None] = {}

        def probe(pair: tuple[LabHost, LabHost]) -> float | None:
            source, destination = pair
            target = targets[destination.name]
            if target is None:
                return None
            for _ in range(attempts):
                rtt = self.ping(source, target)
                if rtt is not None:
                    return rtt
            return None

        with ThreadPoolExecutor(max_workers=max(1, min(16, len(pairs)))) as pool:
            for (source, destination), rtt in zip(pairs, pool.map(probe, pairs)):
                results[(source.name, destination.name)] = rtt
        return results

    # ---------------------------------------------------------------- containers (through the CNI plugin)

    def cni_dirs(self, which: "str | int | LabHost") -> tuple[Path, Path]:
        """(bin dir, conf dir) of the host's runtime: where its plugin and conflist live."""
        root = self.state_dir / "cni" / self.host(which).name
        return root / "bin", root / "net.d"

    def install_cni(self, which: "str | int | LabHost") -> Path:
        """Install the plugin and a conflist for the host (runDir = its run dir); returns the conflist."""
        from cni.install import install
        host = self.host(which)
        bin_dir, conf_dir = self.cni_dirs(host)
        _, conf = install(bin_dir, conf_dir, str(host.run_dir), network_name=CNI_NETWORK_NAME)
        return conf

    def conflist(self, which: "str | int | LabHost"):
        """The host's conflist as `cni.runtime.ConfList`, run from the host's namespace."""
        from cni.install import CONF_FILE_NAME
        from cni.runtime import ConfList
        host = self.host(which)
        bin_dir, conf_dir = self.cni_dirs(host)
        conf = conf_dir / CONF_FILE_NAME
        if not conf.exists():
            self.install_cni(host)
        conflist = ConfList.load(conf, [bin_dir], host_netns=f"/run/netns/{host.netns}")
        conflist.timeout_s = CNI_CALL_TIMEOUT
        return conflist

    @property
    def containers(self) -> list[LabContainer]:
        return [LabContainer.from_state(raw) for raw in self.state.get("containers", [])]

    def container(self, which: "str | LabContainer") -> LabContainer:
        """A container by name ("h1c1"), namespace ("ovl-lab-h1c1") or LabContainer."""
        name = which.name if isinstance(which, LabContainer) else which
        for container in self.containers:
            if name in (container.name, container.netns):
                return container
        raise LabError(f"lab {self.name}: no container {name!r} "
                       f"(containers: {', '.join(c.name for c in self.containers) or 'none'})")

    def add_container(self, which: "str | int | LabHost", name: str | None = None,
                      ip: IPv4Address | str | None = None, timeout: float = 60.0) -> LabContainer:
        """Attach one container to the host through the plugin, as a runtime does; returns it.

        name defaults to `<host>c<j>` with the lowest free j. ip asks for an address with
        CNI_ARGS `IP=` (the convention of the reference host-local IPAM); a plugin that hands out
        another address fails the call, and the attachment is undone."""
        host = self.host(which)
        return self.add_containers({host.name: [(name, IPv4Address(ip) if ip else None)]},
                                   deadline=time.monotonic() + timeout)[0]

    def add_containers(self, wanted: dict[str, "int | list[tuple[str | None, IPv4Address | None]]"],
                       deadline: float | None = None) -> list[LabContainer]:
        """Attach containers: {host: count} or {host: [(name or None, ip or None), ...]}.

        All are recorded first (one state write), their namespaces made in one `ip -batch`, and
        the ADDs run in parallel, as a runtime starting several containers at once does. A
        container whose ADD fails is undone (DEL, namespace deleted, record dropped); the others
        stay, and the error names each failure. Code 11 ("try again later", the daemon's CNI
        service not up yet) is retried until the deadline, as kubelet retries.
        """
        deadline = deadline if deadline is not None else time.monotonic() + 60.0
        taken = {c.name for c in self.containers} | {h.name for h in self.hosts}
        planned: list[tuple[LabContainer, IPv4Address | None]] = []
        for which, spec in wanted.items():
            host = self.host(which)
            requests = [(None, None)] * spec if isinstance(spec, int) else list(spec)
            for name, ip in requests:
                name = name or self._free_container_name(host, taken)
                if not _CONTAINER_NAME.fullmatch(name) or _RESERVED_NAME.fullmatch(name) or name in taken:
                    raise LabError(f"container name {name!r}: taken, or not 1-24 lowercase letters, digits "
                                   f"and '-' (h<i>, e<i> and br are reserved)")
                taken.add(name)
                planned.append((LabContainer(name, host.name, f"ovl-{self.name}-{name}",
                                             secrets.token_hex(32)), ip))
        if not planned:
            return []
        # Recorded before the namespaces exist: a crash in between leaves a record, not an orphan.
        self.state.setdefault("containers", []).extend(container.to_state() for container, _ in planned)
        self._save()
        made: list[LabContainer] = []
        failures: list[str] = []
        try:
            _ip_batch([f"netns add {container.netns}" for container, _ in planned])
            for container, _ in planned:
                _ip_batch(["link set lo up"], netns=container.netns)
            conflists = {container.host: self.conflist(container.host) for container, _ in planned}
            with ThreadPoolExecutor(max_workers=min(8, len(planned))) as pool:
                outcomes = list(pool.map(lambda item: self._attach(conflists[item[0].host], *item, deadline),
                                         planned))
        except BaseException:
            self.detach_containers([container for container, _ in planned])
            raise
        for (container, _), outcome in zip(planned, outcomes):
            if isinstance(outcome, LabContainer):
                made.append(outcome)
            else:
                failures.append(f"{container.name} on {container.host}: {outcome}")
        attached = {container.name: container for container in made}
        self.state["containers"] = [attached[raw["name"]].to_state() if raw["name"] in attached else raw
                                    for raw in self.state["containers"]]
        self._save()
        if failures:
            self.detach_containers([container for container, _ in planned if container.name not in attached])
            raise LabError(f"lab {self.name}: attaching failed for {'; '.join(failures)}")
        return made

    def _attach(self, conflist, container: LabContainer, ip: IPv4Address | None,
                deadline: float) -> "LabContainer | str":
        """ADD one container (retrying code 11 until deadline); the attached container, or why not."""
        from cni.runtime import PluginFailed
        attachment = self._attachment(container, ip)
        while True:
            try:
                result = conflist.add(attachment)
                break
            except PluginFailed as exc:
                if exc.code == 11 and time.monotonic() < deadline:
                    time.sleep(0.1)
                    continue
                return str(exc)
            except (OSError, subprocess.TimeoutExpired, ValueError) as exc:
                return f"running the plugin failed: {exc}"
        try:
            address = IPv4Interface(result["ips"][0]["address"])
        except (KeyError, IndexError, TypeError, ValueError):
            return f"the plugin's result has no IPv4 address: {result}"
        if ip is not None and address.ip != ip:
            return f"asked for {ip} (CNI_ARGS IP=), the plugin gave {address.ip}: it does not honour IP="
        return LabContainer(container.name, container.host, container.netns, container.container_id,
                            address, result)

    @staticmethod
    def _attachment(container: LabContainer, ip: IPv4Address | None = None):
        from cni.runtime import Attachment
        # What podman sends; IgnoreUnknown=1 lets a plugin skip keys it does not use.
        args = "IgnoreUnknown=1" + (f";IP={ip}" if ip else "")
        return Attachment(container.container_id, container.netns_path, CONTAINER_IFACE, args)

    def _free_container_name(self, host: LabHost, taken: set[str]) -> str:
        index = 1
        while f"{host.name}c{index}" in taken:
            index += 1
        return f"{host.name}c{index}"

    def move_container(self, which: "str | LabContainer", to_host: "str | int | LabHost", timeout: float = 60.0,
                       timings: dict | None = None) -> LabContainer:
        """Move a container to another host keeping its namespace and address: DEL through the
        old host's plugin, then ADD through the new host's with `IP=` its address. Returns the
        container as attached now. `timings`, if given, gets monotonic stamps `del_started`,
        `del_done` and `add_done` (for benchmarks)."""
        from cni.runtime import PluginFailed
        container = self.container(which)
        target = self.host(to_host)
        stamps = timings if timings is not None else {}
        if container.host == target.name:
            raise LabError(f"{container.name} is on {target.name} already")
        if container.address is None:
            raise LabError(f"{container.name} has no address to keep (its ADD did not finish)")
        deadline = time.monotonic() + timeout
        address = container.address
        stamps["del_started"] = time.monotonic()
        try:
            self.conflist(container.host).delete(self._attachment(container), container.result)
        except (PluginFailed, subprocess.TimeoutExpired, OSError) as exc:
            raise LabError(f"{container.name}: DEL on {container.host} failed, nothing moved: {exc}") from None
        stamps["del_done"] = time.monotonic()
        moving = LabContainer(container.name, target.name, container.netns, container.container_id)
        self._replace_container(moving)
        outcome = self._attach(self.conflist(target), moving, address, deadline)
        stamps["add_done"] = time.monotonic()
        if isinstance(outcome, str):
            raise LabError(f"{container.name}: detached from {container.host}, but ADD with {address} on "
                           f"{target.name} failed: {outcome}")
        self._replace_container(outcome)
        return outcome

    def _replace_container(self, container: LabContainer) -> None:
        self.state["containers"] = [container.to_state() if raw["name"] == container.name else raw
                                    for raw in self.state.get("containers", [])]
        self._save()

    def remove_container(self, which: "str | LabContainer") -> None:
        """DEL the container through the plugin, then delete its namespace and record.

        Raises LabError when DEL fails (the namespace and record are removed all the same, as a
        runtime removes a container whose network teardown failed)."""
        container = self.container(which)
        errors = self.detach_containers([container])
        if errors.get(container.name):
            raise LabError(f"{container.name}: DEL failed: {errors[container.name]}")

    def detach_containers(self, containers: Iterable[LabContainer] | None = None) -> dict[str, str | None]:
        """DEL each container (all recorded ones by default) in parallel, delete its namespace and
        drop its record; returns {name: None, or why DEL failed}. Never raises for a DEL: this is
        the best-effort path of `down` and of a failed ADD."""
        from cni.runtime import PluginFailed
        chosen = list(containers) if containers is not None else self.containers
        if not chosen:
            return {}
        existing = set(list_netns())

        def delete(container: LabContainer) -> str | None:
            host_netns = f"ovl-{self.name}-{container.host}"
            if host_netns not in existing:
                return f"host namespace {host_netns} is gone"
            try:
                self.conflist(container.host).delete(self._attachment(container), container.result)
                return None
            except PluginFailed as exc:
                return str(exc)
            except (OSError, subprocess.TimeoutExpired, ValueError, LabError) as exc:
                return f"running the plugin failed: {exc}"

        with ThreadPoolExecutor(max_workers=min(8, len(chosen))) as pool:
            errors = dict(zip((c.name for c in chosen), pool.map(delete, chosen)))
        _ip_batch([f"netns del {c.netns}" for c in chosen if c.netns in existing], force=True)
        names = {c.name for c in chosen}
        self.state["containers"] = [raw for raw in self.state.get("containers", []) if raw["name"] not in names]
        self._save()
        return errors

    def container_exec(self, which: "str | LabContainer", argv: Sequence[str], check: bool = False,
                       timeout: float = 30.0) -> subprocess.CompletedProcess:
        """Run argv in the container's network namespace; text output captured."""
        return _run(["ip", "netns", "exec", self.container(which).netns, *argv], check=check, timeout=timeout)

    def container_ping(self, source: "str | LabContainer", destination: IPv4Address | str,
                       count: int = 1, wait: float = 1.0) -> float | None:
        """Ping from a container; the average round trip in ms, or None when unanswered."""
        result = self.container_exec(source, ["ping", "-n", "-q", "-c", str(count), "-W", str(wait),
                                              str(destination)], timeout=count * wait + 10)
        if result.returncode != 0:
            return None
        match = _RTT.search(result.stdout)
        return float(match.group(1)) if match else 0.0

    def container_reachability(self, attempts: int = 3) -> dict[tuple[str, str], float | None]:
        """Ping from every container to every other container's address; {(from, to): rtt or None}.

        A failed pair is tried again up to `attempts` times (one lost echo is not a broken path)."""
        chosen = self.containers
        pairs = [(a, b) for a in chosen for b in chosen if a.name != b.name]

        def probe(pair: tuple[LabContainer, LabContainer]) -> float | None:
            source, destination = pair
            if destination.address is None:
                return None
            for _ in range(attempts):
                rtt = self.container_ping(source, destination.address)
                if rtt is not None:
                    return rtt
            return None

        results: dict[tuple[str, str], float | None] = {}
        with ThreadPoolExecutor(max_workers=max(1, min(16, len(pairs)))) as pool:
            for (source, destination), rtt in zip(pairs, pool.map(probe, pairs)):
                results[(source.name, destination.name)] = rtt
        return results

    def masquerade_probe(self, which: "str | LabContainer", target: IPv4Address | str | None = None,
                         wait: float = 2.0) -> MasqueradeProbe:
        """Ping from a container to an underlay address outside the overlay (default: the lab
        bridge's address, in the root namespace, the lab's outside world) while reading the
        host's underlay link from the root namespace, to see which source address the echo
        request carried there: the host's public IP when the host masqueraded it.

        The capture is an AF_PACKET socket bound to the root end of the host's veth before the
        ping starts, so nothing can be missed and no sniffer has to start first. It must listen
        to every protocol (ETH_P_ALL) and filter IPv4 itself: the veth is a bridge port, and the
        bridge takes its frames before protocol-specific packet sockets (ETH_P_IP) are served;
        only ETH_P_ALL taps see them."""
        container = self.container(which)
        host = self.host(container.host)
        target = IPv4Address(target) if target else self.gateway
        if container.address is None:
            raise LabError(f"{container.name} has no address (its ADD did not finish)")
        route_back = _run(["ip", "-4", "-o", "route", "get", str(container.address)], check=False)
        capture = socket.socket(socket.AF_PACKET, socket.SOCK_DGRAM, socket.htons(_ETH_P_ALL))
        try:
            capture.bind((host.link, _ETH_P_ALL))
            rtt = self.container_ping(container, target, wait=wait)
            source = _echo_request_source(capture, target, time.monotonic() + wait)
        finally:
            capture.close()
        # `ip -o` ends a route with "\\    cache": keep the route itself.
        route = (route_back.stdout or route_back.stderr).split("\\")[0].strip() or "no route"
        return MasqueradeProbe(container.name, container.address, target, host.public_ip, rtt, source, route)

    # ---------------------------------------------------------------- down

    def leftovers(self) -> list[str]:
        """Namespaces and root links of this lab that exist now."""
        return _existing(f"ovl-{self.name}-")

    def down(self) -> None:
        """Remove everything of this lab; works from any state, idempotent."""
        for process in self._daemons.values():
            process.poll()
        try:
            teardown(self.name)
        finally:
            # Reap what this object started (teardown has killed them), so no zombie stays.
            if self.etcd_processes:
                stop_cluster(self.etcd_processes, timeout=0.1)
            for process in self._daemons.values():
                if process.poll() is None:
                    process.kill()
                process.wait()
            self.etcd_processes = []
            self._daemons = {}
            self._state = None

    def _save(self) -> None:
        path = _state_path(self.name)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".state.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(self._state, indent=2) + "\n")
        os.replace(tmp, path)


def _echo_request_source(capture: socket.socket, target: IPv4Address, deadline: float) -> IPv4Address | None:
    """The source of the first ICMP echo request to target read from capture (an AF_PACKET
    SOCK_DGRAM socket: packets without the link header, the ethertype in the address), or None
    when none arrives before deadline."""
    while (left := deadline - time.monotonic()) > 0:
        capture.settimeout(left)
        try:
            packet, address = capture.recvfrom(2048)
        except (socket.timeout, BlockingIOError):
            return None
        if address[1] != _ETH_P_IP or len(packet) < 20:
            continue
        header = (packet[0] & 0x0F) * 4
        if (len(packet) > header and packet[0] >> 4 == 4 and packet[9] == 1       # IPv4, ICMP
                and IPv4Address(packet[16:20]) == target and packet[header] == 8):  # echo request
            return IPv4Address(packet[12:16])
    return None


# ------------------------------------------------------------------------------- module functions

def teardown(name: str, grace: float = 3.0) -> list[str]:
    """Remove lab `name` from what exists, not from what its state says; returns what was removed.

    Order matters: first DEL for every container the state records, while the daemons that
    serve the plugin still run (best effort: DEL is how allocations are released, but a lab
    whose daemons died is removed all the same); then processes (a namespace with a live process
    in it outlives `netns del`), the root veth ends (each takes its peer in the namespace along),
    the bridge, the namespaces (containers' too: they carry the same mark), and last the state
    dir, so a crash part-way leaves something `down` finds again.
    """
    validate_name(name)
    mark = f"ovl-{name}-"
    detached: list[str] = []
    try:
        handle = Lab(name)
        if handle.exists and handle.state.get("containers"):
            existing = set(list_netns())
            detached = [c.netns for c in handle.containers if c.netns in existing]
            handle.detach_containers()
    except (LabError, OSError, ValueError, KeyError, TypeError):
        pass    # unreadable or half-written state: what exists is removed below all the same
    namespaces = [netns for netns in list_netns() if netns.startswith(mark)]
    pids = [pid for netns in namespaces for pid in netns_pids(netns)]
    # etcd gets SIGKILL at once: its data is deleted next, and a member that loses quorum can
    # sit on SIGTERM for seconds. Everything else (daemons) gets a chance to stop cleanly.
    etcd = [pid for pid in pids if _command_name(pid) == "etcd"]
    survivors = kill_pids(etcd, first_signal=signal.SIGKILL)
    survivors += kill_pids([pid for pid in pids if pid not in etcd], grace=grace)
    if survivors:
        raise LabError(f"lab {name}: processes {survivors} survived SIGKILL")
    links = [link for link in list_links() if link.get("ifname", "").startswith(mark)]
    # Veths before the bridge they are enslaved to; names tell them apart (only ours carry the mark).
    ifnames = sorted((link["ifname"] for link in links), key=lambda ifname: ifname.endswith("-br"))
    _ip_batch([f"link del {ifname}" for ifname in ifnames]
              + [f"netns del {netns}" for netns in namespaces], force=True)
    shutil.rmtree(LAB_ROOT / name, ignore_errors=True)
    # Deleting a veth is synchronous, but a namespace's devices go in a kernel work queue once its
    # last reference is dropped: poll until nothing of the lab is listed any more.
    deadline = time.monotonic() + 10
    while left := _existing(mark):
        if time.monotonic() > deadline:
            raise LabError(f"lab {name}: could not remove {', '.join(left)}")
        time.sleep(0.05)
    return sorted(set(namespaces) | set(detached) | {link["ifname"] for link in links})


def _existing(mark: str) -> list[str]:
    """Namespaces and root links whose names start with mark."""
    return sorted({netns for netns in list_netns() if netns.startswith(mark)}
                  | {link["ifname"] for link in list_links() if link.get("ifname", "").startswith(mark)})


def lab_names() -> list[str]:
    """Every lab with state or with leftover namespaces or links on this machine."""
    names = set()
    if LAB_ROOT.is_dir():
        names |= {path.parent.name for path in LAB_ROOT.glob("*/state.json") if _NAME.fullmatch(path.parent.name)}
        names |= {path.name for path in LAB_ROOT.iterdir() if path.is_dir() and _NAME.fullmatch(path.name)}
    for candidate in list_netns() + [link.get("ifname", "") for link in list_links()]:
        match = _OBJECT.fullmatch(candidate)
        if match:
            names.add(match.group(1))
    return sorted(names)


def teardown_all() -> dict[str, list[str]]:
    """`lab down --all`: every lab's leftovers, whatever state they are in."""
    return {name: teardown(name) for name in lab_names()}


def lab_etcd_settings(name: str = DEFAULT_LAB_NAME):
    """EtcdSettings reaching the etcd of running lab `name` from the root namespace."""
    return Lab.load(name).etcd_settings()
