"""The data paths a packet can take between two lab hosts, and the VXLAN built by hand.

Design notes
- A `NetPath` is (client endpoint, server endpoint): a namespace to run the client in, and the
  address and namespace of the server. Throughput and latency only ever see NetPaths, so a new
  path is one more constructor here. Three exist today, all between the same two host
  namespaces, so they share CPUs, netfilter hooks and the underlay bridge:
    overlay    our VXLAN device (flannel.1), host overlay address to host overlay address
    underlay   eth0 to eth0: the bridge between the hosts, no encapsulation (the ceiling)
    handmade   a second VXLAN device made with iproute2 in the same two namespaces, another VNI
               and UDP port, programmed exactly as flannel does (learning off, MTU = ours,
               neighbour + FDB + onlink route): the kernel's VXLAN limit, which ours should meet.
  Container to container (the CNI issue) is one more constructor, `container_path`, that returns
  a NetPath whose endpoints are container namespaces once the plugin can place them; today it
  returns None and the benchmarks list it as not measured.
- Why two VXLAN devices in the same namespaces rather than two extra namespaces: the extra
  namespaces would hang off the same bridge with their own veths, so the comparison would also
  compare different veth pairs and netfilter state. In the same namespace, the only difference
  is the device programming, which is what the ratio should isolate. The kernel allows two VXLAN
  devices on one local address when their UDP ports differ.
- `device_facts()` reads what decides VXLAN throughput: MTU, the VXLAN settings the kernel
  reports (`ip -d -j link`: port, learning, udp_csum, df, ttl, gso/gro sizes) and the offload
  features (ethtool's view, read through pyroute2's Ethtool inside the namespace, since the
  ethtool binary is not installed here). `setting_differences()` lists what differs between
  ours and the hand-built device, so a lost percent has a named cause.
"""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network

from overlay.lab import Lab

HANDMADE_DEVICE = "vxhand"
HANDMADE_VNI = 4242
HANDMADE_PORT = 4789
HANDMADE_NETWORK = IPv4Network("172.30.0.0/16")   # its own range, far from the overlay's
HANDMADE_PROTO = 212                              # not ours (211): the daemon must never touch it


@dataclass(frozen=True)
class Endpoint:
    host: str            # lab host name ("h1"); the namespace to run in
    netns: str
    address: IPv4Address
    device: str          # the device the address lives on


@dataclass(frozen=True)
class NetPath:
    name: str            # overlay | underlay | handmade | container
    label: str           # for tables and plots
    client: Endpoint
    server: Endpoint


def overlay_path(lab: Lab, a: str, b: str) -> NetPath:
    def end(host: str) -> Endpoint:
        address = lab.overlay_address(host)
        if address is None:
            raise RuntimeError(f"{host} has no overlay address yet (daemon not ready)")
        return Endpoint(host, lab.host(host).netns, address, lab.vxlan_device)
    return NetPath("overlay", f"ours ({lab.vxlan_device})", end(a), end(b))


def underlay_path(lab: Lab, a: str, b: str) -> NetPath:
    def end(host: str) -> Endpoint:
        return Endpoint(host, lab.host(host).netns, lab.host(host).public_ip, "eth0")
    return NetPath("underlay", "underlay (eth0, no VXLAN)", end(a), end(b))


def container_path(lab: Lab, a: str, b: str) -> NetPath | None:
    """Container to container across a and b: needs the CNI plugin to place containers (issue 4)."""
    return None


def _ip(lab: Lab, host: str, *args: str, tool: str = "ip") -> subprocess.CompletedProcess:
    return lab.exec(host, [tool, *args], check=True)


def _batch(lab: Lab, host: str, lines: list[str], tool: str = "ip") -> None:
    lab.exec(host, [tool, "-batch", "-"], input="\n".join(lines) + "\n", check=True)


