"""Unit tests of overlay.config: flannel's network config rules, parsed strictly.

Each refusal is checked through `ConfigError.field`, because operators fix configs by the field the
message names; a test that only checked "some error" would pass on the wrong complaint.
"""

from __future__ import annotations

import json
from ipaddress import IPv4Address, IPv4Network

import pytest

from overlay.config import DEFAULT_VNI, DEFAULT_VXLAN_PORT, NetworkConfig, VxlanBackend, parse_config
from overlay.errors import ConfigError


def config_json(**fields) -> str:
    fields.setdefault("Network", "10.244.0.0/16")
    return json.dumps(fields)


def refused_field(text: str | bytes) -> str:
    with pytest.raises(ConfigError) as caught:
        parse_config(text)
    error = caught.value
    # The message leads with the field, so a log line alone tells the operator what to fix.
    assert str(error).startswith(f"{error.field}: ")
    assert error.problem
    return error.field


# --- SubnetLen --------------------------------------------------------------------------------

@pytest.mark.parametrize("network, expected_len", [
    ("10.0.0.0/8", 24),
    ("10.244.0.0/16", 24),
    ("10.244.0.0/22", 24),    # the last size that still gets flannel's fixed /24
    ("10.244.0.0/23", 25),    # smaller networks: prefix + 2, i.e. four subnets
    ("10.244.0.0/24", 26),
    ("10.244.0.0/28", 30),
])
def test_subnet_len_default_follows_flannel(network, expected_len):
    assert parse_config(config_json(Network=network)).subnet_len == expected_len


def test_explicit_zero_subnet_len_means_default():
    assert parse_config(config_json(SubnetLen=0)).subnet_len == 24


@pytest.mark.parametrize("network, subnet_len", [
    ("10.244.0.0/16", 18), ("10.244.0.0/16", 30), ("10.244.0.0/24", 26), ("10.244.0.0/28", 30),
])
def test_subnet_len_within_bounds_is_kept(network, subnet_len):
    assert parse_config(config_json(Network=network, SubnetLen=subnet_len)).subnet_len == subnet_len


@pytest.mark.parametrize("network, subnet_len", [
    ("10.244.0.0/16", 31),    # no room for a gateway and containers
    ("10.244.0.0/16", 32),
    ("10.244.0.0/16", 17),    # fewer than four subnets
    ("10.244.0.0/16", 16),
    ("10.244.0.0/24", 25),
    ("10.244.0.0/16", -1),
])
def test_subnet_len_out_of_bounds_is_refused(network, subnet_len):
    assert refused_field(config_json(Network=network, SubnetLen=subnet_len)) == "SubnetLen"


@pytest.mark.parametrize("value", ["24", 24.0, True, None, [24]])
def test_subnet_len_must_be_an_integer(value):
    assert refused_field(config_json(SubnetLen=value)) == "SubnetLen"


# --- Network ----------------------------------------------------------------------------------

@pytest.mark.parametrize("network", [
    "10.244.0.0/29",          # smaller than the /28 minimum
    "10.244.0.0/32",
    "10.244.0.1/16",          # host bits set: almost always a typo
    "10.244.0.0/33",
    "not-a-network",
    "fd00::/64",              # IPv6 overlays are not supported
    "",
    16,
    None,
])
def test_bad_network_is_refused(network):
    assert refused_field(config_json(Network=network)) == "Network"


def test_network_is_required():
    assert refused_field("{}") == "Network"


def test_smallest_network_is_a_28():
    config = parse_config(config_json(Network="10.244.0.0/28"))
    assert (config.subnet_len, config.subnet_min, config.subnet_max) == (
        30, IPv4Address("10.244.0.4"), IPv4Address("10.244.0.12"))


# --- SubnetMin / SubnetMax --------------------------------------------------------------------

def test_subnet_range_defaults_skip_the_first_subnet_and_end_at_the_last():
    config = parse_config(config_json())
    assert config.subnet_min == IPv4Address("10.244.1.0")
    assert config.subnet_max == IPv4Address("10.244.255.0")
    assert config.subnet_count == 255


