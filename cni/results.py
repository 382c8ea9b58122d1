"""CNI results in the shape each spec version defines, and reading a prevResult back.

Differences between the versions we speak, as the spec text and libcni's types define them:

- 0.3.0, 0.3.1, 0.4.0: each entry of `ips` carries `"version": "4"` (or "6").
- 1.0.0: `ips[].version` is gone (the address says it).
- 1.1.0: interfaces may carry `mtu` (and socketPath/pciID, which a veth has not).

Pure functions over plain values; unit-tested without root.
"""

from __future__ import annotations

from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Interface, ip_interface

from cni.errors import AttachmentDrift
from cni.spec import version_tuple


@dataclass(frozen=True)
class Attachment:
    """What ADD made: the two ends of the veth pair and the container's address."""
    host_ifname: str
    host_mac: str
    ifname: str
    mac: str
    sandbox: str
    mtu: int
    address: IPv4Interface
    gateway: IPv4Address


def add_result(version: str, attachment: Attachment, dns: dict | None, prev_result: dict | None = None) -> dict:
    """ADD's result. Behind another plugin in a chain, the previous result is passed on with
    ours appended (the spec: a plugin must pass prevResult through, modify or suppress it, never
    ignore it): its interfaces first, so our address names our interface by its new index."""
    prev = prev_result if isinstance(prev_result, dict) else {}
    earlier = [item for item in _list(prev, "interfaces") if isinstance(item, dict)]
    major_one = version_tuple(version) >= (1, 0, 0)
    with_mtu = version_tuple(version) >= (1, 1, 0)
    host = {"name": attachment.host_ifname, "mac": attachment.host_mac}
    container = {"name": attachment.ifname, "mac": attachment.mac, "sandbox": attachment.sandbox}
    if with_mtu:
        host["mtu"] = attachment.mtu
        container["mtu"] = attachment.mtu
    ip = {"address": str(attachment.address), "gateway": str(attachment.gateway), "interface": len(earlier) + 1}
    if not major_one:
        ip = {"version": "4", **ip}
    return {
        "cniVersion": version,
        "interfaces": earlier + [host, container],
        "ips": _list(prev, "ips") + [ip],
        "routes": _list(prev, "routes") + [{"dst": "0.0.0.0/0", "gw": str(attachment.gateway)}],
        "dns": dict(dns) if dns else dict(prev["dns"]) if isinstance(prev.get("dns"), dict) else {},
    }


def _list(result: dict, field: str) -> list:
    value = result.get(field)
    return list(value) if isinstance(value, list) else []


def expected_in_prev_result(prev_result: dict | None, ifname: str, sandbox: str, address: IPv4Interface) -> None:
    """CHECK must consult prevResult: our interface and address must be listed there as ADD
    returned them (a later plugin in the chain may add things, but not take ours away)."""
    if prev_result is None:
        raise AttachmentDrift("CHECK needs prevResult (the result of the ADD) in the network config")
    interfaces = prev_result.get("interfaces") or []
    ips = prev_result.get("ips") or []
    if not isinstance(interfaces, list) or not isinstance(ips, list):
        raise AttachmentDrift("prevResult: interfaces and ips must be arrays")
    ours = [i for i, item in enumerate(interfaces)
            if isinstance(item, dict) and item.get("name") == ifname and item.get("sandbox") == sandbox]
    if not ours:
        raise AttachmentDrift(f"prevResult lists no interface {ifname} in sandbox {sandbox}")
    listed = set()
    for item in ips:
        try:
            listed.add(ip_interface(item["address"]))
        except (KeyError, TypeError, ValueError):
            raise AttachmentDrift(f"prevResult holds a malformed ips entry: {item!r}") from None
    if address not in listed:
        raise AttachmentDrift(f"prevResult does not list the allocated address {address}")