def build_handmade(lab: Lab, a: str, b: str) -> NetPath:
    """A VXLAN device per host, programmed by hand the way flannel programs its own, as a path.

    Host i gets 172.30.<i>.0/32 on `vxhand` (VNI 4242, UDP 4789, local = its public IP, learning
    off, MTU = our device's) and, for the other host, a permanent neighbour, an FDB entry and an
    onlink route via the peer's address: the same objects, in the same order, as ours."""
    hosts = [lab.host(a), lab.host(b)]
    mtu = link_json(lab, a, lab.vxlan_device)["mtu"]
    addresses = {}
    for index, host in enumerate(hosts, start=1):
        address = HANDMADE_NETWORK.network_address + (index << 8)
        addresses[host.name] = address
        _batch(lab, host.name, [
            f"link add {HANDMADE_DEVICE} type vxlan id {HANDMADE_VNI} dstport {HANDMADE_PORT} "
            f"local {host.public_ip} dev eth0 nolearning",
            f"link set {HANDMADE_DEVICE} mtu {mtu}",
            f"addr add {address}/32 dev {HANDMADE_DEVICE}",
            f"link set {HANDMADE_DEVICE} up",
        ])
    macs = {host.name: link_json(lab, host.name, HANDMADE_DEVICE)["address"] for host in hosts}
    for host, peer in ((hosts[0], hosts[1]), (hosts[1], hosts[0])):
        gateway = addresses[peer.name]
        _batch(lab, host.name, [
            f"neigh replace {gateway} lladdr {macs[peer.name]} dev {HANDMADE_DEVICE} nud permanent"])
        _batch(lab, host.name, [
            f"fdb replace {macs[peer.name]} dev {HANDMADE_DEVICE} dst {peer.public_ip} self permanent"],
            tool="bridge")
        _batch(lab, host.name, [
            f"route replace {gateway}/24 via {gateway} dev {HANDMADE_DEVICE} onlink proto {HANDMADE_PROTO}"])

    def end(host) -> Endpoint:
        return Endpoint(host.name, host.netns, addresses[host.name], HANDMADE_DEVICE)
    return NetPath("handmade", f"hand-built VXLAN (iproute2, VNI {HANDMADE_VNI})", end(hosts[0]), end(hosts[1]))


def all_paths(lab: Lab, a: str = "h1", b: str = "h2") -> list[NetPath]:
    """Every path measurable in this lab; builds the hand-made VXLAN on first use."""
    paths = [overlay_path(lab, a, b), underlay_path(lab, a, b), build_handmade(lab, a, b)]
    container = container_path(lab, a, b)
    return paths + ([container] if container else [])


# ------------------------------------------------------------------------------- device facts

def link_json(lab: Lab, host: str, device: str) -> dict:
    return json.loads(_ip(lab, host, "-d", "-j", "link", "show", "dev", device).stdout)[0]


_FEATURES_SCRIPT = """
import json, sys
from pyroute2 import Ethtool
out = {}
with Ethtool() as tool:
    for name in sys.argv[1:]:
        features = tool.get_features(name).features
        out[name] = {key: bool(f.enable) for key, f in features.items() if key and f.available}
print(json.dumps(out))
"""


def offload_features(lab: Lab, host: str, devices: list[str]) -> dict[str, dict[str, bool]]:
    """{device: {feature: enabled}} for the features the device can change or has on."""
    result = lab.exec(host, [sys.executable, "-c", _FEATURES_SCRIPT, *devices])
    if result.returncode != 0:
        return {device: {"error": result.stderr.strip()[-300:]} for device in devices}
    return json.loads(result.stdout)


def device_facts(lab: Lab, path: NetPath) -> dict:
    """MTU, VXLAN settings and offloads of the device each end of the path uses, and eth0's."""
    facts = {}
    for end in (path.client, path.server):
        link = link_json(lab, end.host, end.device)
        info = link.get("linkinfo", {}).get("info_data", {})
        keep = {key: link.get(key) for key in ("mtu", "gso_max_size", "gso_max_segs", "gro_max_size",
                                               "tso_max_size", "txqlen", "qdisc", "num_tx_queues")}
        if info:
            keep["vxlan"] = {key: info.get(key) for key in ("id", "port", "local", "link", "learning",
                                                           "udp_csum", "ttl", "df", "ageing")}
        features = offload_features(lab, end.host, [end.device])
        keep["offloads_on"] = sorted(k for k, v in features.get(end.device, {}).items() if v is True)
        facts[end.host] = keep
    return facts


def setting_differences(ours: dict, handmade: dict) -> list[str]:
    """What differs between our device and the hand-built one, setting by setting (client side)."""
    differences = []
    for host in ours:
        a, b = ours[host], handmade.get(host, {})
        for key in sorted(set(a) | set(b)):
            if key == "vxlan":
                for sub in sorted(set(a.get("vxlan", {})) | set(b.get("vxlan", {}))):
                    if sub in ("id", "port"):
                        continue   # differ by construction
                    if a.get("vxlan", {}).get(sub) != b.get("vxlan", {}).get(sub):
                        differences.append(f"{host} vxlan.{sub}: ours {a['vxlan'].get(sub)!r}, "
                                           f"hand-built {b.get('vxlan', {}).get(sub)!r}")
            elif key == "offloads_on":
                only_ours = sorted(set(a.get(key, [])) - set(b.get(key, [])))
                only_hand = sorted(set(b.get(key, [])) - set(a.get(key, [])))
                if only_ours or only_hand:
                    differences.append(f"{host} offloads only ours: {only_ours}; only hand-built: {only_hand}")
            elif a.get(key) != b.get(key):
                differences.append(f"{host} {key}: ours {a.get(key)!r}, hand-built {b.get(key)!r}")
    return differences
