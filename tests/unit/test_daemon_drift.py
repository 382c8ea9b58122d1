"""Unit tests of how the daemon tells the echo of its own changes from drift."""

from __future__ import annotations

from ipaddress import IPv4Address, IPv4Network

from overlay.daemon import _all_as_expected
from overlay.dataplane import DataplaneState, FdbEntry, Neighbour, Route
from overlay.kernel import KernelChange

ROUTE = Route(IPv4Network("10.244.2.0/24"), IPv4Address("10.244.2.0"), "flannel.1", True)
NEIGHBOUR = Neighbour(IPv4Address("10.244.2.0"), "02:00:00:00:00:02")
FDB = FdbEntry("02:00:00:00:00:02", IPv4Address("198.18.0.12"))
EXPECTED = DataplaneState(None, frozenset({NEIGHBOUR}), frozenset({FDB}), frozenset({ROUTE}))
STALE_ROUTE = Route(IPv4Network("10.244.9.0/24"), IPv4Address("10.244.9.0"), "flannel.1", True)


def test_objects_of_the_desired_state_appearing_are_an_echo():
    assert _all_as_expected([KernelChange(True, ROUTE), KernelChange(True, NEIGHBOUR),
                             KernelChange(True, FDB)], EXPECTED)


def test_stale_objects_going_are_an_echo():
    assert _all_as_expected([KernelChange(False, STALE_ROUTE),
                             KernelChange(False, Neighbour(IPv4Address("10.244.9.0"), "")),
                             KernelChange(False, FdbEntry("02:00:00:00:00:09", IPv4Address("198.18.0.19")))],
                            EXPECTED)


def test_a_wanted_object_going_is_drift():
    assert not _all_as_expected([KernelChange(False, ROUTE)], EXPECTED)
    assert not _all_as_expected([KernelChange(False, FDB)], EXPECTED)
    # The kernel names a deleted neighbour by its address only.
    assert not _all_as_expected([KernelChange(False, Neighbour(NEIGHBOUR.ip, ""))], EXPECTED)


def test_an_unwanted_object_appearing_is_drift():
    assert not _all_as_expected([KernelChange(True, STALE_ROUTE)], EXPECTED)
    assert not _all_as_expected([KernelChange(True, Neighbour(NEIGHBOUR.ip, "02:00:00:00:00:99"))], EXPECTED)


def test_one_drifting_change_among_echoes_is_enough():
    assert not _all_as_expected([KernelChange(True, ROUTE), KernelChange(False, ROUTE)], EXPECTED)


def test_the_tracker_answers_as_the_state_it_stands_for():
    """The fast path checks events against DesiredTracker rather than a whole DataplaneState:
    same answers for the same cases."""
    from overlay.config import parse_config
    from overlay.dataplane import DesiredTracker, Underlay
    from overlay.lease import Lease, LeaseAttrs

    config = parse_config('{"Network": "10.244.0.0/16", "Backend": {"Type": "vxlan"}}')
    own = Lease(IPv4Network("10.244.1.0/24"), LeaseAttrs(IPv4Address("198.18.0.11"), 1, "02:00:00:00:00:01"))
    peer = Lease(IPv4Network("10.244.2.0/24"), LeaseAttrs(IPv4Address("198.18.0.12"), 1, "02:00:00:00:00:02"))
    tracker = DesiredTracker(own, config, Underlay("eth0", IPv4Address("198.18.0.11"), 1500), [peer])
    assert tracker.state().routes == EXPECTED.routes and tracker.state().fdb == EXPECTED.fdb
    cases = [[KernelChange(True, ROUTE), KernelChange(True, NEIGHBOUR), KernelChange(True, FDB)],
             [KernelChange(False, STALE_ROUTE), KernelChange(False, Neighbour(IPv4Address("10.244.9.0"), ""))],
             [KernelChange(False, ROUTE)], [KernelChange(False, FDB)],
             [KernelChange(False, Neighbour(NEIGHBOUR.ip, ""))], [KernelChange(True, STALE_ROUTE)],
             [KernelChange(True, Neighbour(NEIGHBOUR.ip, "02:00:00:00:00:99"))]]
    for changes in cases:
        assert _all_as_expected(changes, tracker) == _all_as_expected(changes, EXPECTED), changes
