"""Write and delete many leases in etcd fast, for the scale benchmark.

Design notes
- Thousands of fake peers must land in etcd in well under a second, or the benchmark measures
  the writer. One etcdctl process per key would take minutes; `etcdctl txn` parses its own
  quoting of the JSON values. So this talks the etcd v3 gRPC API directly through the generated
  stubs aetcd ships (the same stubs, not the same code, as overlay.etcd: the benchmark must not
  depend on the client it measures), synchronously, one Txn of up to MAX_TXN_OPS puts at a time
  (etcd's default --max-txn-ops is 128).
- Fake peers: subnet i is the i-th /24 from 10.4.0.0 up (clear of the first subnets a real
  daemon picks among), public IP i is overlay.lab.FAKE_PEER_POOL + i (198.19.224.0/19: in the
  benchmark range, never a lab's underlay; the FDB entries only name it), VTEP MAC 0a:bb:<i as 4 bytes> (locally administered,
  unicast, distinct). Values are flannel's JSON, made by overlay.lease.LeaseAttrs so the format
  is the one schema module's. No etcd lease is attached (like a flannel reservation), so they
  stay until deleted.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network
from urllib.parse import urlparse

import grpc
from aetcd.rpc import rpc_pb2, rpc_pb2_grpc

from overlay.lab import FAKE_PEER_POOL
from overlay.lease import LeaseAttrs, subnet_key

MAX_TXN_OPS = 128
FIRST_FAKE_SUBNET = IPv4Network("10.4.0.0/24")
FAKE_PUBLIC_BASE = FAKE_PEER_POOL.network_address


@dataclass(frozen=True)
class FakePeer:
    subnet: IPv4Network
    public_ip: IPv4Address
    mac: str

    @property
    def gateway(self) -> IPv4Address:
        return self.subnet.network_address


def fake_peer(index: int, vni: int = 1) -> FakePeer:
    subnet = IPv4Network((int(FIRST_FAKE_SUBNET.network_address) + (index << 8), 24))
    raw = index.to_bytes(4, "big")
    mac = "0a:bb:" + ":".join(f"{octet:02x}" for octet in raw)
    return FakePeer(subnet, FAKE_PUBLIC_BASE + index + 1, mac)


def fake_peers(start: int, count: int) -> list[FakePeer]:
    return [fake_peer(index) for index in range(start, start + count)]


class BulkWriter:
    def __init__(self, endpoint: str, prefix: str, vni: int = 1):
        url = urlparse(endpoint)
        self.channel = grpc.insecure_channel(f"{url.hostname}:{url.port or 2379}")
        self.kv = rpc_pb2_grpc.KVStub(self.channel)
        self.prefix = prefix
        self.vni = vni

    def close(self) -> None:
        self.channel.close()

    def _txn(self, ops: list) -> None:
        for start in range(0, len(ops), MAX_TXN_OPS):
            self.kv.Txn(rpc_pb2.TxnRequest(success=ops[start:start + MAX_TXN_OPS]), timeout=30)

    def key(self, peer: FakePeer) -> bytes:
        return subnet_key(self.prefix, peer.subnet).encode()

    def value(self, peer: FakePeer) -> bytes:
        return LeaseAttrs(peer.public_ip, self.vni, peer.mac).to_json().encode()

    def put(self, peers: list[FakePeer]) -> tuple[float, float]:
        """Write every peer's lease; returns (wall time before the first txn, after the last)."""
        ops = [rpc_pb2.RequestOp(request_put=rpc_pb2.PutRequest(key=self.key(p), value=self.value(p)))
               for p in peers]
        started = time.time()
        self._txn(ops)
        return started, time.time()

    def delete(self, peers: list[FakePeer]) -> tuple[float, float]:
        ops = [rpc_pb2.RequestOp(request_delete_range=rpc_pb2.DeleteRangeRequest(key=self.key(p)))
               for p in peers]
        started = time.time()
        self._txn(ops)
        return started, time.time()
