"""The etcd v3 store: the only module that talks to etcd.

Design notes
- Wire: grpc.aio with the generated etcd v3 stubs shipped in `aetcd.rpc` (no client library:
  the ones measured lack TLS client certificates, multiple endpoints or a lossless watch).
  Keys and values are flannel's (overlay.lease); this module only moves bytes and revisions.
- Endpoints: one gRPC channel per endpoint, made lazily inside the running loop, and our own
  rotation. A channel per endpoint (rather than one channel over an `ipv4:a,b,c` target) lets
  each endpoint keep its own host name, so a hostname resolves through DNS and TLS checks each
  member's certificate against that member's own address. A process starts on a random endpoint
  so a fleet of hosts spreads its watches over the members.
- Every unary request has a budget (`request_timeout`, 5 s) split into attempts of at most
  `attempt_timeout`. A transient failure (UNAVAILABLE, DEADLINE_EXCEEDED, a broken connection, a
  member without a leader) moves to the next endpoint and tries again; a full round of failures
  pauses briefly. When the budget is spent the caller gets StoreUnavailable; any other refusal
  is StoreError at once (a request referring to a lease that is gone is LeaseLost).
- Retrying is safe because every request is idempotent or made so, since a timed-out attempt
  may still have been applied:
  * leases are granted with an ID we choose, so a retried grant that finds "lease already
    exists" knows the first attempt got through;
  * create-if-absent is Txn If(version==0) Then(put) Else(range): when the else branch shows our
    own value bound to our own lease, an earlier attempt created it;
  * update is Txn If(mod_revision==known) Then(put) Else(range), recognised the same way;
  * puts of the config and deletes are idempotent by nature.
  A claim that fails or loses its race revokes the lease it granted, which also removes a key
  an unacknowledged attempt may have written: no granted lease lingers.
- Requests carry the `hasleader` metadata: a member cut off from its quorum refuses them (and
  cancels our watch) with "no leader" instead of serving stale data or hanging, so we move on.
- Watch: one stream per `watch_leases` call, from a given revision. Events are yielded in
  order; after each one the next revision to ask for is its mod_revision + 1 (etcd never splits
  one revision's events across responses unless asked to fragment, which we do not). When the
  stream breaks we re-create it on the next endpoint from that revision, so a member's death
  loses, repeats and reorders nothing; only when no endpoint takes the watch within the budget
  does the iterator raise StoreUnavailable, and the caller resumes from its last revision + 1.
  A compacted start revision raises WatchCompacted: re-list, then watch from the list's
  revision + 1.
- Liveness of a quiet watch: every `progress_interval` we send a WatchProgressRequest; a stream
  that answers nothing for `stale_after` seconds is treated as broken. This notices a dead or
  black-holed member within a few seconds, where gRPC keepalive alone could not ping that often
  (etcd's default --grpc-keepalive-min-time is 5 s and more frequent pings are answered with
  GOAWAY). Progress responses are used for liveness only, never as a resume point: etcd before
  3.4.25 may report a progress revision ahead of events not yet sent (etcd issue 15220).
- Address claims (overlay.claims) use the same machinery under `<prefix>/claims/`: listed and
  watched like leases, on a watch stream of their own; created with create-if-absent bound to the
  claimant's subnet lease; withdrawn with a compare on the value we wrote, so only our own claim
  is ever deleted. A retried claim that finds our own value on our own lease knows it landed.
- Leases listed or watched that are not in flannel's format are skipped with a warning (a
  foreign writer must not crash us); a valid subnet key whose value no longer parses is reported
  as a deletion, so a watch agrees with what a re-list would return.
"""

from __future__ import annotations

import asyncio
import logging
import random
import re
from dataclasses import dataclass
from ipaddress import IPv4Network, IPv6Address, ip_address
from pathlib import Path
from typing import AsyncIterator, Awaitable, Callable, TypeVar
from urllib.parse import urlsplit

import grpc
import grpc.aio
from aetcd.rpc import kv_pb2, rpc_pb2, rpc_pb2_grpc

from .claims import Claim, ClaimAttrs, claim_key, claims_prefix, parse_claim_key, parse_claim_value
from .errors import (ClaimParseError, ConfigError, LeaseLost, LeaseParseError, StoreError, StoreUnavailable,
                     WatchCompacted)
from .lease import (DEFAULT_PREFIX, Lease, LeaseAttrs, config_key, parse_lease_value, parse_subnet_key,
                    subnet_key, subnets_prefix)

log = logging.getLogger("overlay.etcd")

T = TypeVar("T")

DEFAULT_PORT = 2379
LIST_PAGE_SIZE = 1000
# Sent with every request: a member without a leader refuses at once ("no leader") rather than
# answering from a partitioned minority or waiting out its own request timeout.
REQUIRE_LEADER = (("hasleader", "true"),)
# Lease IDs are int64 and must be positive; we choose them so that a retried grant is idempotent.
_MAX_LEASE_ID = (1 << 63) - 1

_CHANNEL_OPTIONS = (
    # A backstop for idle connections only; quick detection comes from attempt deadlines and the
    # watch's progress requests. Not below etcd's default keepalive minimum of 5 s (see above),
    # and no pings on a connection without calls, which etcd's policy also punishes.
    ("grpc.keepalive_time_ms", 10_000),
    ("grpc.keepalive_timeout_ms", 5_000),
    ("grpc.keepalive_permit_without_calls", 0),
    ("grpc.http2.max_pings_without_data", 0),
    # A member that comes back should be usable again within seconds, not after gRPC's default
    # reconnect backoff of up to two minutes.
    ("grpc.initial_reconnect_backoff_ms", 200),
    ("grpc.min_reconnect_backoff_ms", 200),
    ("grpc.max_reconnect_backoff_ms", 2_000),
    # We retry ourselves, knowing which requests are safe to repeat.
    ("grpc.enable_retries", 0),
    ("grpc.max_receive_message_length", 64 << 20),
)

