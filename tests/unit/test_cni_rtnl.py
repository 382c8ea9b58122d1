"""The hand-packed rtnetlink messages of the CNI hot path (cni.rtnl), checked byte by byte
against the kernel's layouts without a kernel (no root): what we pack parses back to what we
meant, and the parsers read messages laid out as the kernel sends them."""

import socket
import struct

from cni import rtnl


def nested(body: bytes, *path: int) -> bytes:
    """The payload of a nested attribute, following attribute types down from a body."""
    for kind in path:
        body = rtnl.attributes(body, 0)[kind]
    return body


def test_attributes_are_aligned_and_read_back():
    packed = rtnl.attr_str(rtnl.IFLA_IFNAME, "eth0") + rtnl.attr_u32(rtnl.IFLA_MTU, 1450) + rtnl.attr(99, b"\x01")
    assert len(packed) % 4 == 0
    attrs = rtnl.attributes(packed, 0)
    assert attrs[rtnl.IFLA_IFNAME] == b"eth0\0"
    assert struct.unpack("=I", attrs[rtnl.IFLA_MTU]) == (1450,)
    assert attrs[99] == b"\x01"


def test_veth_request_carries_both_ends():
    kind, flags, body = rtnl.veth_request("ovlvabc", "0a:59:0a:f4:03:02", 1450, 7, "eth0", 42, "0a:58:0a:f4:03:02")
    assert kind == rtnl.RTM_NEWLINK and flags == rtnl.NLM_F_CREATE | rtnl.NLM_F_EXCL
    family, _type, index, ifi_flags, change = struct.unpack_from("=BxHiII", body)
    assert (family, index, ifi_flags & rtnl.IFF_UP, change & rtnl.IFF_UP) == (socket.AF_UNSPEC, 0, 1, 1)
    attrs = rtnl.attributes(body, 16)
    assert attrs[rtnl.IFLA_IFNAME] == b"ovlvabc\0"
    assert attrs[rtnl.IFLA_ADDRESS] == bytes.fromhex("0a590af40302")
    assert struct.unpack("=I", attrs[rtnl.IFLA_MASTER]) == (7,)
    assert nested(attrs[rtnl.IFLA_LINKINFO], rtnl.IFLA_INFO_KIND) == b"veth\0"
    peer = nested(attrs[rtnl.IFLA_LINKINFO], rtnl.IFLA_INFO_DATA, rtnl.VETH_INFO_PEER)
    # The peer is created down: veth cannot open it before the pair is linked (ENOTCONN).
    assert struct.unpack_from("=BxHiII", peer)[3] == 0
    peer_attrs = rtnl.attributes(peer, 16)
    assert peer_attrs[rtnl.IFLA_IFNAME] == b"eth0\0"
    assert struct.unpack("=I", peer_attrs[rtnl.IFLA_NET_NS_FD]) == (42,)
    assert struct.unpack("=I", peer_attrs[rtnl.IFLA_MTU]) == (1450,)
    assert peer_attrs[rtnl.IFLA_ADDRESS] == bytes.fromhex("0a580af40302")
    # Without a bridge, no IFLA_MASTER at all (the moved-workload veth stays off the bridge).
    _, _, body = rtnl.veth_request("ovlvabc", "0a:59:0a:f4:03:02", 1450, None, "eth0", 42, "0a:58:0a:f4:03:02")
    assert rtnl.IFLA_MASTER not in rtnl.attributes(body, 16)


def test_container_side_requests():
    kind, flags, body = rtnl.replace_address_request(5, bytes([10, 244, 3, 2]), 24)
    assert kind == rtnl.RTM_NEWADDR and flags & rtnl.NLM_F_REPLACE and flags & rtnl.NLM_F_CREATE
    assert rtnl.parse_address(body) == (5, bytes([10, 244, 3, 2]), 24)
    kind, flags, body = rtnl.replace_default_route_request(bytes([10, 244, 3, 1]), 5)
    assert kind == rtnl.RTM_NEWROUTE and flags & rtnl.NLM_F_REPLACE
    route = rtnl.parse_route(body)
    assert (route["dst_len"], route["table"], route["gateway"], route["oif"], route["dst"]) == \
        (0, rtnl.RT_TABLE_MAIN, bytes([10, 244, 3, 1]), 5, None)
    kind, flags, body = rtnl.set_link_request(5, up=True, master=3)
    assert kind == rtnl.RTM_NEWLINK and flags == 0
    assert struct.unpack_from("=BxHiII", body)[2:] == (5, rtnl.IFF_UP, rtnl.IFF_UP)
    assert struct.unpack("=I", rtnl.attributes(body, 16)[rtnl.IFLA_MASTER]) == (3,)
    kind, _, body = rtnl.del_link_request("ovlvabc")
    assert kind == rtnl.RTM_DELLINK and rtnl.attributes(body, 16)[rtnl.IFLA_IFNAME] == b"ovlvabc\0"


