"""Security of a host, end to end on the lab: real overlayd processes, real etcd, the real kernel.

What issue 6 promises under "Security", checked on the end state:
- VXLAN is unauthenticated, so a host accepts it only from its current peers' public IPs. A rogue
  namespace plugged into the lab's underlay bridge sends crafted VXLAN frames (scapy) carrying a
  UDP datagram for a container's listener: from its own address nothing arrives; the very same
  frame with a peer's public IP as its (spoofed) source does arrive, and with the filter switched
  off (--no-vxlan-source-filter) the rogue's own frame arrives too. So the test can see delivery,
  and the filter is what stops it, by source address.
- A peer that leaves is dropped from the allowed set everywhere (its VXLAN is then refused), a
  newcomer is added, and the hosts keep reaching each other.
- What the daemon and the plugin write has tight modes, and a non-root process cannot use the
  CNI socket.

The rogue namespace is `ovl-<lab>-r1`, its root veth end has the same name: the lab's teardown
removes everything carrying `ovl-<lab>-`, also when a test fails. Waits poll against deadlines;
"nothing arrived" is judged only after a frame sent later on the same path has arrived.
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import threading
import time
from ipaddress import IPv4Address
from pathlib import Path


from overlay import firewall
from overlay.lab import Lab
from overlay.lease import subnet_key
from tests.support.lab import wait_for

PREFIX = "/coreos.com/network"
VXLAN_PORT = 8472
VNI = 1
LISTENER_PORT = 7777
ROGUE_HOST_PART = 250          # the underlay's .250: hosts are .11 up, etcd members .2 up

# Runs in the rogue namespace: one VXLAN frame per entry of argv[1], each sent `count` times.
# flags=0x08 (the I flag alone) is given explicitly: over an inner Ether, scapy otherwise makes a
# VXLAN-GPE header (the P flag and next-protocol 3), which the kernel counts as a frame error.
SENDER = r"""
import json, sys
from scapy.config import conf
conf.verb = 0
from scapy.layers.l2 import Ether
from scapy.layers.inet import IP, UDP
from scapy.layers.vxlan import VXLAN
from scapy.sendrecv import sendp
for f in json.loads(sys.argv[1]):
    frame = (Ether(dst=f["outer_dst_mac"]) / IP(src=f["outer_src"], dst=f["outer_dst"])
             / UDP(sport=f["sport"], dport=f["port"]) / VXLAN(flags=0x08, vni=f["vni"])
             / Ether(src=f["inner_src_mac"], dst=f["vtep_mac"]) / IP(src=f["inner_src"], dst=f["inner_dst"])
             / UDP(sport=40000, dport=f["dport"]) / f["payload"].encode())
    sendp(frame, iface="eth0", count=f["count"], verbose=False)
"""

# Runs in a container: prints every datagram's payload, one per line.
LISTENER = r"""
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("0.0.0.0", int(sys.argv[1])))
print("listening", flush=True)
while True:
    data, _ = s.recvfrom(4096)
    print(data.decode(errors="replace"), flush=True)
"""


LAB_LETTER = "s"


def ip_json(netns: str, *args: str) -> list[dict]:
    done = subprocess.run(["ip", "-n", netns, "-j", *args], capture_output=True, text=True, check=True)
    return json.loads(done.stdout or "[]")


def link_mac(netns: str, ifname: str) -> str:
    return ip_json(netns, "link", "show", "dev", ifname)[0]["address"]


def plug_rogue(lab: Lab) -> tuple[str, IPv4Address]:
    """A namespace on the lab's underlay bridge that no lease knows: the attacker."""
    netns = f"ovl-{lab.name}-r1"
    address = lab.underlay.network_address + ROGUE_HOST_PART
    assert address not in {host.public_ip for host in lab.hosts}
    for argv in (["ip", "netns", "add", netns],
                 ["ip", "link", "add", netns, "type", "veth", "peer", "name", "eth0", "netns", netns],
                 ["ip", "link", "set", netns, "master", lab.bridge, "up"],
                 ["ip", "-n", netns, "link", "set", "lo", "up"],
                 ["ip", "-n", netns, "addr", "add", f"{address}/{lab.underlay.prefixlen}", "dev", "eth0"],
                 ["ip", "-n", netns, "link", "set", "eth0", "up"]):
        subprocess.run(argv, check=True, capture_output=True)
    return netns, address


