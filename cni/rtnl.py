"""A minimal rtnetlink request socket with hand-packed messages, for the CNI service's hot path.

Design note
-----------
pyroute2's generic codec spends 0.3-0.5 ms of Python per message (building and parsing its
nested message objects), and creating an `IPRoute` costs about as much again. An ADD needs six
messages and two sockets, and the service runs many ADDs at once in threads that share the GIL:
that Python time was most of an ADD, and under a burst it turned into a convoy. The messages an
ADD, DEL or CHECK sends have fixed, simple layouts (ifinfomsg, ifaddrmsg, rtmsg and a few
attributes), so they are packed here with `struct`, as overlay.kernel does for peers.

On the CNI side only `cni.links` uses this module (its one netlink boundary): it gets raw errnos
here (`NetlinkFailure`) and translates them into domain exceptions. The daemon shares the framing
and attribute codec (overlay.kernel for its peer objects, overlay.firewall for the nftables
generation), so there is one netlink codec in the project.

- `RtnlSocket(netns_fd)` opens a NETLINK_ROUTE socket in the namespace `netns_fd` (or in the
  calling thread's own, for None). A netlink socket stays bound to the namespace it was created
  in, and setns(2) changes the calling thread's namespace only, so the thread switches in, opens
  the socket and switches straight back, before it runs anything else.
- `request()` sends one or more requests in a single sendmsg() and collects every ack; the kernel
  handles one socket's requests strictly in order, so a later request may depend on an earlier
  one (the default route on the address). Each ack's error is reported with the kernel's extended
  ack text (NETLINK_EXT_ACK) when it gives one.
- `get()` and `dump()` return raw message bodies; `parse_link()` and friends read the few
  fields we use.
"""

from __future__ import annotations

import ctypes
import errno
import os
import socket
import struct

NETLINK_ROUTE = 0
SOL_NETLINK = 270
NETLINK_CAP_ACK = 10
NETLINK_EXT_ACK = 11

NLMSG_ERROR = 2
NLMSG_DONE = 3
NLM_F_REQUEST = 0x1
NLM_F_ACK = 0x4
NLM_F_DUMP = 0x300
NLM_F_DUMP_INTR = 0x10      # in a dump's message: the table changed during the dump
DUMP_ATTEMPTS = 5
NLM_F_REPLACE = 0x100
NLM_F_EXCL = 0x200
NLM_F_CREATE = 0x400
NLM_F_CAPPED = 0x100        # in an ack: the request was not echoed back
NLM_F_ACK_TLVS = 0x200      # in an ack: extended ack attributes follow
NLMSGERR_ATTR_MSG = 1

RTM_NEWLINK, RTM_DELLINK, RTM_GETLINK = 16, 17, 18
RTM_NEWADDR, RTM_GETADDR = 20, 22
RTM_NEWROUTE, RTM_GETROUTE = 24, 26

IFLA_ADDRESS, IFLA_IFNAME, IFLA_MTU, IFLA_MASTER, IFLA_LINKINFO, IFLA_NET_NS_FD, IFLA_EXT_MASK = 1, 3, 4, 10, 18, 28, 29
IFLA_INFO_KIND, IFLA_INFO_DATA = 1, 2
VETH_INFO_PEER = 1
RTEXT_FILTER_SKIP_STATS = 0x8
IFA_ADDRESS, IFA_LOCAL = 1, 2
RTA_DST, RTA_OIF, RTA_GATEWAY, RTA_TABLE = 1, 4, 5, 15
IFF_UP = 0x1
RT_TABLE_MAIN = 254
RTPROT_STATIC = 4
RT_SCOPE_UNIVERSE = 0
RTN_UNICAST = 1
CLONE_NEWNET = 0x40000000

NLMSGHDR = struct.Struct("=IHHII")     # length, type, flags, sequence, port id
_IFINFOMSG = struct.Struct("=BxHiII")   # family, pad, type, index, flags, change
_IFADDRMSG = struct.Struct("=BBBBi")    # family, prefixlen, flags, scope, index
_RTMSG = struct.Struct("=BBBBBBBBI")    # family, dst_len, src_len, tos, table, protocol, scope, type, flags
_ATTR = struct.Struct("=HH")
_U32 = struct.Struct("=I")

_libc = ctypes.CDLL(None, use_errno=True)


class NetlinkFailure(Exception):
    """The kernel refused a request: `code` is the errno, `detail` its extended-ack text."""

    def __init__(self, code: int, detail: str = ""):
        super().__init__(f"{os.strerror(code)}{f' ({detail})' if detail else ''}")
        self.code = code
        self.detail = detail


