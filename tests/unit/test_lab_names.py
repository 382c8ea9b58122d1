"""Pure parts of the lab: names that fit the interface limit, and the choice of underlay /24."""

from ipaddress import IPv4Address, IPv4Network

import pytest

from overlay.lab import LabError, first_free_underlay, validate_name


@pytest.mark.parametrize("name", ["lab", "demo", "t1x9", "a"])
def test_short_lowercase_names_are_accepted(name):
    assert validate_name(name) == name
    assert len(f"ovl-{name}-h243") <= 15   # the longest link a lab of that name makes


@pytest.mark.parametrize("name", ["", "labs1", "Lab", "1ab", "a-b", "a_b", "ovl-x"])
def test_names_that_could_clash_or_overflow_are_refused(name):
    with pytest.raises(LabError, match="lab name"):
        validate_name(name)


def test_first_free_underlay_skips_what_is_routed_or_claimed():
    assert first_free_underlay([]) == IPv4Network("198.18.0.0/24")
    taken = [IPv4Network("198.18.0.0/24"), IPv4Network("198.18.1.7/32"), IPv4Network("10.0.0.0/8")]
    assert first_free_underlay(taken) == IPv4Network("198.18.2.0/24")
    # A wide route over the start of the pool pushes the lab past it.
    assert first_free_underlay([IPv4Network("198.18.0.0/16")]) == IPv4Network("198.19.0.0/24")


def test_a_full_pool_is_a_clear_error():
    with pytest.raises(LabError, match="in use"):
        first_free_underlay([IPv4Network("198.18.0.0/15")])


def test_underlay_mac_is_unicast_local_and_follows_the_address():
    from overlay.lab import underlay_mac
    mac = underlay_mac(IPv4Address("198.18.3.11"))
    assert mac == "02:00:c6:12:03:0b"
    assert underlay_mac(IPv4Address("198.18.3.11")) == mac != underlay_mac(IPv4Address("198.18.3.12"))


def test_fake_peer_addresses_are_never_a_labs_underlay():
    from overlay.lab import FAKE_PEER_POOL, UNDERLAY_POOL
    assert FAKE_PEER_POOL.subnet_of(UNDERLAY_POOL)
    everything_before = [IPv4Network("198.18.0.0/16"), IPv4Network("198.19.0.0/17"), IPv4Network("198.19.128.0/18"),
                         IPv4Network("198.19.192.0/19")]
    with pytest.raises(LabError):
        first_free_underlay(everything_before)   # only the fake peers' /19 is left, and it is not for labs
