"""The netlink read path's shortcuts give what the plain parse gives (pure: no kernel needed).

Messages are built as the kernel writes them (neigh_fill_info, vxlan_fdb_info: ndmsg, then
NDA_DST and NDA_LLADDR, NDA_PROBES, NDA_CACHEINFO with ages that change every read), and in
other layouts the shortcuts must leave to the plain parse.
"""

from __future__ import annotations

import random
import socket
import struct
from ipaddress import IPv4Address

import pytest

from cni.rtnl import attr
from overlay.dataplane import FdbEntry, Neighbour
from overlay.kernel import (AF_BRIDGE, NDA_DST, NDA_LLADDR, NTF_SELF, NUD_NOARP, NUD_PERMANENT, _NDMSG,
                            _ParseCache, _fdb_entry_from, _fdb_key, _neighbour_from, _neighbour_key,
                            _our_fdb_entry_from, _our_neighbour_from)

NDA_CACHEINFO, NDA_PROBES = 3, 4


def cacheinfo(rng: random.Random) -> bytes:
    return attr(NDA_CACHEINFO, struct.pack("=IIII", *(rng.randrange(1 << 20) for _ in range(4))))


def neighbour_body(rng, index, ip, mac, state=NUD_PERMANENT, family=socket.AF_INET, order="usual") -> bytes:
    dst, lladdr = attr(NDA_DST, ip.packed), attr(NDA_LLADDR, mac)
    attrs = dst + lladdr if order == "usual" else lladdr + dst
    return _NDMSG.pack(family, index, state, 0, 1) + attrs + attr(NDA_PROBES, bytes(4)) + cacheinfo(rng)


def fdb_body(rng, index, mac, ip, flags=NTF_SELF, order="usual") -> bytes:
    dst, lladdr = attr(NDA_DST, ip.packed), attr(NDA_LLADDR, mac)
    attrs = lladdr + dst if order == "usual" else dst + lladdr
    return _NDMSG.pack(AF_BRIDGE, index, NUD_PERMANENT | NUD_NOARP, flags, 1) + attrs + cacheinfo(rng)


def plain_neighbour(body: bytes, index: int):
    family, ifindex, state, _, _ = _NDMSG.unpack_from(body)
    if family != socket.AF_INET or ifindex != index or not state & NUD_PERMANENT:
        return None
    return _neighbour_from(body)


def plain_fdb(body: bytes, index: int):
    family, ifindex, _, flags, _ = _NDMSG.unpack_from(body)
    if family != AF_BRIDGE or ifindex != index or not flags & NTF_SELF:
        return None
    return _fdb_entry_from(body)


@pytest.mark.parametrize("seed", range(50))
def test_shortcut_parse_and_keys_agree_with_the_plain_parse(seed):
    rng = random.Random(seed)
    ip = IPv4Address(rng.randrange(1 << 32))
    mac = bytes(rng.randrange(256) for _ in range(6)) if rng.random() < 0.9 else bytes(6)
    index = rng.choice([4, 5])
    for order in ("usual", "other"):
        body = neighbour_body(rng, rng.choice([4, 5]), ip, mac, rng.choice([NUD_PERMANENT, 0x02]),
                              rng.choice([socket.AF_INET, AF_BRIDGE]), order)
        assert _our_neighbour_from(body, index) == plain_neighbour(body, index)
        again = body[:-16] + bytes(16)   # the same neighbour, read later: other ages
        assert (_neighbour_key(body) == _neighbour_key(again)) == (order == "usual")
        body = fdb_body(rng, rng.choice([4, 5]), mac, ip, rng.choice([NTF_SELF, 0]), order)
        assert _our_fdb_entry_from(body, index) == plain_fdb(body, index)
        again = body[:-16] + bytes(16)
        assert (_fdb_key(body) == _fdb_key(again)) == (order == "usual")
    assert _our_neighbour_from(neighbour_body(rng, 4, ip, mac), 4) == Neighbour(ip, mac.hex(":"))
    if mac != bytes(6):
        assert _our_fdb_entry_from(fdb_body(rng, 4, mac, ip), 4) == FdbEntry(mac.hex(":"), ip)


def test_the_parse_cache_parses_each_message_once_and_interns_to_known_values():
    rng = random.Random(1)
    parsed = []

    def parse(body):
        parsed.append(body)
        return _our_neighbour_from(body, 4)

    neighbours = [Neighbour(IPv4Address(f"10.0.{i}.0"), f"02:00:00:00:00:{i:02x}") for i in range(5)]
    bodies = [neighbour_body(rng, 4, n.ip, bytes.fromhex(n.mac.replace(":", ""))) for n in neighbours]
    cache = _ParseCache()
    known = frozenset(neighbours)
    first = cache.read(bodies, _neighbour_key, parse, known)
    assert first == known and len(parsed) == 5
    assert all(any(value is item for item in known) for value in first)   # the very objects of known
    # Read again, ages changed: nothing parsed, the same set returned.
    later = [body[:-16] + bytes(16) for body in bodies]
    assert cache.read(later, _neighbour_key, parse, known) is first and len(parsed) == 5
    # One gone, one new: only the new one is parsed.
    newcomer = neighbour_body(rng, 4, IPv4Address("10.0.9.0"), bytes.fromhex("020000000009"))
    third = cache.read(later[1:] + [newcomer], _neighbour_key, parse, known)
    assert len(parsed) == 6
    assert third == (known - {neighbours[0]}) | {Neighbour(IPv4Address("10.0.9.0"), "02:00:00:00:00:09")}
    cache.forget("other device")
    cache.read(later, _neighbour_key, parse, None)
    assert len(parsed) == 11