class Listener:
    """A UDP listener in a container; collects the payloads it receives."""

    def __init__(self, lab: Lab, container: str):
        self.process = subprocess.Popen(
            ["ip", "netns", "exec", lab.container(container).netns, sys.executable, "-u", "-c", LISTENER,
             str(LISTENER_PORT)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        wait_for(lambda: "listening" in self.lines or self.process.poll() is not None, "the listener to start", 15)
        assert self.process.poll() is None, self.lines

    def _read(self) -> None:
        for line in self.process.stdout:
            self.lines.append(line.strip())

    def received(self, prefix: str) -> list[str]:
        return [line for line in self.lines if line.startswith(prefix)]

    def close(self) -> None:
        self.process.kill()
        self.process.wait(timeout=10)


class Attack:
    """Crafted VXLAN frames from the rogue namespace to one host, aimed at one container."""

    def __init__(self, lab: Lab, rogue: str, target_host: str, container: str, peer_host: str):
        self.lab, self.rogue = lab, rogue
        target = lab.host(target_host)
        peer_subnet = lab.subnet(peer_host)
        self.base = {
            "outer_dst_mac": link_mac(target.netns, "eth0"), "outer_dst": str(target.public_ip),
            "port": VXLAN_PORT, "vni": VNI, "sport": 45000,
            # Inner frame: as if from a container behind the peer, to the target's VTEP.
            "vtep_mac": link_mac(target.netns, lab.vxlan_device),
            "inner_src_mac": link_mac(lab.host(peer_host).netns, lab.vxlan_device),
            "inner_src": str(peer_subnet.network_address + 7), "inner_dst": str(lab.container(container).address),
            "dport": LISTENER_PORT,
        }

    def send(self, outer_src: IPv4Address, payload: str, count: int = 5) -> None:
        frame = dict(self.base, outer_src=str(outer_src), payload=payload, count=count)
        subprocess.run(["ip", "netns", "exec", self.rogue, sys.executable, "-c", SENDER, json.dumps([frame])],
                       check=True, capture_output=True, timeout=60)


def dropped(lab: Lab, host: str) -> int:
    """Packets the host's VXLAN source filter has dropped (its rule's counter)."""
    done = subprocess.run(["ip", "netns", "exec", lab.host(host).netns, "nft", "-j", "list", "chain", "ip",
                           firewall.VXLAN_TABLE, firewall.VXLAN_CHAIN], capture_output=True, text=True, check=True)
    for entry in json.loads(done.stdout)["nftables"]:
        for expr in entry.get("rule", {}).get("expr", []):
            if "counter" in expr:
                return expr["counter"]["packets"]
    raise AssertionError(f"no counter in the VXLAN filter: {done.stdout}")


def allowed(lab: Lab, host: str) -> frozenset[IPv4Address] | None:
    return firewall.vxlan_filter_sources(netns=lab.host(host).netns)


def public_ips(lab: Lab, *hosts: str) -> frozenset[IPv4Address]:
    return frozenset(lab.host(host).public_ip for host in hosts)


def attack_setup(lab: Lab) -> tuple[Attack, Listener, IPv4Address]:
    lab.up(hosts=2)
    lab.wait_converged(timeout=90)
    lab.add_container("h1")
    rogue, rogue_ip = plug_rogue(lab)
    listener = Listener(lab, "h1c1")
    return Attack(lab, rogue, "h1", "h1c1", peer_host="h2"), listener, rogue_ip


def test_crafted_vxlan_from_a_rogue_address_never_reaches_a_container(lab):
    started = time.monotonic()
    attack, listener, rogue_ip = attack_setup(lab)
    try:
        assert allowed(lab, "h1") == public_ips(lab, "h2")
        before = dropped(lab, "h1")
        attack.send(rogue_ip, "rogue")
        # The control, on the same path after the rogue frames: the same frame, its outer source
        # spoofed to h2's public IP. Once it has arrived, the rogue frames would have too.
        attack.send(lab.host("h2").public_ip, "spoofed-peer")
        wait_for(lambda: listener.received("spoofed-peer"), "the frame with a peer's source address to arrive")
        assert listener.received("rogue") == [], listener.lines
        assert dropped(lab, "h1") - before >= 5
        print(f"rogue VXLAN: 5 frames from {rogue_ip} dropped, 0 delivered; 5 with a peer's address delivered "
              f"{len(listener.received('spoofed-peer'))}; test {time.monotonic() - started:.1f} s")
    finally:
        listener.close()


def test_with_the_filter_off_the_rogue_frame_arrives(lab):
    """Proves the test above can see delivery of the rogue's own frame: the filter is what stops it."""
    attack, listener, rogue_ip = attack_setup(lab)
    try:
        lab.restart("h1", extra_args=["--no-vxlan-source-filter"])
        lab.wait_ready(["h1"], timeout=60)
        assert allowed(lab, "h1") is None          # the table an earlier run left is removed
        attack.send(rogue_ip, "rogue-unfiltered")
        wait_for(lambda: listener.received("rogue-unfiltered"), "the rogue frame to arrive with the filter off")

        lab.restart("h1")                          # on again, by default
        lab.wait_ready(["h1"], timeout=60)
        wait_for(lambda: allowed(lab, "h1") == public_ips(lab, "h2"), "the filter back on h1")
        attack.send(rogue_ip, "rogue-filtered")
        attack.send(lab.host("h2").public_ip, "spoofed-again")
        wait_for(lambda: listener.received("spoofed-again"), "the control frame to arrive")
        assert listener.received("rogue-filtered") == []
    finally:
        listener.close()


def test_peers_leaving_and_joining_update_the_allowed_set(lab):
    lab.up(hosts=3)
    lab.wait_converged(timeout=90)
    for host, others in (("h1", ("h2", "h3")), ("h2", ("h1", "h3")), ("h3", ("h1", "h2"))):
        wait_for(lambda: allowed(lab, host) == public_ips(lab, *others), f"{host} to allow {others}")

    # h3 leaves: its daemon stops (its kernel state stays, as on a host that died) and its lease
    # is deleted. Its address goes from every other host's filter.
    lab.stop_daemon("h3")
    before = dropped(lab, "h1")
    started = time.monotonic()
    lab.etcdctl("del", subnet_key(PREFIX, lab.subnet("h3")))
    wait_for(lambda: allowed(lab, "h1") == public_ips(lab, "h2") and allowed(lab, "h2") == public_ips(lab, "h1"),
             "h3 removed from the allowed sets")
    print(f"peer left: its address gone from both filters {1000 * (time.monotonic() - started):.0f} ms after "
          f"the lease was deleted")
    # h3 still holds an FDB entry and route to h1: its VXLAN is now refused there.
    assert lab.ping("h3", lab.overlay_address("h1"), wait=0.5) is None
    assert dropped(lab, "h1") > before

    newcomer = lab.add_host()
    lab.wait_converged(["h1", "h2", newcomer.name], timeout=90)
    wait_for(lambda: newcomer.public_ip in allowed(lab, "h1") and newcomer.public_ip in allowed(lab, "h2"),
             "the newcomer allowed on h1 and h2")
    assert allowed(lab, newcomer.name) == public_ips(lab, "h1", "h2")
    reach = lab.reachability(["h1", "h2", newcomer.name])
    assert all(rtt is not None for rtt in reach.values()), reach


def test_drift_in_the_filter_and_the_rules_is_repaired_by_the_resync(lab):
    """The daemon knows its filter and iptables rules by the nftables ruleset generation and
    lists them only when it moved: drift made with nft or iptables (each a commit) is still
    found and repaired within a resync interval (at most 10 s; polled here with room to spare)."""
    lab.up(hosts=3)
    lab.wait_converged(timeout=90)
    wait_for(lambda: allowed(lab, "h1") == public_ips(lab, "h2", "h3"), "h1 to allow h2 and h3")
    netns = lab.host("h1").netns
    h2 = lab.host("h2").public_ip

    def nft(*argv: str) -> None:
        subprocess.run(["ip", "netns", "exec", netns, "nft", *argv], check=True, capture_output=True, timeout=30)

    nft("delete", "element", "ip", "overlay", "vxlan_sources", f"{{ {h2} }}")
    nft("add", "element", "ip", "overlay", "vxlan_sources", "{ 203.0.113.9 }")
    assert allowed(lab, "h1") == frozenset({lab.host("h3").public_ip, IPv4Address("203.0.113.9")})
    started = time.monotonic()
    wait_for(lambda: allowed(lab, "h1") == public_ips(lab, "h2", "h3"), "the filter repaired on h1", timeout=40)
    print(f"VXLAN filter drift repaired {time.monotonic() - started:.1f} s after it was made")

    def forward_rules() -> list[str]:
        done = subprocess.run(["ip", "netns", "exec", netns, "iptables", "-S", firewall.FORWARD_CHAIN],
                              capture_output=True, text=True, timeout=30)
        return [line for line in done.stdout.splitlines() if line.startswith("-A ")]

    wanted = forward_rules()
    assert len(wanted) == 2, wanted
    subprocess.run(["ip", "netns", "exec", netns, "iptables", "-F", firewall.FORWARD_CHAIN], check=True, timeout=30)
    assert forward_rules() == []
    wait_for(lambda: forward_rules() == wanted, "the forwarding rules repaired on h1", timeout=40)
    # And a lease event after the repair still updates the filter by difference.
    lab.stop_daemon("h3")
    lab.etcdctl("del", subnet_key(PREFIX, lab.subnet("h3")))
    wait_for(lambda: allowed(lab, "h1") == public_ips(lab, "h2"), "h3 gone from h1's filter")


def mode(path: Path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


NOBODY_CONNECTS = r"""
import socket, sys
print(open(sys.argv[1] + "/subnet.env").read().splitlines()[0])   # the path is traversable
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
try:
    s.connect(sys.argv[1] + "/cni.sock")
    print("connected")
except PermissionError:
    print("refused")
"""


def test_files_and_socket_the_daemon_and_plugin_write_have_tight_modes(lab):
    lab.up(hosts=1)
    lab.wait_ready(timeout=60)
    lab.add_container("h1")
    run_dir = lab.host("h1").run_dir
    store = run_dir / "cni-ipam"

    # Written with explicit modes; a umask can only narrow them, so "no more than" is the check.
    subnet_env = run_dir / "subnet.env"
    assert mode(subnet_env) & ~0o644 == 0 and os.stat(subnet_env).st_uid == 0   # no secrets, world-readable is fine
    socket_path = run_dir / "cni.sock"
    assert stat.S_ISSOCK(os.lstat(socket_path).st_mode)
    assert mode(socket_path) == 0o600 and os.lstat(socket_path).st_uid == 0       # chmod'ed before it is visible
    assert stat.S_ISDIR(os.lstat(store).st_mode) and mode(store) & ~0o700 == 0
    for name in ("allocations.json", "lock"):
        assert mode(store / name) & ~0o600 == 0 and os.stat(store / name).st_uid == 0, name
    # No temporary files are left behind.
    assert not [p.name for p in run_dir.iterdir() if p.name.startswith(".")]
    assert not [p.name for p in store.iterdir() if p.name.startswith(".")]

    # An unprivileged process can read the subnet file but cannot talk to the CNI service.
    done = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", sys.executable, "-I",
                           "-c", NOBODY_CONNECTS, str(run_dir)], capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == ["FLANNEL_NETWORK=10.244.0.0/16", "refused"], done.stdout

    # Even with the socket's mode loosened by someone, the service itself refuses a non-root
    # caller (SO_PEERCRED), with a CNI error naming why, and attaches nothing.
    os.chmod(socket_path, 0o666)
    try:
        done = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", sys.executable, "-I",
                               "-c", NOBODY_ASKS, str(socket_path)], capture_output=True, text=True, timeout=30)
    finally:
        os.chmod(socket_path, 0o600)
    assert done.returncode == 0, done.stderr
    status, _, answer = done.stdout.partition("\n")
    error = json.loads(answer)
    assert status == "1" and error["code"] == 111 and "only root" in error["msg"], done.stdout


NOBODY_ASKS = r"""
import json, socket, sys
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.connect(sys.argv[1])
s.sendall(json.dumps({"env": {"CNI_COMMAND": "VERSION"}, "stdin": "{}"}).encode())
s.shutdown(socket.SHUT_WR)
print(s.makefile().read(), end="")
"""
