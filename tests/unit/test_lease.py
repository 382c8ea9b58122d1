"""Unit tests of overlay.lease: flannel's subnet keys and lease values, and the choice of a subnet.

The lease value under test is byte for byte what flanneld v0.28 writes, so a mixed cluster (some
hosts on flanneld, some on us) sees each other as peers.
"""

from __future__ import annotations

import json
import random
from collections import Counter
from ipaddress import IPv4Address, IPv4Network

import pytest

from overlay.config import parse_config
from overlay.errors import LeaseParseError, SubnetsExhausted
from overlay.lease import (DEFAULT_PREFIX, Lease, LeaseAttrs, choose_subnet, config_key,
                           parse_lease_value, parse_subnet_key, subnet_key, subnets_prefix)

FLANNELD_VALUE = ('{"PublicIP":"198.18.0.3","PublicIPv6":null,"BackendType":"vxlan",'
                  '"BackendData":{"VNI":1,"VtepMAC":"c6:d2:5e:11:aa:07"}}')


def lease_value(**changes) -> str:
    raw = json.loads(FLANNELD_VALUE)
    for name, value in changes.items():
        if name in ("VNI", "VtepMAC"):
            raw["BackendData"][name] = value
        else:
            raw[name] = value
    return json.dumps(raw)


def lease_value_without(name: str) -> str:
    raw = json.loads(FLANNELD_VALUE)
    if name in ("VNI", "VtepMAC"):
        del raw["BackendData"][name]
    else:
        del raw[name]
    return json.dumps(raw)


# --- keys ---------------------------------------------------------------------------------------

def test_keys_use_flannels_layout():
    assert config_key(DEFAULT_PREFIX) == "/coreos.com/network/config"
    assert subnets_prefix(DEFAULT_PREFIX) == "/coreos.com/network/subnets/"
    assert subnet_key(DEFAULT_PREFIX, IPv4Network("10.244.3.0/24")) == "/coreos.com/network/subnets/10.244.3.0-24"


def test_trailing_slash_on_prefix_is_ignored():
    assert config_key("/ovl/net/") == "/ovl/net/config"
    assert subnet_key("/ovl/net/", IPv4Network("10.0.0.0/30")) == "/ovl/net/subnets/10.0.0.0-30"
    assert parse_subnet_key("/ovl/net/subnets/10.0.0.0-30", "/ovl/net/") == IPv4Network("10.0.0.0/30")


@pytest.mark.parametrize("subnet", ["10.244.3.0/24", "10.0.0.0/8", "192.168.7.28/30", "0.0.0.0/0",
                                    "255.255.255.255/32"])
def test_subnet_key_round_trips(subnet):
    network = IPv4Network(subnet)
    key = subnet_key(DEFAULT_PREFIX, network)
    assert parse_subnet_key(key, DEFAULT_PREFIX) == network


@pytest.mark.parametrize("key", [
    "/coreos.com/network/config",                     # not under subnets/
    "/other/network/subnets/10.244.3.0-24",           # another prefix
    "/coreos.com/network/subnets/",
    "/coreos.com/network/subnets/10.244.3.0",
    "/coreos.com/network/subnets/10.244.3.0/24",
    "/coreos.com/network/subnets/10.244.3.0_24",
    "/coreos.com/network/subnets/10.244.3.1-24",      # host bits set
    "/coreos.com/network/subnets/10.244.3.0-33",
    "/coreos.com/network/subnets/10.244.3.0-024",
    "/coreos.com/network/subnets/10.0.0.0-08",        # flannel never writes a padded length
    "/coreos.com/network/subnets/010.244.3.0-24",     # nor a padded octet
    "/coreos.com/network/subnets/256.244.3.0-24",
    "/coreos.com/network/subnets/10.244.3.0-24\n",    # a stray newline must not slip through
    "/coreos.com/network/subnets/ 10.244.3.0-24",
    "/coreos.com/network/subnets/10.244.3.0-24/x",
    "/coreos.com/network/subnets/١٠.244.3.0-24",      # non-ASCII digits
    "/coreos.com/network/subnets/fd00::-64",
])
def test_bad_subnet_key_is_refused(key):
    with pytest.raises(LeaseParseError):
        parse_subnet_key(key, DEFAULT_PREFIX)


# --- lease values ------------------------------------------------------------------------------

def test_parses_flanneld_lease_value():
    assert parse_lease_value(FLANNELD_VALUE) == LeaseAttrs(IPv4Address("198.18.0.3"), 1, "c6:d2:5e:11:aa:07")
    assert parse_lease_value(FLANNELD_VALUE.encode()) == parse_lease_value(FLANNELD_VALUE)