_HOSTNAME = re.compile(r"(?=.{1,253}$)[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?(\.[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?)*\.?")
_PREFIX = re.compile(r"/[\x21-\x7e]*")  # printable ASCII without spaces: a key prefix, not prose
# Broken connections that gRPC reports with codes other than UNAVAILABLE.
_BROKEN_CONNECTION = ("stream removed", "rst_stream", "goaway", "socket closed", "connection reset",
                      "broken pipe", "too many requests",
                      # gRPC's C core, when a member shuts down under an open stream (seen on
                      # an etcd restart while a watch was open): the stream ends with no status.
                      "internal error from core",
                      # etcd's own time-outs while a new leader is elected (seen as UNKNOWN on a
                      # lease renewal right after the leader was killed).
                      "context deadline exceeded", "request timed out", "leader changed")
# A watch etcd cancels for these reasons is refused, not broken: another member says the same.
_REFUSED_WATCH = ("permission denied", "user name is empty", "invalid auth token", "authentication")
# What gRPC says when TLS fails. A server that refuses our (missing) client certificate shows up
# only as "Unwrap failed (TSI_DATA_CORRUPTED)": TLS 1.3 finishes the client's side of the handshake
# before the server's verdict arrives.
_TLS_TROUBLE = ("handshake", "ssl", "certificate", "tsi_", "unwrap failed", "verification")


# -------------------------------------------------------------------- settings

@dataclass(frozen=True)
class Endpoint:
    """One etcd client URL, split into what gRPC needs."""
    url: str
    scheme: str     # "http" or "https"
    host: str       # an IP address or a DNS name, without brackets
    port: int

    @property
    def target(self) -> str:
        """The gRPC target: `host:port`, an IPv6 address in brackets; names resolve through DNS."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"


def parse_endpoint(url: str) -> Endpoint:
    """`https://10.0.0.1:2379` -> Endpoint; ConfigError naming --etcd-endpoints otherwise."""
    def refuse(problem: str) -> ConfigError:
        return ConfigError("--etcd-endpoints", f"{url!r}: {problem}")
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise refuse(f"not a URL ({exc})") from None
    if parts.scheme not in ("http", "https"):
        raise refuse("expected http://HOST:PORT or https://HOST:PORT")
    if parts.username is not None or parts.password is not None:
        raise refuse("credentials in the URL are not supported (use client certificates)")
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise refuse("a client URL has no path, query or fragment")
    host = parts.hostname or ""
    try:
        address = ip_address(host)
    except ValueError:
        if not _HOSTNAME.fullmatch(host):
            raise refuse("expected an IP address or a host name") from None
    else:
        if isinstance(address, IPv6Address) and f"[{host}]" not in parts.netloc.lower():
            raise refuse("an IPv6 address must be in brackets, e.g. https://[fd00::1]:2379")
        host = str(address)
    if port == 0:
        raise refuse("port 0 is not a port")
    return Endpoint(url=url, scheme=parts.scheme, host=host, port=port or DEFAULT_PORT)


@dataclass(frozen=True)
class EtcdSettings:
    """How to reach etcd. Constructing one validates it; from_flags also checks the TLS files."""
    endpoints: tuple[str, ...]
    prefix: str = DEFAULT_PREFIX
    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None
    request_timeout: float = 5.0    # budget of one request, retries over every endpoint included

    def __post_init__(self) -> None:
        if not self.endpoints:
            raise ConfigError("--etcd-endpoints", "at least one etcd client URL is needed")
        parsed = [parse_endpoint(url) for url in self.endpoints]
        schemes = {endpoint.scheme for endpoint in parsed}
        if len(schemes) > 1:
            raise ConfigError("--etcd-endpoints", "mixes http:// and https:// URLs; use one scheme for all")
        if not isinstance(self.prefix, str) or not _PREFIX.fullmatch(self.prefix):
            raise ConfigError("--etcd-prefix", f"{self.prefix!r} must start with / and contain no spaces "
                                               "or control characters")
        if self.cert_file is not None and self.key_file is None:
            raise ConfigError("--etcd-keyfile", "a client certificate needs its key (--etcd-keyfile)")
        if self.key_file is not None and self.cert_file is None:
            raise ConfigError("--etcd-certfile", "a client key needs its certificate (--etcd-certfile)")
        if schemes == {"https"} and self.ca_file is None:
            raise ConfigError("--etcd-cafile", "https:// endpoints need the CA that signed etcd's "
                                               "certificate (--etcd-cafile)")
        if schemes == {"http"} and (self.ca_file or self.cert_file):
            flag = "--etcd-cafile" if self.ca_file else "--etcd-certfile"
            raise ConfigError(flag, "TLS files are given but the endpoints are http://; use https:// URLs")
        if not 0 < self.request_timeout <= 300:
            raise ConfigError("request_timeout", "must be more than 0 and at most 300 seconds")

    @property
    def tls(self) -> bool:
        return self.endpoints[0].startswith("https:")

    @classmethod
    def from_flags(cls, endpoints_csv: str, prefix: str, ca_file: Path | None = None,
                   cert_file: Path | None = None, key_file: Path | None = None) -> "EtcdSettings":
        """Settings from command-line values: comma-separated URLs (duplicates dropped)."""
        urls = tuple(dict.fromkeys(url.strip() for url in (endpoints_csv or "").split(",") if url.strip()))
        settings = cls(endpoints=urls, prefix=prefix, ca_file=ca_file, cert_file=cert_file, key_file=key_file)
        for flag, path in (("--etcd-cafile", ca_file), ("--etcd-certfile", cert_file), ("--etcd-keyfile", key_file)):
            if path is not None and not Path(path).is_file():
                raise ConfigError(flag, f"{str(path)!r} is not a readable file")
        return settings


@dataclass(frozen=True)
class LeaseEvent:
    """A change to one subnet lease: `lease` is None when it was deleted, expired or unreadable."""
    subnet: IPv4Network
    lease: Lease | None
    revision: int


# -------------------------------------------------------------------- gRPC errors

def is_transient(exc: grpc.aio.AioRpcError) -> bool:
    """Would another attempt (perhaps on another member) be worth it?"""
    code = exc.code()
    if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
        return True
    details = (exc.details() or "").lower()
    if code in (grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL, grpc.StatusCode.RESOURCE_EXHAUSTED):
        return any(sign in details for sign in _BROKEN_CONNECTION)
    return False


def _describe(endpoint: Endpoint, exc: grpc.aio.AioRpcError) -> str:
    details = exc.details() or ""
    text = f"{endpoint.url}: {exc.code().name.lower()}: {details}"
    lowered = details.lower()
    if endpoint.scheme == "https" and any(sign in lowered for sign in _TLS_TROUBLE):
        text += " (TLS refused: check --etcd-cafile, --etcd-certfile and --etcd-keyfile)"
    return text


def refusal(what: str, endpoint: Endpoint, exc: grpc.aio.AioRpcError) -> Exception:
    """The domain error for a request etcd refused for good."""
    if "lease not found" in (exc.details() or ""):
        return LeaseLost(f"{what}: the etcd lease is gone ({_describe(endpoint, exc)})")
    return StoreError(f"{what}: {_describe(endpoint, exc)}")


def lease_event(event: kv_pb2.Event, prefix: str) -> LeaseEvent | None:
    """A watch event under `<prefix>/subnets/` as a LeaseEvent; None (logged) for a foreign key."""
    revision = event.kv.mod_revision
    try:
        subnet = parse_subnet_key(event.kv.key.decode(), prefix)
    except (UnicodeDecodeError, LeaseParseError) as exc:
        log.warning("ignoring etcd key %r at revision %d: %s", event.kv.key, revision, exc)
        return None
    if event.type == kv_pb2.Event.DELETE:
        return LeaseEvent(subnet, None, revision)
    try:
        attrs = parse_lease_value(event.kv.value)
    except LeaseParseError as exc:
        log.warning("lease %s at revision %d is unreadable, treating it as gone: %s", subnet, revision, exc)
        return LeaseEvent(subnet, None, revision)
    return LeaseEvent(subnet, Lease(subnet, attrs, event.kv.lease, revision), revision)


@dataclass(frozen=True)
class ClaimEvent:
    """A change to one address claim: `claim` is None when it was withdrawn, expired with its
    holder's lease, or is unreadable."""
    address: object   # IPv4Address
    claim: Claim | None
    revision: int