def test_subnet_range_defaults_for_a_longer_subnet_len():
    config = parse_config(config_json(Network="10.1.0.0/24", SubnetLen=28))
    assert (config.subnet_min, config.subnet_max) == (IPv4Address("10.1.0.16"), IPv4Address("10.1.0.240"))


def test_explicit_subnet_range_is_kept():
    config = parse_config(config_json(SubnetMin="10.244.10.0", SubnetMax="10.244.20.0"))
    assert (config.subnet_min, config.subnet_max, config.subnet_count) == (
        IPv4Address("10.244.10.0"), IPv4Address("10.244.20.0"), 11)


def test_empty_subnet_bounds_mean_default():
    config = parse_config(config_json(SubnetMin="", SubnetMax=None))
    assert (config.subnet_min, config.subnet_max) == (IPv4Address("10.244.1.0"), IPv4Address("10.244.255.0"))


def test_single_subnet_range_is_allowed():
    config = parse_config(config_json(SubnetMin="10.244.7.0", SubnetMax="10.244.7.0"))
    assert config.subnet_count == 1
    assert config.subnet_at(0) == IPv4Network("10.244.7.0/24")


@pytest.mark.parametrize("field", ["SubnetMin", "SubnetMax"])
@pytest.mark.parametrize("value", [
    "10.245.0.0",             # outside the network
    "10.243.255.0",
    "10.244.3.128",           # inside, but not on a /24 boundary
    "10.244.3.1",
    "10.244.3",               # not an address
    "10.244.3.0/24",
    183_763_712,              # 10.244.3.0 as a number: flannel's JSON only carries strings
    True,
    ["10.244.3.0"],
])
def test_bad_subnet_bound_is_refused(field, value):
    assert refused_field(config_json(**{field: value})) == field


def test_subnet_min_above_max_is_refused():
    assert refused_field(config_json(SubnetMin="10.244.20.0", SubnetMax="10.244.10.0")) == "SubnetMin"


# --- Backend ----------------------------------------------------------------------------------

def test_backend_defaults():
    backend = parse_config(config_json()).backend
    assert backend == VxlanBackend(vni=1, port=8472, direct_routing=False)
    assert (DEFAULT_VNI, DEFAULT_VXLAN_PORT) == (1, 8472)
    assert backend.device_name == "flannel.1"


def test_backend_settings_are_kept():
    config = parse_config(config_json(Backend={"Type": "vxlan", "VNI": 4096, "Port": 4789,
                                               "DirectRouting": True}))
    assert config.backend == VxlanBackend(vni=4096, port=4789, direct_routing=True)
    assert config.backend.device_name == "flannel.4096"


@pytest.mark.parametrize("vni", [1, 42, (1 << 24) - 1])
def test_vni_range_accepted(vni):
    assert parse_config(config_json(Backend={"Type": "vxlan", "VNI": vni})).backend.vni == vni


@pytest.mark.parametrize("vni", [0, -1, 1 << 24, "1", 1.0, True, None])
def test_bad_vni_is_refused(vni):
    assert refused_field(config_json(Backend={"Type": "vxlan", "VNI": vni})) == "Backend.VNI"


def test_port_zero_means_default():
    assert parse_config(config_json(Backend={"Type": "vxlan", "Port": 0})).backend.port == 8472


@pytest.mark.parametrize("port", [-1, 65536, "8472", True, 8472.0])
def test_bad_port_is_refused(port):
    assert refused_field(config_json(Backend={"Type": "vxlan", "Port": port})) == "Backend.Port"


@pytest.mark.parametrize("value", ["true", 1, 0, None])
def test_direct_routing_must_be_a_bool(value):
    assert refused_field(config_json(Backend={"Type": "vxlan", "DirectRouting": value})) == "Backend.DirectRouting"