def test_to_json_writes_flanneld_bytes():
    attrs = LeaseAttrs(IPv4Address("198.18.0.3"), 1, "c6:d2:5e:11:aa:07")
    assert attrs.to_json() == FLANNELD_VALUE
    assert parse_lease_value(attrs.to_json()) == attrs


def test_extra_fields_are_tolerated():
    raw = json.loads(FLANNELD_VALUE)
    raw["PublicIPv6"] = "fd00::3"
    raw["FutureField"] = {"anything": [1, 2]}
    raw["BackendData"]["FutureBackendField"] = True
    assert parse_lease_value(json.dumps(raw)).public_ip == IPv4Address("198.18.0.3")


def test_mac_is_normalised_to_lower_case():
    assert parse_lease_value(lease_value(VtepMAC="C6:D2:5E:11:AA:07")).vtep_mac == "c6:d2:5e:11:aa:07"


def test_missing_vni_means_flannels_default():
    assert parse_lease_value(lease_value_without("VNI")).vni == 1


@pytest.mark.parametrize("value", [
    "", "not json", "[]", "null", '"198.18.0.3"', b"\xff\xfe", "[" * 100_000,
    lease_value(BackendType="host-gw"),
    lease_value(BackendType=None),
    lease_value_without("BackendType"),
    lease_value_without("PublicIP"),
    lease_value(PublicIP="198.18.0"),
    lease_value(PublicIP="fd00::3"),
    lease_value(PublicIP=None),
    lease_value(PublicIP=3_323_068_419),        # 198.18.0.3 as a number: flannel writes a string
    lease_value(PublicIP=["198.18.0.3"]),
    lease_value_without("BackendData"),
    lease_value(BackendData=None),
    lease_value(BackendData=[1, "c6:d2:5e:11:aa:07"]),
    lease_value(VNI=0),
    lease_value(VNI=1 << 24),
    lease_value(VNI="1"),
    lease_value(VNI=True),
    lease_value(VNI=1.0),
    lease_value_without("VtepMAC"),
    lease_value(VtepMAC=None),
    lease_value(VtepMAC="c6:d2:5e:11:aa"),
    lease_value(VtepMAC="c6d25e11aa07"),
    lease_value(VtepMAC="c6-d2-5e-11-aa-07"),
    lease_value(VtepMAC="g6:d2:5e:11:aa:07"),
    lease_value(VtepMAC="c6:d2:5e:11:aa:07\n"),  # would reach the kernel as a bad lladdr
    lease_value(VtepMAC=" c6:d2:5e:11:aa:07"),
    # The kernel refuses these as VXLAN FDB entries; one would fail every host's programming.
    lease_value(VtepMAC="01:00:5e:00:00:01"),
    lease_value(VtepMAC="ff:ff:ff:ff:ff:ff"),
    lease_value(VtepMAC="00:00:00:00:00:00"),
    lease_value(VtepMAC="C7:D2:5E:11:AA:07"),    # multicast bit, upper case
    # Not an address a host's VXLAN packets can come from or go to.
    lease_value(PublicIP="0.0.0.0"),
    lease_value(PublicIP="127.0.0.1"),
    lease_value(PublicIP="224.0.0.1"),
    lease_value(PublicIP="255.255.255.255"),
])
def test_bad_lease_value_is_refused(value):
    with pytest.raises(LeaseParseError):
        parse_lease_value(value)


# --- choose_subnet ------------------------------------------------------------------------------

CONFIG = parse_config('{"Network": "10.244.0.0/16", "SubnetMin": "10.244.1.0", "SubnetMax": "10.244.20.0"}')


def nets(*texts: str) -> list[IPv4Network]:
    return [IPv4Network(text) for text in texts]


def test_prefers_previous_subnet_when_free():
    for seed in range(20):
        assert choose_subnet(CONFIG, taken=nets("10.244.1.0/24"), preferred=nets("10.244.9.0/24"),
                             rng=random.Random(seed)) == IPv4Network("10.244.9.0/24")


def test_first_usable_preferred_subnet_wins():
    chosen = choose_subnet(CONFIG, taken=nets("10.244.9.0/24"),
                           preferred=nets("10.244.9.0/24", "10.244.30.0/24", "10.244.9.0/25", "10.244.12.0/24"))
    assert chosen == IPv4Network("10.244.12.0/24")


