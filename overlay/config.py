"""The network config stored at `<prefix>/config`: flannel's JSON, parsed strictly.

flannel's rules (pkg/subnet/config.go) are kept so a config written for flanneld means the same
thing here: SubnetLen defaults to 24 when the network is /22 or larger, else network length + 2;
SubnetMin defaults to the second subnet (the first is skipped), SubnetMax to the last; both must lie
in the network and on a SubnetLen boundary. What flannel would accept but we cannot honour (IPv6,
other backends) is refused with a message naming the field, never silently ignored.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network
from typing import Any

from .errors import ConfigError

DEFAULT_VNI = 1
DEFAULT_VXLAN_PORT = 8472  # the Linux kernel's VXLAN port, which flannel uses too

_TOP_LEVEL_FIELDS = {"Network", "SubnetLen", "SubnetMin", "SubnetMax", "Backend",
                     "EnableIPv4", "EnableIPv6", "IPv6Network", "EnableNFTables"}
_BACKEND_FIELDS = {"Type", "VNI", "Port", "DirectRouting"}


@dataclass(frozen=True)
class VxlanBackend:
    vni: int = DEFAULT_VNI
    port: int = DEFAULT_VXLAN_PORT
    direct_routing: bool = False

    @property
    def device_name(self) -> str:
        """flannel's device name, so a host switching from flanneld keeps one device."""
        return f"flannel.{self.vni}"


@dataclass(frozen=True)
class NetworkConfig:
    network: IPv4Network
    subnet_len: int
    subnet_min: IPv4Address
    subnet_max: IPv4Address
    backend: VxlanBackend = VxlanBackend()

    @property
    def subnet_count(self) -> int:
        step = 1 << (32 - self.subnet_len)
        return (int(self.subnet_max) - int(self.subnet_min)) // step + 1

    def subnet_at(self, index: int) -> IPv4Network:
        """The index-th subnet counted from SubnetMin."""
        step = 1 << (32 - self.subnet_len)
        return IPv4Network((int(self.subnet_min) + index * step, self.subnet_len))

    def holds(self, subnet: IPv4Network) -> bool:
        """Whether subnet is one this config can lease: right length, between min and max."""
        return (subnet.prefixlen == self.subnet_len
                and self.subnet_min <= subnet.network_address <= self.subnet_max)

    def to_json(self) -> str:
        return json.dumps({
            "Network": str(self.network),
            "SubnetLen": self.subnet_len,
            "SubnetMin": str(self.subnet_min),
            "SubnetMax": str(self.subnet_max),
            "Backend": {
                "Type": "vxlan",
                "VNI": self.backend.vni,
                "Port": self.backend.port,
                "DirectRouting": self.backend.direct_routing,
            },
        }, indent=2)


def parse_config(text: str | bytes) -> NetworkConfig:
    """Parse and validate a flannel network config; raise ConfigError naming the bad field."""
    try:
        raw = json.loads(text)
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        # RecursionError: json gives up on deeply nested input; that is malformed too.
        raise ConfigError("config", f"not valid JSON ({exc})") from None
    if not isinstance(raw, dict):
        raise ConfigError("config", "must be a JSON object")
    unknown = sorted(set(raw) - _TOP_LEVEL_FIELDS)
    if unknown:
        raise ConfigError(_shown(unknown[0]), f"unknown field (known: {', '.join(sorted(_TOP_LEVEL_FIELDS))})")
    if raw.get("EnableIPv4", True) is not True:
        raise ConfigError("EnableIPv4", "only IPv4 overlays are supported; it must be true or absent")
    if raw.get("EnableIPv6", False) is not False or raw.get("IPv6Network") not in (None, ""):
        raise ConfigError("EnableIPv6", "IPv6 overlays are not supported yet")
    if not isinstance(raw.get("EnableNFTables", False), bool):
        raise ConfigError("EnableNFTables", "must be true or false")

    network = _parse_network(raw.get("Network"))
    subnet_len = _parse_subnet_len(raw.get("SubnetLen", 0), network)
    step = 1 << (32 - subnet_len)
    subnet_min = _parse_bound(raw, "SubnetMin", network, subnet_len,
                              default=IPv4Address(int(network.network_address) + step))
    subnet_max = _parse_bound(raw, "SubnetMax", network, subnet_len,
                              default=IPv4Address(int(network.broadcast_address) + 1 - step))
    if subnet_min > subnet_max:
        raise ConfigError("SubnetMin", f"{subnet_min} is above SubnetMax {subnet_max}")
    return NetworkConfig(network, subnet_len, subnet_min, subnet_max,
                         _parse_backend(raw.get("Backend", {})))