def test_parse_link_reads_a_kernel_layout():
    body = (struct.pack("=BxHiII", socket.AF_UNSPEC, 1, 9, rtnl.IFF_UP | 0x1000, 0)
            + rtnl.attr_str(rtnl.IFLA_IFNAME, "eth0") + rtnl.attr(rtnl.IFLA_ADDRESS, bytes.fromhex("0a580af40302"))
            + rtnl.attr_u32(rtnl.IFLA_MTU, 1450) + rtnl.attr_u32(rtnl.IFLA_MASTER, 4)
            + rtnl.attr(rtnl.IFLA_LINKINFO, rtnl.attr_str(rtnl.IFLA_INFO_KIND, "veth")))
    assert rtnl.parse_link(body) == {"index": 9, "name": "eth0", "mac": "0a:58:0a:f4:03:02", "mtu": 1450,
                                     "up": True, "master": 4, "kind": "veth"}
    bare = struct.pack("=BxHiII", socket.AF_UNSPEC, 1, 1, 0, 0) + rtnl.attr_str(rtnl.IFLA_IFNAME, "lo")
    assert rtnl.parse_link(bare)["master"] is None and rtnl.parse_link(bare)["kind"] is None


def test_ext_ack_text():
    tlvs = rtnl.attr(rtnl.NLMSGERR_ATTR_MSG, b"Nexthop device is not up\0")
    assert rtnl.ext_ack_text(tlvs) == "Nexthop device is not up"
    assert rtnl.ext_ack_text(b"") == ""


# --- the request/answer loop, against a fake kernel --------------------------------------------

class FakeKernel:
    """Stands in for the netlink socket: answers each request through `respond(type, seq)`,
    which returns a list of datagrams."""

    def __init__(self, respond):
        self.respond = respond
        self.pending = []
        self.requests = []

    def sendall(self, data):
        offset = 0
        while offset < len(data):
            length, kind, flags, seq, _ = struct.unpack_from("=IHHII", data, offset)
            self.requests.append((kind, flags, seq))
            self.pending.extend(self.respond(kind, seq))
            offset += (length + 3) & ~3

    def recv(self, size):
        return self.pending.pop(0)


def message(kind, seq, body=b"", flags=0):
    return struct.pack("=IHHII", 16 + len(body), kind, flags, seq, 0) + body


def ack(seq, code=0, text=""):
    echoed = struct.pack("=IHHII", 16, 0, 0, seq, 0)
    tlvs = rtnl.attr(rtnl.NLMSGERR_ATTR_MSG, text.encode() + b"\0") if text else b""
    flags = rtnl.NLM_F_CAPPED | (rtnl.NLM_F_ACK_TLVS if tlvs else 0)
    return message(rtnl.NLMSG_ERROR, seq, struct.pack("=i", -code) + echoed + tlvs, flags)


def fake_socket(respond):
    sock = object.__new__(rtnl.RtnlSocket)
    sock.sock = FakeKernel(respond)
    sock._sequence = 0
    return sock


def test_request_matches_acks_to_requests_and_keeps_the_kernel_explanation():
    import errno
    # The kernel acks the second request first: results still come back in request order.
    sock = fake_socket(lambda kind, seq: [] if seq == 1 else
                       [ack(2, errno.ENETDOWN, "Nexthop device is not up") + ack(1)])
    results = sock.request(rtnl.del_link_request("a"), rtnl.del_link_request("b"))
    assert results == [(0, ""), (errno.ENETDOWN, "Nexthop device is not up")]
    assert all(flags & rtnl.NLM_F_ACK for _, flags, _ in sock.sock.requests)


def test_an_interrupted_dump_is_read_again():
    link = struct.pack("=BxHiII", 0, 1, 3, 1, 0) + rtnl.attr_str(rtnl.IFLA_IFNAME, "eth0")
    answers = []

    def respond(kind, seq):
        answers.append(seq)
        flags = rtnl.NLM_F_DUMP_INTR if len(answers) == 1 else 0
        return [message(rtnl.RTM_NEWLINK, seq, link, flags | 0x2), message(rtnl.NLMSG_DONE, seq, struct.pack("=i", 0))]
    sock = fake_socket(respond)
    bodies = sock.dump(rtnl.RTM_GETLINK, rtnl.link_dump_header())
    assert len(answers) == 2 and [rtnl.parse_link(b)["name"] for b in bodies] == ["eth0"]


def test_a_get_of_a_missing_link_raises_its_errno():
    import errno
    import pytest
    sock = fake_socket(lambda kind, seq: [ack(seq, errno.ENODEV)])
    with pytest.raises(rtnl.NetlinkFailure) as failure:
        sock.get(rtnl.get_link_request("nope"))
    assert failure.value.code == errno.ENODEV