@pytest.mark.parametrize("preferred", [
    "10.244.9.0/24",    # taken by another host
    "10.244.0.0/24",    # below SubnetMin
    "10.244.21.0/24",   # above SubnetMax
    "10.245.9.0/24",    # outside the network
    "10.244.9.0/25",    # wrong length (the config changed)
    "10.244.8.0/23",
])
def test_unusable_preferred_subnet_is_ignored(preferred):
    taken = nets("10.244.9.0/24")
    for seed in range(20):
        chosen = choose_subnet(CONFIG, taken, preferred=nets(preferred), rng=random.Random(seed))
        assert chosen != IPv4Network(preferred)
        assert CONFIG.holds(chosen) and chosen not in taken


def test_preferred_subnet_overlapping_a_lease_is_ignored():
    # A lease left by an older config with a longer SubnetLen still owns part of the /24.
    taken = nets("10.244.9.128/25")
    chosen = choose_subnet(CONFIG, taken, preferred=nets("10.244.9.0/24"), rng=random.Random(1))
    assert not chosen.overlaps(IPv4Network("10.244.9.128/25"))


def test_never_returns_a_taken_subnet():
    taken = [CONFIG.subnet_at(i) for i in range(CONFIG.subnet_count) if i != 13]
    for seed in range(50):
        assert choose_subnet(CONFIG, taken, rng=random.Random(seed)) == CONFIG.subnet_at(13)


@pytest.mark.parametrize("taken", [
    ["10.244.0.0/19"],                           # one lease wider than ours covers the whole range
    ["10.244.0.0/20", "10.244.16.0/22", "10.244.20.0/23"],
    [f"10.244.{i}.{j}/26" for i in range(1, 21) for j in (0, 64, 128, 192) if (i, j) != (7, 64)],  # 3/4 of 10.244.7.0/24
])
def test_overlapping_leases_of_another_length_count_as_taken(taken):
    # flannel (allocateSubnet) skips every candidate that overlaps any lease, whatever its length:
    # here every /24 from SubnetMin to SubnetMax is at least partly leased.
    with pytest.raises(SubnetsExhausted):
        choose_subnet(CONFIG, nets(*taken))


def test_partly_overlapped_subnets_are_skipped():
    taken = nets("10.244.0.0/20", "10.244.16.0/23", "10.244.19.64/26")
    chosen = {choose_subnet(CONFIG, taken, rng=random.Random(seed)) for seed in range(50)}
    assert chosen == {IPv4Network("10.244.18.0/24"), IPv4Network("10.244.20.0/24")}


def test_spreads_at_random_over_the_first_free_subnets():
    taken = nets("10.244.1.0/24", "10.244.3.0/24")
    rng = random.Random(7)
    counts = Counter(choose_subnet(CONFIG, taken, rng=rng, spread=5) for _ in range(500))
    first_five_free = nets("10.244.2.0/24", "10.244.4.0/24", "10.244.5.0/24", "10.244.6.0/24", "10.244.7.0/24")
    assert set(counts) == set(first_five_free)
    # Each of five should get about 100 of 500 draws; 40 is far outside what chance produces.
    assert min(counts.values()) > 40


def test_default_spread_is_flannels_hundred():
    config = parse_config('{"Network": "10.0.0.0/8"}')
    free_limit = config.subnet_at(100)
    rng = random.Random(3)
    chosen = [choose_subnet(config, [], rng=rng) for _ in range(300)]
    assert all(c.network_address < free_limit.network_address for c in chosen)
    assert len(set(chosen)) > 50


def test_uses_module_random_without_rng():
    assert CONFIG.holds(choose_subnet(CONFIG, nets("10.244.1.0/24")))


def test_exhausted_when_full_with_a_clear_message():
    taken = [CONFIG.subnet_at(i) for i in range(CONFIG.subnet_count)]
    with pytest.raises(SubnetsExhausted) as caught:
        choose_subnet(CONFIG, taken, preferred=nets("10.244.5.0/24"))
    message = str(caught.value)
    for part in ("20", "/24", "10.244.1.0", "10.244.20.0", "10.244.0.0/16"):
        assert part in message


def test_taken_may_be_any_iterable():
    taken = (CONFIG.subnet_at(i) for i in range(CONFIG.subnet_count) if i != 2)
    assert choose_subnet(CONFIG, taken) == CONFIG.subnet_at(2)


def test_lease_defaults():
    lease = Lease(IPv4Network("10.244.3.0/24"), parse_lease_value(FLANNELD_VALUE))
    assert (lease.lease_id, lease.mod_revision) == (0, 0)