def claim_event(event: kv_pb2.Event, prefix: str) -> ClaimEvent | None:
    """A watch event under `<prefix>/claims/` as a ClaimEvent; None (logged) for a foreign key."""
    revision = event.kv.mod_revision
    try:
        address = parse_claim_key(event.kv.key.decode(), prefix)
    except (UnicodeDecodeError, ClaimParseError) as exc:
        log.warning("ignoring etcd key %r at revision %d: %s", event.kv.key, revision, exc)
        return None
    if event.type == kv_pb2.Event.DELETE:
        return ClaimEvent(address, None, revision)
    try:
        attrs = parse_claim_value(event.kv.value)
    except ClaimParseError as exc:
        log.warning("claim of %s at revision %d is unreadable, treating it as gone: %s", address, revision, exc)
        return ClaimEvent(address, None, revision)
    return ClaimEvent(address, Claim(address, attrs, event.kv.lease, revision), revision)


def _claim_from_kv(kv: kv_pb2.KeyValue, prefix: str) -> Claim | None:
    try:
        address = parse_claim_key(kv.key.decode(), prefix)
        attrs = parse_claim_value(kv.value)
    except (UnicodeDecodeError, ClaimParseError) as exc:
        log.warning("skipping etcd key %r: %s", kv.key, exc)
        return None
    return Claim(address, attrs, kv.lease, kv.mod_revision)


def _rpc_error(code: grpc.StatusCode, details: str) -> grpc.aio.AioRpcError:
    """An error of our own that _request handles as gRPC's (retried like a transient one).
    Both metadata arguments are given: grpcio before 1.8x requires them."""
    return grpc.aio.AioRpcError(code, None, None, details=details)


def prefix_end(prefix: bytes) -> bytes:
    """The range_end that makes a range request cover every key starting with prefix."""
    end = bytearray(prefix)
    while end:
        if end[-1] < 0xFF:
            end[-1] += 1
            return bytes(end)
        end.pop()
    return b"\x00"  # every key


async def listing_not_older(list_call: Callable[[], Awaitable[tuple[list[T], int]]], applied: Callable[[], int],
                            attempts: int = 3) -> tuple[list[T], int]:
    """A listing (items, revision) not older than `applied()`, the revision its watch has applied
    by the time the listing arrives, if `attempts` reads get one.

    A periodic re-list runs beside its watch, which may apply an event newer than a listing still
    on its way: applying that listing would undo the event, and the watch, already past it,
    would never repeat it. A read begun after the event is at least as new, so this reads again;
    only an etcd restored from an older backup stays behind, and then its listing is all there
    is to trust (the last one read is returned).
    """
    for _ in range(attempts):
        items, listed = await list_call()
        if listed >= applied():
            break
    return items, listed


# -------------------------------------------------------------------- connections