def _parse_network(value: Any) -> IPv4Network:
    if not isinstance(value, str) or not value:
        raise ConfigError("Network", "required, an IPv4 CIDR such as 10.244.0.0/16")
    try:
        network = IPv4Network(value, strict=True)
    except ValueError as exc:
        raise ConfigError("Network", f"{value!r} is not an IPv4 network CIDR ({exc})") from None
    if network.prefixlen > 28:
        raise ConfigError("Network", f"{value} is too small: the smallest useful network is a /28")
    return network


def _parse_subnet_len(value: Any, network: IPv4Network) -> int:
    if not _is_int(value):
        raise ConfigError("SubnetLen", f"must be an integer, got {value!r}")
    if value == 0:
        return 24 if network.prefixlen <= 22 else network.prefixlen + 2
    if value > 30:
        raise ConfigError("SubnetLen", f"/{value} leaves no room for a bridge and containers; at most 30")
    if value < network.prefixlen + 2:
        raise ConfigError("SubnetLen", f"/{value} gives fewer than four subnets of {network}; "
                                       f"at least {network.prefixlen + 2}")
    return value


def _parse_bound(raw: dict, field: str, network: IPv4Network, subnet_len: int,
                 default: IPv4Address) -> IPv4Address:
    value = raw.get(field)
    if value in (None, ""):
        return default
    if not isinstance(value, str):
        # IPv4Address() would take an integer (or True) as an address; flannel's JSON holds strings.
        raise ConfigError(field, f"{value!r} is not an IPv4 address string")
    try:
        address = IPv4Address(value)
    except ValueError:
        raise ConfigError(field, f"{value!r} is not an IPv4 address") from None
    if address not in network:
        raise ConfigError(field, f"{address} is outside Network {network}")
    if int(address) % (1 << (32 - subnet_len)):
        raise ConfigError(field, f"{address} is not on a /{subnet_len} boundary")
    return address


def _parse_backend(raw: Any) -> VxlanBackend:
    if not isinstance(raw, dict):
        raise ConfigError("Backend", "must be a JSON object")
    unknown = sorted(set(raw) - _BACKEND_FIELDS)
    if unknown:
        raise ConfigError(f"Backend.{_shown(unknown[0])}", "unknown field (known: Type, VNI, Port, DirectRouting)")
    kind = raw.get("Type", "vxlan")
    if kind != "vxlan":
        raise ConfigError("Backend.Type", f"{kind!r} is not supported; only \"vxlan\"")
    vni = raw.get("VNI", DEFAULT_VNI)
    if not _is_int(vni) or not 0 < vni < (1 << 24):
        raise ConfigError("Backend.VNI", f"must be an integer from 1 to 16777215, got {vni!r}")
    port = raw.get("Port", 0)
    if not _is_int(port) or not 0 <= port <= 65535:
        raise ConfigError("Backend.Port", f"must be a UDP port number, got {port!r}")
    direct = raw.get("DirectRouting", False)
    if not isinstance(direct, bool):
        raise ConfigError("Backend.DirectRouting", f"must be true or false, got {direct!r}")
    return VxlanBackend(vni=vni, port=port or DEFAULT_VXLAN_PORT, direct_routing=direct)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _shown(field_name: str) -> str:
    """A field name as an error message shows it: an empty key would otherwise vanish."""
    return field_name or '""'
