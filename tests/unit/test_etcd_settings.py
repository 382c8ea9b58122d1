"""The etcd boundary without etcd: settings validation, error classification, event decoding."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import replace
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path

import grpc
import grpc.aio
import pytest
from aetcd.rpc import kv_pb2, rpc_pb2

from overlay.claims import ClaimAttrs, Grant
from overlay.errors import ConfigError, LeaseLost, StoreError
from overlay.etcd import (EtcdSettings, EtcdStore, LeaseEvent, prefix_end, is_transient, lease_event,
                          parse_endpoint, refusal)
from overlay.lease import DEFAULT_PREFIX, Lease, LeaseAttrs


@pytest.fixture
def tls_files(tmp_path) -> tuple[Path, Path, Path]:
    paths = tmp_path / "ca.crt", tmp_path / "client.crt", tmp_path / "client.key"
    for path in paths:
        path.write_text("not read before the first connection\n")
    return paths


# -------------------------------------------------------------------- settings

def test_endpoints_are_split_trimmed_and_deduplicated():
    settings = EtcdSettings.from_flags(" http://10.0.0.1:2379, http://10.0.0.2:2379,,http://10.0.0.1:2379 ",
                                       DEFAULT_PREFIX, None, None, None)
    assert settings.endpoints == ("http://10.0.0.1:2379", "http://10.0.0.2:2379")
    assert settings.prefix == DEFAULT_PREFIX and not settings.tls


def test_https_with_ca_and_client_certificate(tls_files):
    ca, cert, key = tls_files
    settings = EtcdSettings.from_flags("https://10.0.0.1:2379,https://etcd-1.example:2379", "/net", ca, cert, key)
    assert settings.tls and settings.ca_file == ca and settings.cert_file == cert and settings.key_file == key
    # A CA alone is fine: etcd may not ask for client certificates.
    assert EtcdSettings.from_flags("https://10.0.0.1:2379", "/net", ca, None, None).cert_file is None


@pytest.mark.parametrize("url, host, port, target", [
    ("http://10.0.0.1:2379", "10.0.0.1", 2379, "10.0.0.1:2379"),
    ("http://10.0.0.1", "10.0.0.1", 2379, "10.0.0.1:2379"),
    ("https://[fd00::1]:4001/", "fd00::1", 4001, "[fd00::1]:4001"),
    ("http://LocalHost:2379", "localhost", 2379, "localhost:2379"),
    ("http://etcd-0.etcd.svc.cluster.local:2379", "etcd-0.etcd.svc.cluster.local", 2379,
     "etcd-0.etcd.svc.cluster.local:2379"),
])
def test_endpoint_targets(url, host, port, target):
    endpoint = parse_endpoint(url)
    assert (endpoint.host, endpoint.port, endpoint.target, endpoint.url) == (host, port, target, url)


@pytest.mark.parametrize("csv", [
    "", " , ", "10.0.0.1:2379", "ftp://10.0.0.1:2379", "unix:///run/etcd.sock", "http://10.0.0.1:99999",
    "http://10.0.0.1:0", "http://10.0.0.1:port", "http://10.0.0.1:2379/v3", "http://10.0.0.1:2379?x=1",
    "http://user:secret@10.0.0.1:2379", "http://:2379", "http://bad_name:2379", "http://host name:2379",
    "http://10.0.0.1:2379,https://10.0.0.2:2379",
])
def test_bad_endpoints_name_the_flag(csv):
    with pytest.raises(ConfigError) as caught:
        EtcdSettings.from_flags(csv, DEFAULT_PREFIX, None, None, None)
    assert caught.value.field == "--etcd-endpoints"
    assert str(caught.value).startswith("--etcd-endpoints: ")


def test_mixed_schemes_are_explained():
    with pytest.raises(ConfigError, match="mixes http:// and https://"):
        EtcdSettings.from_flags("http://10.0.0.1:2379,https://10.0.0.2:2379", DEFAULT_PREFIX, None, None, None)


def test_tls_flags_are_checked(tls_files, tmp_path):
    ca, cert, key = tls_files
    cases = [
        (("https://10.0.0.1:2379", None, None, None), "--etcd-cafile"),       # https without a CA
        (("https://10.0.0.1:2379", ca, cert, None), "--etcd-keyfile"),        # certificate without key
        (("https://10.0.0.1:2379", ca, None, key), "--etcd-certfile"),        # key without certificate
        (("http://10.0.0.1:2379", ca, None, None), "--etcd-cafile"),          # TLS files for plain http
        (("http://10.0.0.1:2379", None, cert, key), "--etcd-certfile"),
        (("https://10.0.0.1:2379", tmp_path / "missing.crt", None, None), "--etcd-cafile"),
        (("https://10.0.0.1:2379", ca, cert, tmp_path), "--etcd-keyfile"),    # a directory, not a file
    ]
    for (csv, ca_file, cert_file, key_file), flag in cases:
        with pytest.raises(ConfigError) as caught:
            EtcdSettings.from_flags(csv, DEFAULT_PREFIX, ca_file, cert_file, key_file)
        assert caught.value.field == flag, (csv, ca_file, cert_file, key_file)


@pytest.mark.parametrize("prefix", ["", "coreos.com/network", "/with space", "/tab\there", "/new\nline", "/é"])
def test_bad_prefixes_name_the_flag(prefix):
    with pytest.raises(ConfigError) as caught:
        EtcdSettings.from_flags("http://10.0.0.1:2379", prefix, None, None, None)
    assert caught.value.field == "--etcd-prefix"


def test_settings_built_directly_are_validated_too():
    with pytest.raises(ConfigError):
        EtcdSettings(endpoints=())
    with pytest.raises(ConfigError):
        EtcdSettings(endpoints=("http://10.0.0.1:2379",), request_timeout=0)
    settings = EtcdSettings(endpoints=("http://10.0.0.1:2379",), prefix="/")
    assert settings.request_timeout > 0


def test_a_store_can_be_made_outside_an_event_loop():
    # The daemon builds its store before asyncio.run(): channels are made on first use, inside the loop.
    store = EtcdStore(EtcdSettings(endpoints=("http://10.0.0.1:2379", "http://10.0.0.2:2379")))
    assert store.endpoint in store.settings.endpoints
    assert EtcdStore(store.settings, start_at=1).endpoint == "http://10.0.0.2:2379"


def test_a_watch_needs_a_real_revision():
    async def first_event():
        store = EtcdStore(EtcdSettings(endpoints=("http://10.0.0.1:2379",)))
        try:
            return await anext(store.watch_leases(0))
        finally:
            await store.close()
    with pytest.raises(ValueError):
        asyncio.run(first_event())


# -------------------------------------------------------------------- gRPC errors

def rpc_error(code: grpc.StatusCode, details: str) -> grpc.aio.AioRpcError:
    return grpc.aio.AioRpcError(code, None, None, details=details)


@pytest.mark.parametrize("code, details, transient", [
    (grpc.StatusCode.UNAVAILABLE, "failed to connect to all addresses", True),
    (grpc.StatusCode.UNAVAILABLE, "etcdserver: no leader", True),
    (grpc.StatusCode.DEADLINE_EXCEEDED, "Deadline Exceeded", True),
    (grpc.StatusCode.UNKNOWN, "Stream removed", True),
    (grpc.StatusCode.INTERNAL, "Received RST_STREAM with error code 2", True),
    (grpc.StatusCode.INTERNAL, "Internal error from Core", True),   # a member shut down under a stream
    (grpc.StatusCode.UNKNOWN, "context deadline exceeded", True),   # mid-election, on a lease renewal
    (grpc.StatusCode.UNKNOWN, "etcdserver: request timed out", True),
    (grpc.StatusCode.UNKNOWN, "etcdserver: leader changed", True),
    (grpc.StatusCode.RESOURCE_EXHAUSTED, "etcdserver: too many requests", True),
    (grpc.StatusCode.RESOURCE_EXHAUSTED, "etcdserver: mvcc: database space exceeded", False),
    (grpc.StatusCode.INVALID_ARGUMENT, "etcdserver: key is not provided", False),
    (grpc.StatusCode.PERMISSION_DENIED, "etcdserver: permission denied", False),
    (grpc.StatusCode.NOT_FOUND, "etcdserver: requested lease not found", False),
    (grpc.StatusCode.UNKNOWN, "something else", False),
])
def test_transient_errors(code, details, transient):
    assert is_transient(rpc_error(code, details)) is transient


def test_refusals_become_domain_errors():
    endpoint = parse_endpoint("http://10.0.0.1:2379")
    lost = refusal("could not create x", endpoint, rpc_error(grpc.StatusCode.NOT_FOUND, "etcdserver: requested lease not found"))
    assert isinstance(lost, LeaseLost)
    denied = refusal("could not create x", endpoint, rpc_error(grpc.StatusCode.PERMISSION_DENIED, "etcdserver: permission denied"))
    assert isinstance(denied, StoreError)
    assert str(denied) == "could not create x: http://10.0.0.1:2379: permission_denied: etcdserver: permission denied"


def test_tls_failures_point_at_the_tls_flags():
    endpoint = parse_endpoint("https://10.0.0.1:2379")
    error = rpc_error(grpc.StatusCode.UNAVAILABLE, "failed to connect to all addresses; last error: "
                                                   "UNAVAILABLE: ipv4:10.0.0.1:2379: Unwrap failed (TSI_DATA_CORRUPTED)")
    assert "TLS refused: check --etcd-cafile, --etcd-certfile and --etcd-keyfile" in str(refusal("x", endpoint, error))


# -------------------------------------------------------------------- watch events

SUBNETS = f"{DEFAULT_PREFIX}/subnets/"
VALUE = b'{"PublicIP":"198.18.0.3","PublicIPv6":null,"BackendType":"vxlan","BackendData":{"VNI":1,"VtepMAC":"c6:d2:00:00:00:03"}}'


def event(kind, key: bytes, value: bytes = b"", revision: int = 42, lease: int = 7) -> kv_pb2.Event:
    return kv_pb2.Event(type=kind, kv=kv_pb2.KeyValue(key=key, value=value, mod_revision=revision, lease=lease))


def test_put_event_is_a_lease():
    subnet = IPv4Network("10.244.3.0/24")
    attrs = LeaseAttrs(IPv4Address("198.18.0.3"), 1, "c6:d2:00:00:00:03")
    assert lease_event(event(kv_pb2.Event.PUT, f"{SUBNETS}10.244.3.0-24".encode(), VALUE), DEFAULT_PREFIX) == \
        LeaseEvent(subnet, Lease(subnet, attrs, lease_id=7, mod_revision=42), 42)


def test_delete_event_has_no_lease():
    # etcd's delete events carry the key and the revision of the delete, no value.
    assert lease_event(event(kv_pb2.Event.DELETE, f"{SUBNETS}10.244.3.0-24".encode(), lease=0), DEFAULT_PREFIX) == \
        LeaseEvent(IPv4Network("10.244.3.0/24"), None, 42)


def test_unreadable_value_of_a_subnet_key_counts_as_gone(caplog):
    with caplog.at_level(logging.WARNING, logger="overlay.etcd"):
        converted = lease_event(event(kv_pb2.Event.PUT, f"{SUBNETS}10.244.3.0-24".encode(), b'{"BackendType":"udp"}'),
                                DEFAULT_PREFIX)
    assert converted == LeaseEvent(IPv4Network("10.244.3.0/24"), None, 42)
    assert "unreadable" in caplog.text


@pytest.mark.parametrize("key", [f"{SUBNETS}10.244.3.0-24x".encode(), f"{SUBNETS}junk".encode(),
                                 f"{SUBNETS}10.244.3.7-24".encode(), b"/other/subnets/10.244.3.0-24",
                                 SUBNETS.encode() + b"\xff"])
def test_foreign_keys_are_skipped(key, caplog):
    with caplog.at_level(logging.WARNING, logger="overlay.etcd"):
        assert lease_event(event(kv_pb2.Event.PUT, key, VALUE), DEFAULT_PREFIX) is None
    assert "ignoring etcd key" in caplog.text


def test_prefix_range_end():
    assert prefix_end(b"/coreos.com/network/subnets/") == b"/coreos.com/network/subnets0"
    assert prefix_end(b"a\xff\xff") == b"b"
    assert prefix_end(b"\xff") == b"\x00"


# -------------------------------------------------------------------- retries after a lost reply
#
# A request whose reply is lost may have been applied. These drive the store against a small
# in-memory etcd that applies a request and then reports DEADLINE_EXCEEDED once, as a timed-out
# attempt on a real member would, and check that the retry recognises its own earlier write.

class LostReplyEtcd:
    """Just enough of etcd's KV and Lease services for claim and update, in memory."""

    def __init__(self, lose: set[str]):
        self.lose = set(lose)               # method names whose next reply is lost
        self.revision = 1
        self.keys: dict[bytes, kv_pb2.KeyValue] = {}
        self.leases: set[int] = set()
        self.calls: list[str] = []

    def _reply(self, name: str, response):
        self.calls.append(name)
        if name in self.lose:
            self.lose.discard(name)
            raise grpc.aio.AioRpcError(grpc.StatusCode.DEADLINE_EXCEEDED, None, None, details="Deadline Exceeded")
        return response

    def _header(self):
        return rpc_pb2.ResponseHeader(revision=self.revision)

    async def LeaseGrant(self, request, **_):
        if request.ID in self.leases:
            raise grpc.aio.AioRpcError(grpc.StatusCode.FAILED_PRECONDITION, None, None,
                                       details="etcdserver: lease already exists")
        self.leases.add(request.ID)
        return self._reply("LeaseGrant", rpc_pb2.LeaseGrantResponse(header=self._header(), ID=request.ID, TTL=request.TTL))

    async def LeaseRevoke(self, request, **_):
        self.leases.discard(request.ID)
        for key in [key for key, kv in self.keys.items() if kv.lease == request.ID]:
            del self.keys[key]
            self.revision += 1
        return self._reply("LeaseRevoke", rpc_pb2.LeaseRevokeResponse(header=self._header()))

    async def Txn(self, request, **_):
        compare = request.compare[0]
        kv = self.keys.get(compare.key)
        if compare.target == rpc_pb2.Compare.VERSION:
            holds = (kv.version if kv else 0) == compare.version
        else:
            holds = (kv.mod_revision if kv else 0) == compare.mod_revision
        response = rpc_pb2.TxnResponse(succeeded=holds)
        if holds and request.success[0].HasField("request_delete_range"):
            self.keys.pop(compare.key, None)
            self.revision += 1
        elif holds:
            put = request.success[0].request_put
            if put.lease and put.lease not in self.leases:
                raise grpc.aio.AioRpcError(grpc.StatusCode.NOT_FOUND, None, None,
                                           details="etcdserver: requested lease not found")
            self.revision += 1
            self.keys[put.key] = kv_pb2.KeyValue(key=put.key, value=put.value, lease=put.lease,
                                                 mod_revision=self.revision, version=(kv.version if kv else 0) + 1)
        else:
            ranged = response.responses.add().response_range
            if kv is not None:
                ranged.kvs.append(kv)
        response.header.CopyFrom(self._header())
        return self._reply("Txn", response)