class _Connection:
    """One endpoint's channel and stubs."""

    def __init__(self, index: int, endpoint: Endpoint, credentials: grpc.ChannelCredentials | None):
        self.index = index
        self.endpoint = endpoint
        if credentials is None:
            self.channel = grpc.aio.insecure_channel(endpoint.target, options=_CHANNEL_OPTIONS)
        else:
            self.channel = grpc.aio.secure_channel(endpoint.target, credentials, options=_CHANNEL_OPTIONS)
        self.kv = rpc_pb2_grpc.KVStub(self.channel)
        self.lease = rpc_pb2_grpc.LeaseStub(self.channel)
        self.watch = rpc_pb2_grpc.WatchStub(self.channel)


class _StreamBroken(Exception):
    """A watch stream stopped delivering: resume it elsewhere from the next revision."""


class _WatchStream:
    """One Watch call with one watcher, and the progress requests that prove it alive."""

    def __init__(self, connection: _Connection, progress_interval: float, stale_after: float):
        self.index = connection.index
        self.endpoint = connection.endpoint
        self.call = connection.watch.Watch(metadata=REQUIRE_LEADER)
        self.progress_interval = progress_interval
        self.stale_after = stale_after
        self.answered = False   # any response after the watch was created, progress included
        self._pinger: asyncio.Task | None = None

    async def create(self, request: rpc_pb2.WatchCreateRequest, timeout: float) -> None:
        """Start the watcher; returns once etcd confirmed it. AioRpcError on a failed stream."""
        await asyncio.wait_for(self.call.write(rpc_pb2.WatchRequest(create_request=request)), timeout)
        while True:
            response = await asyncio.wait_for(self.call.read(), timeout)
            if response is grpc.aio.EOF:
                raise _StreamBroken(f"{self.endpoint.url}: watch stream ended before the watch was created")
            self._check(response)
            if response.created:
                break
        self._pinger = asyncio.create_task(self._ping(), name=f"etcd watch progress {self.endpoint.url}")

    async def next_response(self) -> rpc_pb2.WatchResponse:
        """The next response with events. _StreamBroken when the stream died or went quiet."""
        while True:
            try:
                response = await asyncio.wait_for(self.call.read(), self.stale_after)
            except asyncio.TimeoutError:
                raise _StreamBroken(f"{self.endpoint.url}: no answer to progress requests in "
                                    f"{self.stale_after:.1f} s") from None
            except grpc.aio.AioRpcError as exc:
                if is_transient(exc):
                    raise _StreamBroken(_describe(self.endpoint, exc)) from None
                raise refusal("watch", self.endpoint, exc) from None
            if response is grpc.aio.EOF:
                raise _StreamBroken(f"{self.endpoint.url}: watch stream ended")
            self.answered = True
            self._check(response)
            if response.events:
                return response
            # Otherwise a progress response: the stream is alive, nothing to deliver.

    def _check(self, response: rpc_pb2.WatchResponse) -> None:
        if response.compact_revision:
            raise WatchCompacted(response.compact_revision)
        if response.canceled:
            reason = response.cancel_reason or "no reason given"
            if any(word in reason.lower() for word in _REFUSED_WATCH):
                # Every member answers so: etcd refuses, it is not away (as for any other request).
                raise StoreError(f"{self.endpoint.url}: watch refused: {reason}")
            # Compaction is handled above; the other cancellations (no leader, member stopping)
            # are worth a try elsewhere.
            raise _StreamBroken(f"{self.endpoint.url}: watch cancelled: {reason}")

    async def _ping(self) -> None:
        request = rpc_pb2.WatchRequest(progress_request=rpc_pb2.WatchProgressRequest())
        try:
            while not self.call.done():
                await asyncio.sleep(self.progress_interval)
                await self.call.write(request)
        except (grpc.aio.AioRpcError, grpc.aio.UsageError, asyncio.InvalidStateError, RuntimeError):
            pass  # the stream is over; the reader finds out why

    async def close(self) -> None:
        if self._pinger is not None:
            self._pinger.cancel()
            await asyncio.gather(self._pinger, return_exceptions=True)
        self.call.cancel()


# -------------------------------------------------------------------- the store

