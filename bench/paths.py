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
  And container to container, the path a user's traffic takes:
    container           a container on each host attached through our CNI plugin by the lab
                        (lab.add_container: bridge ovl-cni0, veth, MTU from subnet.env), across
                        our VXLAN device
    handmade_container  the same made by hand: a namespace per host on a bridge with a veth of
                        the same MTU and queue count, routed across the hand-built VXLAN
  When the lab cannot attach containers (no plugin), the container paths are left out and the
  benchmarks say why.
- Endpoints are namespaces: every command of a benchmark runs through ns_exec / ns_spawn with
  the endpoint's namespace, so a host and a container are driven the same way.
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


def ns_exec(netns: str, argv: list[str], check: bool = False, timeout: float = 120.0,
            input: str | None = None) -> subprocess.CompletedProcess:
    """Run argv in a namespace (a lab host's or a container's); text output captured."""
    result = subprocess.run(["ip", "netns", "exec", netns, *argv], input=input, capture_output=True, text=True,
                            timeout=timeout, stdin=None if input is not None else subprocess.DEVNULL)
    if check and result.returncode != 0:
        raise RuntimeError(f"{netns}: `{' '.join(argv)}` failed: {(result.stderr or result.stdout).strip()}")
    return result


def ns_spawn(netns: str, argv: list[str], **popen_kwargs) -> subprocess.Popen:
    popen_kwargs.setdefault("stdin", subprocess.DEVNULL)
    return subprocess.Popen(["ip", "netns", "exec", netns, *argv], **popen_kwargs)


def container_path(lab: Lab, a: str, b: str) -> NetPath:
    """A container on a and one on b, attached through our CNI plugin by the lab."""
    ends = []
    for host in (a, b):
        container = lab.add_container(host)
        ends.append(Endpoint(container.name, container.netns, container.ip.ip, "eth0"))
    return NetPath("container", "container to container, ours (CNI + flannel.1)", ends[0], ends[1])


def build_handmade_containers(lab: Lab, handmade: NetPath, like: NetPath) -> NetPath:
    """A namespace per host on a bridge, routed over the hand-built VXLAN: `like`'s topology.

    Host i: bridge hbbr0 with 172.30.<i>.1/24 (the hand-built device holds 172.30.<i>.0/32, and
    each host already routes the other's 172.30.<j>.0/24 over it), a veth hbv0 into namespace
    ovl-<lab>-<host>k whose eth0 is 172.30.<i>.2/24 with the MTU and queue count of the CNI
    plugin's container eth0, default route via the bridge."""
    mtu = link_json_ns(like.client.netns, "eth0")["mtu"]
    queues = link_json_ns(like.client.netns, "eth0").get("num_tx_queues", 1)
    ends = []
    for end in (handmade.client, handmade.server):
        host = lab.host(end.host)
        netns = f"ovl-{lab.name}-{host.name}k"
        base = end.address            # 172.30.<i>.0
        subprocess.run(["ip", "netns", "add", netns], check=True, capture_output=True)
        _batch(lab, host.name, [
            "link add hbbr0 type bridge",
            f"addr add {base + 1}/24 dev hbbr0",
            f"link set hbbr0 mtu {mtu} up",
            f"link add hbv0 numtxqueues {queues} numrxqueues {queues} type veth peer name eth0 "
            f"numtxqueues {queues} numrxqueues {queues} netns {netns}",
            f"link set hbv0 mtu {mtu} master hbbr0 up",
        ])
        ns_exec(netns, ["ip", "-batch", "-"], check=True, input="\n".join([
            "link set lo up", f"link set eth0 mtu {mtu} up", f"addr add {base + 2}/24 dev eth0",
            f"route add default via {base + 1}"]) + "\n")
        ends.append(Endpoint(f"{host.name}k", netns, base + 2, "eth0"))
    return NetPath("handmade_container", "container to container, hand-built (bridge + hand-built VXLAN)",
                   ends[0], ends[1])


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


def all_paths(lab: Lab, a: str = "h1", b: str = "h2") -> tuple[list[NetPath], dict[str, str]]:
    """Every path measurable in this lab (building the hand-made ones), and {path: why not} for
    those that are not."""
    handmade = build_handmade(lab, a, b)
    paths = [overlay_path(lab, a, b), handmade]
    missing = {}
    try:
        container = container_path(lab, a, b)
    except Exception as exc:    # no plugin, or it failed: measure the rest, say why
        missing["container"] = f"the lab could not attach containers: {exc}"
    else:
        paths += [container, build_handmade_containers(lab, handmade, container)]
    return paths + [underlay_path(lab, a, b)], missing


# Pairs compared as per-round ratios (first / second), when both paths exist.
COMPARISONS = (("overlay", "handmade"), ("container", "handmade_container"), ("overlay", "underlay"),
               ("container", "overlay"))


# ------------------------------------------------------------------------------- device facts

def link_json(lab: Lab, host: str, device: str) -> dict:
    return link_json_ns(lab.host(host).netns, device)


def link_json_ns(netns: str, device: str) -> dict:
    return json.loads(ns_exec(netns, ["ip", "-d", "-j", "link", "show", "dev", device], check=True).stdout)[0]


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


def offload_features(netns: str, devices: list[str]) -> dict[str, dict[str, bool]]:
    """{device: {feature: enabled}} for the features the device can change or has on."""
    result = ns_exec(netns, [sys.executable, "-c", _FEATURES_SCRIPT, *devices])
    if result.returncode != 0:
        return {device: {"error": result.stderr.strip()[-300:]} for device in devices}
    return json.loads(result.stdout)


def device_facts(path: NetPath) -> dict:
    """MTU, VXLAN settings and offloads of the device each end of the path uses."""
    facts = {}
    for end in (path.client, path.server):
        link = link_json_ns(end.netns, end.device)
        info = link.get("linkinfo", {}).get("info_data", {})
        keep = {key: link.get(key) for key in ("mtu", "gso_max_size", "gso_max_segs", "gro_max_size",
                                               "tso_max_size", "txqlen", "qdisc", "num_tx_queues")}
        if info:
            keep["vxlan"] = {key: info.get(key) for key in ("id", "port", "local", "link", "learning",
                                                           "udp_csum", "ttl", "df", "ageing")}
        features = offload_features(end.netns, [end.device])
        keep["offloads_on"] = sorted(k for k, v in features.get(end.device, {}).items() if v is True)
        facts[end.host] = keep
    return facts


def setting_differences(ours: dict, handmade: dict) -> list[str]:
    """What differs between our device and the hand-built one, setting by setting, end by end."""
    differences = []
    for (host, a), b in zip(ours.items(), handmade.values()):
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