def store_on(fake: LostReplyEtcd) -> EtcdStore:
    store = EtcdStore(EtcdSettings(endpoints=("http://10.0.0.1:2379", "http://10.0.0.2:2379")))

    class Connection:
        def __init__(self, index):
            self.index, self.endpoint, self.kv, self.lease = index, store._endpoints[index], fake, fake
    store._connections = {0: Connection(0), 1: Connection(1)}   # both "members" share one state
    return store


ATTRS = LeaseAttrs(IPv4Address("198.18.0.3"), 1, "c6:d2:00:00:00:03")
SUBNET = IPv4Network("10.244.3.0/24")


@pytest.mark.parametrize("lose", [{"LeaseGrant"}, {"Txn"}, {"LeaseGrant", "Txn"}])
def test_a_claim_whose_reply_was_lost_is_still_ours(lose):
    fake = LostReplyEtcd(lose)
    lease = asyncio.run(store_on(fake).claim_subnet(SUBNET, ATTRS, ttl=60))
    assert lease is not None and fake.leases == {lease.lease_id}
    key = f"{SUBNETS}10.244.3.0-24".encode()
    assert fake.keys[key].lease == lease.lease_id and lease.mod_revision == fake.keys[key].mod_revision
    assert "LeaseRevoke" not in fake.calls


