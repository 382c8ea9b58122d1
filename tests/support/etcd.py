"""Real etcd servers for the integration tests, started on loopback and stopped afterwards."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

import pytest

from overlay.etcd_server import (ETCDCTL_BINARY, PKI, EtcdProcess, EtcdTLS, loopback_members, make_test_pki,
                                 start_cluster, stop_cluster)


@contextmanager
def running_etcd(base_dir: Path, members: int = 1, tls: EtcdTLS | None = None) -> Iterator[list[EtcdProcess]]:
    """A new cluster of `members` real etcd members on 127.0.0.1; killed on exit, also on failure."""
    processes = start_cluster(loopback_members(members, base_dir, tls=tls), base_dir / "logs")
    try:
        yield processes
    finally:
        stop_cluster(processes)


def client_urls(processes: list[EtcdProcess]) -> str:
    """The comma-separated endpoints flag value for a cluster."""
    return ",".join(process.member.client_url for process in processes)


# -------------------------------------------------------------------- etcdctl, an independent client

def etcdctl(endpoints: str, *args: str, tls: PKI | None = None, timeout: float = 10.0) -> str:
    """Run `etcdctl` (API v3) against endpoints and return its stdout; raise on failure.

    The store's tests check what etcd holds with etcd's own client, not with the code under test.
    """
    argv = [ETCDCTL_BINARY, "--endpoints", endpoints, "--dial-timeout", "3s", "--command-timeout", "5s"]
    if tls is not None:
        argv += ["--cacert", str(tls.ca_cert), "--cert", str(tls.client_cert), "--key", str(tls.client_key)]
    result = subprocess.run([*argv, *args], stdin=subprocess.DEVNULL, capture_output=True, text=True,
                            timeout=timeout, env={**os.environ, "ETCDCTL_API": "3"})
    if result.returncode != 0:
        raise AssertionError(f"etcdctl {' '.join(args)} failed: {result.stderr.strip()}")
    return result.stdout


def leader_index(processes: list[EtcdProcess]) -> int:
    """Index in processes of the current leader, asked of every running member (`endpoint status`)."""
    running = [process for process in processes if process.running]
    statuses = json.loads(etcdctl(client_urls(running), "endpoint", "status", "-w", "json"))
    leaders = {status["Status"]["leader"] for status in statuses}
    for status in statuses:
        if status["Status"]["header"]["member_id"] in leaders:
            url = status["Endpoint"]
            return next(index for index, process in enumerate(processes) if process.member.client_url == url)
    raise AssertionError(f"no member reports itself leader: {statuses}")


def lease_ids(endpoints: str, tls: PKI | None = None) -> set[int]:
    """IDs of every etcd lease alive now."""
    out = json.loads(etcdctl(endpoints, "lease", "list", "-w", "json", tls=tls))
    return {lease["id"] for lease in out.get("leases") or []}


def raw_get(endpoints: str, key: str, tls: PKI | None = None) -> dict | None:
    """The key's KeyValue as etcdctl reports it (key and value decoded), or None."""
    out = json.loads(etcdctl(endpoints, "get", key, "-w", "json", tls=tls))
    kvs = out.get("kvs") or []
    if not kvs:
        return None
    kv = dict(kvs[0])
    kv["key"] = base64.b64decode(kv["key"]).decode()
    kv["value"] = base64.b64decode(kv.get("value", "")).decode()
    return kv


def wait_until(predicate: Callable[[], bool], timeout: float, what: str, interval: float = 0.05) -> None:
    """Poll predicate until it is true; fail naming what was awaited after timeout seconds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)  # poll interval, not a wait for a condition


# -------------------------------------------------------------------- fixtures

@pytest.fixture
def etcd_pki(tmp_path) -> PKI:
    """A throw-away CA with server and client certificates for 127.0.0.1."""
    return make_test_pki(tmp_path / "pki", ["127.0.0.1"])


@pytest.fixture
def etcd_tls(tmp_path, etcd_pki):
    """One real etcd member on 127.0.0.1 requiring client certificates; yields (URL, PKI)."""
    with running_etcd(tmp_path / "etcd-tls", tls=etcd_pki.server_tls()) as processes:
        yield client_urls(processes), etcd_pki