class EtcdStore:
    """Config and subnet leases in etcd, with failover across endpoints. All methods are async."""

    attempt_timeout = 2.0       # one attempt on one endpoint; the budget is settings.request_timeout
    progress_interval = 1.0     # how often a watch asks for a progress response
    stale_after = 4.0           # a watch silent this long is broken

    def __init__(self, settings: EtcdSettings, *, start_at: int | None = None):
        self.settings = settings
        self._endpoints = [parse_endpoint(url) for url in settings.endpoints]
        self._current = (random.randrange(len(self._endpoints)) if start_at is None
                         else start_at % len(self._endpoints))
        self._connections: dict[int, _Connection] = {}
        self._credentials: grpc.ChannelCredentials | None = None
        self._closed = False
        self._prefix = settings.prefix
        self._config_key = config_key(settings.prefix).encode()
        self._subnets = subnets_prefix(settings.prefix).encode()
        self._claims = claims_prefix(settings.prefix).encode()

    @property
    def endpoint(self) -> str:
        """The client URL requests go to now."""
        return self._endpoints[self._current].url

    # ---------------------------------------------------------------- config

    async def get_config(self) -> bytes | None:
        async def attempt(conn: _Connection, timeout: float) -> bytes | None:
            response = await conn.kv.Range(rpc_pb2.RangeRequest(key=self._config_key),
                                           timeout=timeout, metadata=REQUIRE_LEADER)
            return response.kvs[0].value if response.kvs else None
        return await self._request("read the network config", attempt)

    async def put_config(self, value: bytes) -> None:
        async def attempt(conn: _Connection, timeout: float) -> None:
            await conn.kv.Put(rpc_pb2.PutRequest(key=self._config_key, value=value),
                              timeout=timeout, metadata=REQUIRE_LEADER)
        await self._request("store the network config", attempt)

    # ---------------------------------------------------------------- leases

    async def list_leases(self) -> tuple[list[Lease], int]:
        """Every readable lease and the revision they were read at (watch from revision + 1)."""
        return await self._list("list the subnet leases", self._subnets, self._parse_kv)

    async def _list(self, what: str, prefix: bytes, parse: Callable[[kv_pb2.KeyValue], T | None]) -> tuple[list[T], int]:
        async def attempt(conn: _Connection, timeout: float) -> tuple[list[T], int]:
            for _ in range(3):
                try:
                    return await self._list_pages(conn, timeout, prefix, parse)
                except grpc.aio.AioRpcError as exc:
                    # The revision pinned for the later pages was compacted meanwhile: start over.
                    if exc.code() != grpc.StatusCode.OUT_OF_RANGE:
                        raise
            return await self._list_pages(conn, timeout, prefix, parse)
        return await self._request(what, attempt)

    async def _list_pages(self, conn: _Connection, timeout: float, prefix: bytes,
                          parse: Callable[[kv_pb2.KeyValue], T | None]) -> tuple[list[T], int]:
        # Pages of LIST_PAGE_SIZE keys, all read at the first page's revision: one consistent
        # snapshot without one huge message.
        items: list[T] = []
        revision = 0
        start, end = prefix, prefix_end(prefix)
        while True:
            response = await conn.kv.Range(
                rpc_pb2.RangeRequest(key=start, range_end=end, limit=LIST_PAGE_SIZE, revision=revision),
                timeout=timeout, metadata=REQUIRE_LEADER)
            revision = revision or response.header.revision
            for kv in response.kvs:
                item = parse(kv)
                if item is not None:
                    items.append(item)
            if not response.more or not response.kvs:
                return items, revision
            start = response.kvs[-1].key + b"\x00"

    def _parse_kv(self, kv: kv_pb2.KeyValue) -> Lease | None:
        try:
            subnet = parse_subnet_key(kv.key.decode(), self._prefix)
            attrs = parse_lease_value(kv.value)
        except (UnicodeDecodeError, LeaseParseError) as exc:
            log.warning("skipping etcd key %r: %s", kv.key, exc)
            return None
        return Lease(subnet, attrs, kv.lease, kv.mod_revision)

    async def claim_subnet(self, subnet: IPv4Network, attrs: LeaseAttrs, ttl: int) -> Lease | None:
        """Take subnet for ttl seconds (renew with keepalive); None when another host holds it."""
        if ttl < 1:
            raise ValueError(f"lease TTL must be at least 1 s, not {ttl}")
        key = subnet_key(self._prefix, subnet).encode()
        value = attrs.to_json().encode()
        lease_id = await self._grant(ttl)
        try:
            created, revision = await self._create(f"claim {subnet}", key, value, lease_id)
        except BaseException:
            # Failed or cancelled: the put may have landed anyway. Revoking our fresh lease
            # removes it too, so the claim is cleanly not made. Shielded from a second cancel.
            await asyncio.shield(self._revoke_quietly(lease_id))
            raise
        if not created:
            await asyncio.shield(self._revoke_quietly(lease_id))
            return None
        return Lease(subnet, attrs, lease_id, revision)

    async def update_lease_attrs(self, lease: Lease, attrs: LeaseAttrs) -> Lease:
        """Announce new attrs under the same etcd lease; LeaseLost if the key changed since lease."""
        key = subnet_key(self._prefix, lease.subnet).encode()
        value = attrs.to_json().encode()
        txn = rpc_pb2.TxnRequest(
            compare=[rpc_pb2.Compare(key=key, target=rpc_pb2.Compare.MOD, result=rpc_pb2.Compare.EQUAL,
                                     mod_revision=lease.mod_revision)],
            success=[rpc_pb2.RequestOp(request_put=rpc_pb2.PutRequest(key=key, value=value, lease=lease.lease_id))],
            failure=[rpc_pb2.RequestOp(request_range=rpc_pb2.RangeRequest(key=key))])

        async def attempt(conn: _Connection, timeout: float) -> int:
            response = await conn.kv.Txn(txn, timeout=timeout, metadata=REQUIRE_LEADER)
            if response.succeeded:
                return response.header.revision
            kvs = response.responses[0].response_range.kvs
            if kvs and kvs[0].lease == lease.lease_id and kvs[0].value == value \
                    and kvs[0].mod_revision > lease.mod_revision:
                return kvs[0].mod_revision  # an earlier attempt of ours landed; its reply was lost
            found = (f"now at revision {kvs[0].mod_revision}, etcd lease {kvs[0].lease:x}" if kvs else "deleted")
            raise LeaseLost(f"lease {lease.subnet} changed since revision {lease.mod_revision} ({found})")
        revision = await self._request(f"update lease {lease.subnet}", attempt)
        return Lease(lease.subnet, attrs, lease.lease_id, revision)

    async def delete_lease(self, subnet: IPv4Network) -> None:
        """Remove a subnet's lease (operators and tests; a daemon lets its lease expire)."""
        await self.delete_key(subnet_key(self._prefix, subnet))

    async def time_to_live(self, lease_id: int) -> int:
        """Seconds the etcd lease has left; -1 when it does not exist (expired or revoked)."""
        async def attempt(conn: _Connection, timeout: float) -> int:
            try:
                response = await conn.lease.LeaseTimeToLive(rpc_pb2.LeaseTimeToLiveRequest(ID=lease_id),
                                                            timeout=timeout, metadata=REQUIRE_LEADER)
            except grpc.aio.AioRpcError as exc:
                if exc.code() == grpc.StatusCode.NOT_FOUND:
                    return -1
                raise
            return response.TTL if response.TTL > 0 else -1
        return await self._request(f"read the TTL of etcd lease {lease_id:x}", attempt)

    async def keepalive(self, lease_id: int, attempt_timeout: float | None = None) -> int:
        """Renew the etcd lease once; the TTL it now has, <= 0 when the lease is gone.

        attempt_timeout bounds the wait on one member before the next is tried: with a short TTL,
        a hung member (one that neither answers nor resets the connection) must not use up the
        time the lease has left.
        """
        async def attempt(conn: _Connection, timeout: float) -> int:
            call = conn.lease.LeaseKeepAlive(timeout=timeout, metadata=REQUIRE_LEADER)
            try:
                await call.write(rpc_pb2.LeaseKeepAliveRequest(ID=lease_id))
                response = await call.read()
            finally:
                call.cancel()
            if response is grpc.aio.EOF:
                raise StoreError(f"{conn.endpoint.url}: lease keepalive stream ended without an answer")
            return response.TTL
        return await self._request(f"renew etcd lease {lease_id:x}", attempt, attempt_timeout)

    # ---------------------------------------------------------------- address claims

    async def list_claims(self) -> tuple[list[Claim], int]:
        """Every readable address claim and the revision they were read at."""
        return await self._list("list the address claims", self._claims,
                                lambda kv: _claim_from_kv(kv, self._prefix))

    async def get_claim(self, address) -> Claim | None:
        """The claim on one address as etcd holds it now (a linearizable read), or None."""
        key = claim_key(self._prefix, address).encode()

        async def attempt(conn: _Connection, timeout: float) -> Claim | None:
            response = await conn.kv.Range(rpc_pb2.RangeRequest(key=key), timeout=timeout, metadata=REQUIRE_LEADER)
            return _claim_from_kv(response.kvs[0], self._prefix) if response.kvs else None
        return await self._request(f"read the claim on {address}", attempt)

    async def claim_address(self, address, attrs: ClaimAttrs, lease_id: int) -> tuple[bool, Claim | None]:
        """Claim address for attrs, bound to lease_id (the claimant's subnet lease).

        Txn If(version==0) Then(put) Else(range): (True, our claim) when created, or when it is
        already ours (same lease, same host and container, whatever the origin decided since: a
        repeated ADD, the keeper's claim, or a retried attempt that landed); else (False, the
        holder's claim; None if unreadable). LeaseLost when lease_id is gone.
        """
        key = claim_key(self._prefix, address).encode()
        value = attrs.to_json().encode()
        txn = rpc_pb2.TxnRequest(
            compare=[rpc_pb2.Compare(key=key, target=rpc_pb2.Compare.VERSION, result=rpc_pb2.Compare.EQUAL,
                                     version=0)],
            success=[rpc_pb2.RequestOp(request_put=rpc_pb2.PutRequest(key=key, value=value, lease=lease_id))],
            failure=[rpc_pb2.RequestOp(request_range=rpc_pb2.RangeRequest(key=key))])

        async def attempt(conn: _Connection, timeout: float) -> tuple[bool, Claim | None]:
            response = await conn.kv.Txn(txn, timeout=timeout, metadata=REQUIRE_LEADER)
            if response.succeeded:
                return True, Claim(address, attrs, lease_id, response.header.revision)
            kvs = response.responses[0].response_range.kvs
            if not kvs:
                return False, None   # deleted between the compare and the range: cannot happen in one txn
            holder = _claim_from_kv(kvs[0], self._prefix)
            if kvs[0].lease == lease_id and holder is not None and holder.attrs.same_attachment(attrs):
                return True, holder
            return False, holder
        return await self._request(f"claim {address}", attempt)

    async def release_claim(self, address, attrs: ClaimAttrs) -> bool:
        """Withdraw our claim: Txn If(value==ours) Then(delete). True when it was ours and is
        gone now or already was; False when another claim (another host or container) holds it,
        which is then left alone."""
        key = claim_key(self._prefix, address).encode()
        value = attrs.to_json().encode()
        txn = rpc_pb2.TxnRequest(
            compare=[rpc_pb2.Compare(key=key, target=rpc_pb2.Compare.VALUE, result=rpc_pb2.Compare.EQUAL,
                                     value=value)],
            success=[rpc_pb2.RequestOp(request_delete_range=rpc_pb2.DeleteRangeRequest(key=key))],
            failure=[rpc_pb2.RequestOp(request_range=rpc_pb2.RangeRequest(key=key, count_only=True))])

        async def attempt(conn: _Connection, timeout: float) -> bool:
            response = await conn.kv.Txn(txn, timeout=timeout, metadata=REQUIRE_LEADER)
            # A compare on an absent key fails: then the claim is gone, which is what we want.
            return response.succeeded or response.responses[0].response_range.count == 0
        return await self._request(f"withdraw the claim on {address}", attempt)

    async def settle_claim(self, claim: Claim, attrs: ClaimAttrs | None) -> bool:
        """Rewrite a claim exactly as it was seen: Txn If(mod_revision == claim's) Then(put attrs
        bound to the claim's own lease; or delete when attrs is None) Else(range). True when
        done; False when the claim changed or is gone meanwhile. The origin writes its grant
        this way (the key still dies with the claimant's lease); withdrawals of a decided claim
        too. Idempotent: a retry whose first attempt landed (its reply lost) finds the key
        holding what we wrote, or gone when we deleted it, and that counts as done."""
        key = claim_key(self._prefix, claim.address).encode()
        value = attrs.to_json().encode() if attrs is not None else b""
        change = (rpc_pb2.RequestOp(request_delete_range=rpc_pb2.DeleteRangeRequest(key=key)) if attrs is None else
                  rpc_pb2.RequestOp(request_put=rpc_pb2.PutRequest(key=key, value=value, lease=claim.lease_id)))
        txn = rpc_pb2.TxnRequest(
            compare=[rpc_pb2.Compare(key=key, target=rpc_pb2.Compare.MOD, result=rpc_pb2.Compare.EQUAL,
                                     mod_revision=claim.mod_revision)],
            success=[change],
            failure=[rpc_pb2.RequestOp(request_range=rpc_pb2.RangeRequest(key=key))])

        async def attempt(conn: _Connection, timeout: float) -> bool:
            response = await conn.kv.Txn(txn, timeout=timeout, metadata=REQUIRE_LEADER)
            if response.succeeded:
                return True
            kvs = response.responses[0].response_range.kvs if response.responses else []
            if attrs is None:
                return not kvs
            return bool(kvs) and kvs[0].value == value and kvs[0].lease == claim.lease_id
        return await self._request(f"settle the claim on {claim.address}", attempt)

    # ---------------------------------------------------------------- generic keys

    async def create_if_absent(self, key: str, value: bytes | str, lease_id: int) -> bool:
        """Create key bound to lease_id (0: no lease) unless it exists; True when we created it.

        key is a full key and must lie under the prefix. LeaseLost when lease_id is gone.
        """
        raw_key = self._own_key(key)
        raw_value = value.encode() if isinstance(value, str) else value
        created, _ = await self._create(f"create {key}", raw_key, raw_value, lease_id)
        return created

    async def delete_key(self, key: str) -> None:
        """Delete key (a full key under the prefix); deleting an absent key succeeds."""
        raw_key = self._own_key(key)

        async def attempt(conn: _Connection, timeout: float) -> None:
            await conn.kv.DeleteRange(rpc_pb2.DeleteRangeRequest(key=raw_key), timeout=timeout,
                                      metadata=REQUIRE_LEADER)
        await self._request(f"delete {key}", attempt)

    def _own_key(self, key: str) -> bytes:
        # The store reads and writes only its own network's keys.
        if not key.startswith(f"{self._prefix.rstrip('/')}/"):
            raise ValueError(f"{key!r} is not under the etcd prefix {self._prefix!r}")
        return key.encode()

    # ---------------------------------------------------------------- watch

    async def watch_leases(self, start_revision: int) -> AsyncIterator[LeaseEvent]:
        """Every change under `<prefix>/subnets/` from start_revision on, in revision order.

        Resumes by itself on another endpoint when a stream breaks; raises StoreUnavailable when
        no endpoint takes the watch within the request budget, WatchCompacted when the revision
        to watch from is compacted.
        """
        async for event in self._watch("the subnet leases", self._subnets, start_revision,
                                       lambda event: lease_event(event, self._prefix)):
            yield event

    async def watch_claims(self, start_revision: int) -> AsyncIterator[ClaimEvent]:
        """Every change under `<prefix>/claims/` from start_revision on, as watch_leases."""
        async for event in self._watch("the address claims", self._claims, start_revision,
                                       lambda event: claim_event(event, self._prefix)):
            yield event

    async def _watch(self, what: str, prefix: bytes, start_revision: int,
                     convert: Callable[[kv_pb2.Event], T | None]) -> AsyncIterator[T]:
        if start_revision < 1:
            raise ValueError(f"a watch starts at revision 1 or later, not {start_revision}")
        next_revision = start_revision
        quick_breaks = 0   # streams in a row that broke before answering anything
        while True:
            stream = await self._request(
                f"watch {what} from revision {next_revision}",
                lambda conn, timeout: self._open_watch(conn, prefix, next_revision, timeout))
            try:
                while True:
                    try:
                        response = await stream.next_response()
                    except _StreamBroken as exc:
                        log.warning("etcd watch of %s broke (%s); resuming from revision %d", what, exc,
                                    next_revision)
                        break
                    for event in response.events:
                        # A response holds whole revisions (no fragmenting asked for), so once it
                        # is read, resuming from the last revision seen + 1 repeats and skips nothing.
                        next_revision = event.kv.mod_revision + 1
                        converted = convert(event)
                        if converted is not None:
                            yield converted
            finally:
                await stream.close()
            self._advance(stream.index)
            # A stream that worked for a while is one break; streams that die at once, one after
            # another on every endpoint, mean etcd will not serve us: let the caller back off.
            quick_breaks = 1 if stream.answered else quick_breaks + 1
            if quick_breaks > 2 * len(self._endpoints):
                raise StoreUnavailable(f"etcd watch keeps breaking on every endpoint ({self._endpoint_list()})")
            if quick_breaks > len(self._endpoints):
                await asyncio.sleep(0.2 * quick_breaks)

    async def _open_watch(self, conn: _Connection, prefix: bytes, revision: int, timeout: float) -> _WatchStream:
        stream = _WatchStream(conn, self.progress_interval, self.stale_after)
        request = rpc_pb2.WatchCreateRequest(key=prefix, range_end=prefix_end(prefix), start_revision=revision)
        try:
            await stream.create(request, timeout)
        except asyncio.TimeoutError:
            await stream.close()
            raise _rpc_error(grpc.StatusCode.DEADLINE_EXCEEDED, "watch not created in time") from None
        except _StreamBroken as exc:
            await stream.close()
            raise _rpc_error(grpc.StatusCode.UNAVAILABLE, str(exc)) from None
        except BaseException:
            await stream.close()
            raise
        return stream

    # ---------------------------------------------------------------- shared machinery

    async def close(self) -> None:
        self._closed = True
        connections, self._connections = list(self._connections.values()), {}
        for conn in connections:
            await conn.channel.close()

    async def _grant(self, ttl: int) -> int:
        lease_id = random.randint(1, _MAX_LEASE_ID)
        tries_of_this_id = 0

        async def attempt(conn: _Connection, timeout: float) -> int:
            nonlocal lease_id, tries_of_this_id
            tries_of_this_id += 1
            try:
                response = await conn.lease.LeaseGrant(rpc_pb2.LeaseGrantRequest(TTL=ttl, ID=lease_id),
                                                       timeout=timeout, metadata=REQUIRE_LEADER)
            except grpc.aio.AioRpcError as exc:
                if "lease already exists" not in (exc.details() or ""):
                    raise
                if tries_of_this_id > 1:
                    return lease_id  # an earlier attempt of ours got through; its reply was lost
                # Another lease has this ID (odds 2**-63): pick another and go round again.
                lease_id, tries_of_this_id = random.randint(1, _MAX_LEASE_ID), 0
                raise _rpc_error(grpc.StatusCode.UNAVAILABLE, "lease ID taken") from None
            if response.error:
                raise StoreError(f"{conn.endpoint.url}: lease grant refused: {response.error}")
            return response.ID
        return await self._request(f"grant a {ttl} s etcd lease", attempt)

    async def _revoke_quietly(self, lease_id: int) -> None:
        async def attempt(conn: _Connection, timeout: float) -> None:
            await conn.lease.LeaseRevoke(rpc_pb2.LeaseRevokeRequest(ID=lease_id), timeout=timeout,
                                         metadata=REQUIRE_LEADER)
        try:
            await self._request(f"revoke etcd lease {lease_id:x}", attempt)
        except LeaseLost:
            pass  # already gone
        except (StoreUnavailable, StoreError) as exc:
            log.warning("could not revoke unused etcd lease %x (it will expire by itself): %s", lease_id, exc)

    async def _create(self, what: str, key: bytes, value: bytes, lease_id: int) -> tuple[bool, int]:
        """Txn If(version(key)==0) Then(put) Else(range): (created, revision of the put)."""
        txn = rpc_pb2.TxnRequest(
            compare=[rpc_pb2.Compare(key=key, target=rpc_pb2.Compare.VERSION, result=rpc_pb2.Compare.EQUAL,
                                     version=0)],
            success=[rpc_pb2.RequestOp(request_put=rpc_pb2.PutRequest(key=key, value=value, lease=lease_id))],
            failure=[rpc_pb2.RequestOp(request_range=rpc_pb2.RangeRequest(key=key))])

        async def attempt(conn: _Connection, timeout: float) -> tuple[bool, int]:
            response = await conn.kv.Txn(txn, timeout=timeout, metadata=REQUIRE_LEADER)
            if response.succeeded:
                return True, response.header.revision
            kvs = response.responses[0].response_range.kvs
            if lease_id and kvs and kvs[0].lease == lease_id and kvs[0].value == value:
                return True, kvs[0].mod_revision  # an earlier attempt of ours landed; its reply was lost
            return False, 0
        return await self._request(what, attempt)

    def _connection(self, index: int) -> _Connection:
        if self._closed:
            raise StoreError("the etcd store is closed")
        conn = self._connections.get(index)
        if conn is None:
            endpoint = self._endpoints[index]
            conn = _Connection(index, endpoint, self._channel_credentials() if endpoint.scheme == "https" else None)
            self._connections[index] = conn
        return conn

    def _channel_credentials(self) -> grpc.ChannelCredentials:
        if self._credentials is None:
            def read(path: Path | None) -> bytes | None:
                if path is None:
                    return None
                try:
                    return Path(path).read_bytes()
                except OSError as exc:
                    raise StoreError(f"cannot read TLS file {path}: {exc.strerror}") from None
            self._credentials = grpc.ssl_channel_credentials(
                root_certificates=read(self.settings.ca_file),
                private_key=read(self.settings.key_file),
                certificate_chain=read(self.settings.cert_file))
        return self._credentials

    def _advance(self, failed: int) -> None:
        # Concurrent requests failing on the same endpoint move on once, not once each.
        if self._current == failed:
            self._current = (failed + 1) % len(self._endpoints)

    def _endpoint_list(self) -> str:
        return ", ".join(endpoint.url for endpoint in self._endpoints)

    async def _request(self, what: str, attempt: Callable[[_Connection, float], Awaitable[T]],
                       attempt_timeout: float | None = None) -> T:
        """Run attempt(connection, timeout) until it succeeds, failing over on transient errors."""
        per_attempt = min(self.attempt_timeout, attempt_timeout or self.attempt_timeout)
        loop = asyncio.get_running_loop()
        budget = self.settings.request_timeout
        deadline = loop.time() + budget
        pause = 0.05
        failures = 0
        last_problem = "no attempt made"
        while True:
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise StoreUnavailable(f"could not {what}: no etcd endpoint answered within {budget:.1f} s "
                                       f"(tried {self._endpoint_list()}; last: {last_problem})")
            index = self._current
            conn = self._connection(index)
            try:
                return await attempt(conn, min(remaining, per_attempt))
            except grpc.aio.AioRpcError as exc:
                if not is_transient(exc):
                    raise refusal(f"could not {what}", conn.endpoint, exc) from None
                last_problem = _describe(conn.endpoint, exc)
                log.debug("could not %s: %s; trying the next endpoint", what, last_problem)
            self._advance(index)
            failures += 1
            if failures % len(self._endpoints) == 0:
                # Every endpoint failed once in a row: a moment for an election or a restart.
                await asyncio.sleep(min(pause, max(0.0, deadline - loop.time())))
                pause = min(0.5, pause * 2)