class NamespaceFailure(Exception):
    """setns(2) into the container's namespace failed (errno in `code`)."""

    def __init__(self, code: int):
        super().__init__(os.strerror(code))
        self.code = code


# --------------------------------------------------------------------------- packing

def attr(kind: int, payload: bytes) -> bytes:
    length = 4 + len(payload)
    return _ATTR.pack(length, kind) + payload + b"\0" * (-length % 4)


def attr_u32(kind: int, value: int) -> bytes:
    return attr(kind, _U32.pack(value))


def attr_str(kind: int, value: str) -> bytes:
    return attr(kind, value.encode() + b"\0")


def mac_bytes(mac: str) -> bytes:
    return bytes.fromhex(mac.replace(":", ""))


def mac_text(mac: bytes) -> str:
    return ":".join(f"{octet:02x}" for octet in mac)


def veth_request(name: str, mac: str, mtu: int, master: int | None, peer_name: str, peer_netns_fd: int,
                 peer_mac: str) -> tuple:
    """RTM_NEWLINK creating a veth pair: this end up (and on `master`), the peer already in its
    namespace under its final name. The peer stays down: veth configures the peer before it has
    linked the pair, and opening it then fails with ENOTCONN."""
    peer = (_IFINFOMSG.pack(socket.AF_UNSPEC, 0, 0, 0, 0)
            + attr_str(IFLA_IFNAME, peer_name) + attr_u32(IFLA_NET_NS_FD, peer_netns_fd)
            + attr_u32(IFLA_MTU, mtu) + attr(IFLA_ADDRESS, mac_bytes(peer_mac)))
    linkinfo = attr(IFLA_LINKINFO, attr_str(IFLA_INFO_KIND, "veth") + attr(IFLA_INFO_DATA, attr(VETH_INFO_PEER, peer)))
    body = (_IFINFOMSG.pack(socket.AF_UNSPEC, 0, 0, IFF_UP, IFF_UP) + attr_str(IFLA_IFNAME, name)
            + attr(IFLA_ADDRESS, mac_bytes(mac)) + attr_u32(IFLA_MTU, mtu)
            + (attr_u32(IFLA_MASTER, master) if master is not None else b"") + linkinfo)
    return RTM_NEWLINK, NLM_F_CREATE | NLM_F_EXCL, body


def set_link_request(index: int, up: bool | None = None, master: int | None = None) -> tuple:
    flags, change = (IFF_UP if up else 0, IFF_UP) if up is not None else (0, 0)
    body = _IFINFOMSG.pack(socket.AF_UNSPEC, 0, index, flags, change)
    if master is not None:
        body += attr_u32(IFLA_MASTER, master)
    return RTM_NEWLINK, 0, body


def del_link_request(name: str) -> tuple:
    return RTM_DELLINK, 0, _IFINFOMSG.pack(socket.AF_UNSPEC, 0, 0, 0, 0) + attr_str(IFLA_IFNAME, name)


def replace_address_request(index: int, address: bytes, prefixlen: int) -> tuple:
    """An IPv4 address, created or replaced (IFA_LOCAL and IFA_ADDRESS, as `ip addr replace`)."""
    body = (_IFADDRMSG.pack(socket.AF_INET, prefixlen, 0, RT_SCOPE_UNIVERSE, index)
            + attr(IFA_LOCAL, address) + attr(IFA_ADDRESS, address))
    return RTM_NEWADDR, NLM_F_CREATE | NLM_F_REPLACE, body


def replace_default_route_request(gateway: bytes, oif: int) -> tuple:
    body = (_RTMSG.pack(socket.AF_INET, 0, 0, 0, RT_TABLE_MAIN, RTPROT_STATIC, RT_SCOPE_UNIVERSE, RTN_UNICAST, 0)
            + attr_u32(RTA_TABLE, RT_TABLE_MAIN) + attr(RTA_GATEWAY, gateway) + attr_u32(RTA_OIF, oif))
    return RTM_NEWROUTE, NLM_F_CREATE | NLM_F_REPLACE, body


def get_link_request(name: str) -> tuple:
    return (RTM_GETLINK, 0, _IFINFOMSG.pack(socket.AF_UNSPEC, 0, 0, 0, 0) + attr_str(IFLA_IFNAME, name)
            + attr_u32(IFLA_EXT_MASK, RTEXT_FILTER_SKIP_STATS))


# --------------------------------------------------------------------------- parsing