@pytest.mark.parametrize("kind", ["udp", "host-gw", "wireguard", "", None, 1])
def test_only_vxlan_backend(kind):
    assert refused_field(config_json(Backend={"Type": kind})) == "Backend.Type"


def test_unknown_backend_field_is_refused_by_name():
    assert refused_field(config_json(Backend={"Type": "vxlan", "GBP": True})) == "Backend.GBP"


@pytest.mark.parametrize("backend", ["vxlan", [], None, 1])
def test_backend_must_be_an_object(backend):
    assert refused_field(config_json(Backend=backend)) == "Backend"


# --- the document as a whole ------------------------------------------------------------------

def test_unknown_top_level_field_is_refused_by_name():
    assert refused_field(config_json(SubnetLength=24)) == "SubnetLength"


def test_flannel_fields_we_tolerate():
    config = parse_config(config_json(EnableIPv4=True, EnableIPv6=False, IPv6Network="",
                                      EnableNFTables=True))
    assert config.network == IPv4Network("10.244.0.0/16")


@pytest.mark.parametrize("fields, field", [
    ({"EnableIPv6": True}, "EnableIPv6"),
    ({"IPv6Network": "fd00::/56"}, "EnableIPv6"),
    ({"EnableIPv4": False}, "EnableIPv4"),
    ({"EnableNFTables": "yes"}, "EnableNFTables"),
])
def test_what_we_cannot_honour_is_refused(fields, field):
    assert refused_field(config_json(**fields)) == field


@pytest.mark.parametrize("text", ["", "{", "not json", "[]", "null", '"10.244.0.0/16"', "16",
                                  b"\xff\xfe\xfa", "[" * 100_000])
def test_not_a_json_object_is_refused(text):
    assert refused_field(text) == "config"


def test_bytes_are_accepted():
    assert parse_config(config_json().encode()).network == IPv4Network("10.244.0.0/16")


def test_flannel_documentation_example():
    config = parse_config('{"Network": "10.244.0.0/16", "SubnetLen": 24, "SubnetMin": "10.244.10.0", '
                          '"SubnetMax": "10.244.99.0", "Backend": {"Type": "vxlan", "VNI": 1, '
                          '"Port": 8472}}')
    assert config == NetworkConfig(IPv4Network("10.244.0.0/16"), 24, IPv4Address("10.244.10.0"),
                                   IPv4Address("10.244.99.0"), VxlanBackend(1, 8472, False))


@pytest.mark.parametrize("text", [
    config_json(),
    config_json(Network="10.1.0.0/24", SubnetLen=28),
    config_json(Network="172.16.0.0/12", SubnetLen=20, SubnetMin="172.16.16.0", SubnetMax="172.31.0.0",
                Backend={"Type": "vxlan", "VNI": 77, "Port": 4789, "DirectRouting": True}),
])
def test_to_json_round_trips(text):
    config = parse_config(text)
    assert parse_config(config.to_json()) == config
    assert json.loads(config.to_json())["Backend"]["Type"] == "vxlan"


# --- helpers on the parsed value --------------------------------------------------------------

def test_subnet_at_and_holds():
    config = parse_config(config_json(SubnetMin="10.244.10.0", SubnetMax="10.244.12.0"))
    assert [config.subnet_at(i) for i in range(config.subnet_count)] == [
        IPv4Network("10.244.10.0/24"), IPv4Network("10.244.11.0/24"), IPv4Network("10.244.12.0/24")]
    assert config.holds(IPv4Network("10.244.11.0/24"))
    assert not config.holds(IPv4Network("10.244.9.0/24"))    # below SubnetMin
    assert not config.holds(IPv4Network("10.244.13.0/24"))   # above SubnetMax
    assert not config.holds(IPv4Network("10.244.11.0/25"))   # wrong length
    assert not config.holds(IPv4Network("10.244.10.0/23"))


def test_network_config_is_immutable():
    config = parse_config(config_json())
    with pytest.raises(AttributeError):
        config.subnet_len = 25  # type: ignore[misc]
