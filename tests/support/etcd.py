"""Real etcd servers for the integration tests, started on loopback and stopped afterwards."""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from overlay.etcd_server import EtcdProcess, EtcdTLS, loopback_members, start_cluster, stop_cluster


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