def attributes(body: bytes, start: int) -> dict:
    """Top-level attributes of a message body by type (nested ones stay packed)."""
    found = {}
    end = len(body)
    while start + 4 <= end:
        length, kind = _ATTR.unpack_from(body, start)
        if length < 4:
            break
        found[kind & 0x3FFF] = body[start + 4:start + length]
        start += (length + 3) & ~3
    return found


def parse_link(body: bytes) -> dict:
    """index, name, mac, mtu, up, master, kind of an RTM_NEWLINK body."""
    _family, _type, index, flags, _change = _IFINFOMSG.unpack_from(body)
    attrs = attributes(body, _IFINFOMSG.size)
    kind = None
    if IFLA_LINKINFO in attrs:
        raw = attributes(attrs[IFLA_LINKINFO], 0).get(IFLA_INFO_KIND)
        kind = raw.rstrip(b"\0").decode() if raw is not None else None
    master = attrs.get(IFLA_MASTER)
    return {
        "index": index,
        "name": attrs[IFLA_IFNAME].rstrip(b"\0").decode(),
        "mac": mac_text(attrs[IFLA_ADDRESS]) if IFLA_ADDRESS in attrs else "",
        "mtu": _U32.unpack(attrs[IFLA_MTU])[0] if IFLA_MTU in attrs else 0,
        "up": bool(flags & IFF_UP),
        "master": _U32.unpack(master)[0] if master is not None else None,
        "kind": kind,
    }


def parse_address(body: bytes) -> tuple:
    """(index, packed address, prefixlen) of an RTM_NEWADDR body (IFA_LOCAL, else IFA_ADDRESS)."""
    _family, prefixlen, _flags, _scope, index = _IFADDRMSG.unpack_from(body)
    attrs = attributes(body, _IFADDRMSG.size)
    return index, attrs.get(IFA_LOCAL, attrs.get(IFA_ADDRESS)), prefixlen


def parse_route(body: bytes) -> dict:
    """dst_len, table, protocol, dst, gateway, oif of an RTM_NEWROUTE body (packed addresses)."""
    _family, dst_len, _src, _tos, table, protocol, _scope, _type, _flags = _RTMSG.unpack_from(body)
    attrs = attributes(body, _RTMSG.size)
    if RTA_TABLE in attrs:
        table = _U32.unpack(attrs[RTA_TABLE])[0]
    oif = attrs.get(RTA_OIF)
    return {"dst_len": dst_len, "table": table, "protocol": protocol, "dst": attrs.get(RTA_DST),
            "gateway": attrs.get(RTA_GATEWAY), "oif": _U32.unpack(oif)[0] if oif is not None else None}


def ext_ack_text(tlvs: bytes) -> str:
    """The kernel's own explanation in an extended ack's attributes, or ""."""
    raw = attributes(tlvs, 0).get(NLMSGERR_ATTR_MSG)
    return raw.split(b"\0", 1)[0].decode(errors="replace") if raw else ""


def messages(data: bytes):
    """(offset, length, type, flags, sequence) of each netlink message in one datagram."""
    offset = 0
    while offset + NLMSGHDR.size <= len(data):
        length, kind, flags, sequence, _ = NLMSGHDR.unpack_from(data, offset)
        if length < NLMSGHDR.size:
            return
        yield offset, length, kind, flags, sequence
        offset += (length + 3) & ~3


# --------------------------------------------------------------------------- the socket

def _setns(fd: int) -> None:
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        raise NamespaceFailure(ctypes.get_errno())


def in_netns(netns_fd: int | None, make):
    """make() run with the calling thread in the namespace `netns_fd` (None: where it is)."""
    if netns_fd is None:
        return make()
    home = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    try:
        _setns(netns_fd)
        try:
            return make()
        finally:
            # If this fails the thread is in the wrong namespace for good: let it die loudly
            # (the service runs each request on a thread of its own).
            _setns(home)
    finally:
        os.close(home)


def _new_socket() -> socket.socket:
    sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, NETLINK_ROUTE)
    try:
        sock.setsockopt(SOL_NETLINK, NETLINK_CAP_ACK, 1)
        sock.setsockopt(SOL_NETLINK, NETLINK_EXT_ACK, 1)
        sock.bind((0, 0))
        sock.connect((0, 0))    # the kernel: lets send() go without an address each time
        sock.settimeout(30.0)   # an answer that never comes must not hold a service thread forever
    except BaseException:
        sock.close()
        raise
    return sock


