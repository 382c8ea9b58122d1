"""Inputs the dataplane's property tests share: the configs and underlays they choose from, and
the host whose desired state they compute."""

from ipaddress import IPv4Address, IPv4Network

from overlay.config import parse_config
from overlay.dataplane import Underlay, vtep_mac
from overlay.lease import Lease, LeaseAttrs

CONFIGS = [parse_config('{"Network": "10.0.0.0/16", "SubnetLen": 24, "Backend": {"Type": "vxlan"}}'),
           parse_config('{"Network": "10.0.0.0/16", "SubnetLen": 24, '
                        '"Backend": {"Type": "vxlan", "DirectRouting": true}}')]
UNDERLAYS = [Underlay("eth0", IPv4Address("198.18.0.1"), 1500, IPv4Network("198.18.0.0/28")),
             Underlay("eth1", IPv4Address("198.18.0.1"), 9000, None)]
# Our own lease: 198.18.0.1, whose VTEP MAC is the first of each test's MAC pool.
OWN = Lease(IPv4Network("10.0.1.0/24"), LeaseAttrs(IPv4Address("198.18.0.1"), 1, vtep_mac(IPv4Address("198.18.0.1"), 1)),
            7, 1)