def test_a_lost_claim_revokes_its_lease():
    fake = LostReplyEtcd(set())
    winner = asyncio.run(store_on(fake).claim_subnet(SUBNET, ATTRS, ttl=60))
    assert asyncio.run(store_on(fake).claim_subnet(SUBNET, ATTRS, ttl=60)) is None
    assert fake.leases == {winner.lease_id}


def test_an_update_whose_reply_was_lost_is_not_reported_as_lost():
    fake = LostReplyEtcd(set())
    lease = asyncio.run(store_on(fake).claim_subnet(SUBNET, ATTRS, ttl=60))
    fake.lose = {"Txn"}
    changed = LeaseAttrs(ATTRS.public_ip, 2, ATTRS.vtep_mac)
    updated = asyncio.run(store_on(fake).update_lease_attrs(lease, changed))
    assert updated.attrs == changed and updated.mod_revision == fake.revision
    with pytest.raises(LeaseLost):    # and a real change by someone else still is
        asyncio.run(store_on(fake).update_lease_attrs(lease, ATTRS))


def test_a_claim_settled_whose_reply_was_lost_is_done():
    fake = LostReplyEtcd(set())
    store = store_on(fake)
    address = IPv4Address("10.244.3.9")
    attrs = ClaimAttrs(ATTRS.public_ip, ATTRS.vtep_mac, SUBNET, "mover", Grant.PENDING)
    won, claim = asyncio.run(store.claim_address(address, attrs, 0))
    assert won
    fake.lose = {"Txn"}     # the decision lands, its reply does not: the retry finds it there
    assert asyncio.run(store_on(fake).settle_claim(claim, attrs.decided(Grant.GRANTED)))
    key = next(iter(fake.keys))
    granted = replace(claim, attrs=attrs.decided(Grant.GRANTED), mod_revision=fake.keys[key].mod_revision)
    assert not asyncio.run(store_on(fake).settle_claim(claim, attrs.decided(Grant.REFUSED, "in use")))  # stale
    fake.lose = {"Txn"}     # the same for a withdrawal: the key is gone, as we asked
    assert asyncio.run(store_on(fake).settle_claim(granted, None)) and not fake.keys


class CancellingWatch:
    """A Watch call that etcd cancels at creation with `reason`."""

    def __init__(self, reason: str):
        self.reason = reason

    def Watch(self, **_):
        return self

    async def write(self, request):
        pass

    async def read(self):
        return rpc_pb2.WatchResponse(created=True, canceled=True, cancel_reason=self.reason)

    def done(self):
        return True

    def cancel(self):
        pass


@pytest.mark.parametrize("reason, refused", [("etcdserver: permission denied", True),
                                             ("etcdserver: invalid auth token", True),
                                             ("etcdserver: no leader", False), ("", False)])
def test_a_watch_cancelled_for_permissions_is_refused_not_broken(reason, refused):
    from overlay.etcd import _StreamBroken, _WatchStream
    store = EtcdStore(EtcdSettings(endpoints=("http://10.0.0.1:2379",)))

    class Connection:
        index, endpoint, watch = 0, store._endpoints[0], CancellingWatch(reason)
    stream = _WatchStream(Connection(), progress_interval=1.0, stale_after=5.0)
    with pytest.raises(StoreError if refused else _StreamBroken):
        asyncio.run(stream.create(rpc_pb2.WatchCreateRequest(key=b"/x"), 1.0))