class RtnlSocket:
    """One NETLINK_ROUTE request socket in one namespace (see the design note)."""

    def __init__(self, netns_fd: int | None = None):
        self.sock = in_netns(netns_fd, _new_socket)
        self._sequence = 0

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> "RtnlSocket":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def _send(self, requests, extra_flags: int) -> dict:
        """Send (type, flags, body) requests in one write; {sequence: index in requests}."""
        pending = {}
        chunks = []
        for position, (kind, flags, body) in enumerate(requests):
            self._sequence = (self._sequence + 1) & 0xFFFFFFFF or 1
            pending[self._sequence] = position
            chunks.append(NLMSGHDR.pack(NLMSGHDR.size + len(body), kind, NLM_F_REQUEST | extra_flags | flags,
                                         self._sequence, 0) + body)
        self.sock.sendall(b"".join(chunks))
        return pending

    def request(self, *requests) -> list:
        """Send the requests at once; a list of (errno, detail) in their order, 0 for success.
        Every request is answered (a failed one does not stop those after it)."""
        pending = self._send(requests, NLM_F_ACK)
        results = [None] * len(requests)
        while pending:
            data = self.sock.recv(65536)
            for offset, length, kind, flags, sequence in messages(data):
                if kind == NLMSG_ERROR and sequence in pending:
                    code = -struct.unpack_from("=i", data, offset + 16)[0]
                    detail = ""
                    if code and flags & NLM_F_ACK_TLVS:
                        echoed = NLMSGHDR.size if flags & NLM_F_CAPPED else _U32.unpack_from(data, offset + 20)[0]
                        detail = ext_ack_text(data[offset + 20 + echoed:offset + length])
                    results[pending.pop(sequence)] = (code, detail)
        return results

    def check(self, *requests) -> None:
        """request(), raising NetlinkFailure for the first refused one."""
        for code, detail in self.request(*requests):
            if code:
                raise NetlinkFailure(code, detail)

    def get(self, request) -> bytes:
        """The body of the one answer to a GET request; NetlinkFailure when refused."""
        kind, flags, body = request
        (sequence,) = self._send(((kind, flags, body),), 0)
        while True:
            data = self.sock.recv(65536)
            for offset, length, kind, _flags, seq in messages(data):
                if seq == sequence:
                    if kind == NLMSG_ERROR:
                        code = -struct.unpack_from("=i", data, offset + 16)[0]
                        raise NetlinkFailure(code or 0)
                    return data[offset + 16:offset + length]

    def dump(self, kind: int, header: bytes) -> list:
        """Bodies of every message a dump request of `kind` answers with. A dump the kernel
        marks interrupted (the table changed while it was read: on a busy host, other ADDs) may
        lack entries, and is read again."""
        for _attempt in range(DUMP_ATTEMPTS - 1):
            bodies, interrupted = self._dump_once(kind, header)
            if not interrupted:
                return bodies
        bodies, interrupted = self._dump_once(kind, header)
        if interrupted:
            raise NetlinkFailure(errno.EBUSY, f"the dump was interrupted {DUMP_ATTEMPTS} times")
        return bodies

    def _dump_once(self, kind: int, header: bytes) -> tuple:
        (sequence,) = self._send(((kind, NLM_F_DUMP, header),), 0)
        bodies = []
        interrupted = False
        while True:
            data = self.sock.recv(1 << 20)
            for offset, length, answer, flags, seq in messages(data):
                if seq == sequence:
                    interrupted = interrupted or bool(flags & NLM_F_DUMP_INTR)
                    if answer == NLMSG_DONE:
                        # Its payload is the dump's own error, if it failed part way.
                        code = -struct.unpack_from("=i", data, offset + 16)[0] if length >= 20 else 0
                        if code:
                            raise NetlinkFailure(code)
                        return bodies, interrupted
                    if answer == NLMSG_ERROR:
                        code = -struct.unpack_from("=i", data, offset + 16)[0]
                        if code:
                            raise NetlinkFailure(code)
                    else:
                        bodies.append(data[offset + 16:offset + length])


def link_dump_header() -> bytes:
    return _IFINFOMSG.pack(socket.AF_UNSPEC, 0, 0, 0, 0) + attr_u32(IFLA_EXT_MASK, RTEXT_FILTER_SKIP_STATS)


def address_dump_header() -> bytes:
    return _IFADDRMSG.pack(socket.AF_INET, 0, 0, 0, 0)


def route_dump_header() -> bytes:
    return _RTMSG.pack(socket.AF_INET, 0, 0, 0, 0, 0, 0, 0, 0)
