"""The daemon's HTTP endpoints: /healthz, /readyz and /metrics (Prometheus text format).

A few lines of asyncio instead of a web framework: the daemon serves three tiny documents, and
start-up time matters more than routing features.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field

log = logging.getLogger(__name__)


@dataclass
class DaemonStatus:
    """What the daemon knows about itself; mutated only by the daemon's own event loop."""
    started_at: float = field(default_factory=time.monotonic)
    data_plane_ready: bool = False      # programmed at least once and subnet file written
    in_sync: bool = False               # the last reconcile left nothing to change or failed nothing
    store_reachable: bool = False       # the last etcd call succeeded
    peers: int = 0
    reconcile_runs: int = 0
    reconcile_failures: int = 0
    reconcile_seconds_total: float = 0.0
    last_reconcile_seconds: float = 0.0
    changes_applied: int = 0
    lease_expires_at: float | None = None   # monotonic time
    subnet: str = ""
    problem: str = "starting"           # why not ready, for /readyz

    @property
    def ready(self) -> bool:
        return self.data_plane_ready and self.in_sync and self.store_reachable

    def lease_seconds_left(self) -> float:
        if self.lease_expires_at is None:
            return 0.0
        return max(0.0, self.lease_expires_at - time.monotonic())

    def metrics_text(self) -> str:
        gauges = [
            ("overlay_ready", "1 when the data plane is programmed, in sync and etcd is reachable", int(self.ready)),
            ("overlay_in_sync", "1 when the last reconcile found the kernel matching the desired state", int(self.in_sync)),
            ("overlay_etcd_reachable", "1 when the last etcd call succeeded", int(self.store_reachable)),
            ("overlay_peers", "peer hosts programmed into the kernel", self.peers),
            ("overlay_lease_seconds_left", "seconds until this host's subnet lease expires unless renewed",
             round(self.lease_seconds_left(), 3)),
            ("overlay_last_reconcile_duration_seconds", "duration of the last reconcile run",
             round(self.last_reconcile_seconds, 6)),
        ]
        counters = [
            ("overlay_reconcile_runs_total", "reconcile runs", self.reconcile_runs),
            ("overlay_reconcile_failures_total", "reconcile runs that failed", self.reconcile_failures),
            ("overlay_reconcile_duration_seconds_total", "time spent reconciling",
             round(self.reconcile_seconds_total, 6)),
            ("overlay_kernel_changes_total", "kernel objects created, replaced or deleted", self.changes_applied),
        ]
        lines = []
        for name, help_text, value in gauges:
            lines += [f"# HELP {name} {help_text}", f"# TYPE {name} gauge", f"{name} {value}"]
        for name, help_text, value in counters:
            lines += [f"# HELP {name} {help_text}", f"# TYPE {name} counter", f"{name} {value}"]
        return "\n".join(lines) + "\n"


async def serve_health(status: DaemonStatus, host: str, port: int) -> asyncio.base_events.Server:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            request_line = await asyncio.wait_for(reader.readline(), 5)
            while (await asyncio.wait_for(reader.readline(), 5)) not in (b"\r\n", b"\n", b""):
                pass  # headers are not needed
            parts = request_line.decode("latin-1").split()
            path = parts[1].split("?")[0] if len(parts) >= 2 else ""
            if path == "/healthz":
                code, body = 200, "ok\n"
            elif path == "/readyz":
                code, body = (200, "ready\n") if status.ready else (503, f"not ready: {status.problem}\n")
            elif path == "/metrics":
                code, body = 200, status.metrics_text()
            else:
                code, body = 404, "not found: try /healthz, /readyz or /metrics\n"
            reason = {200: "OK", 404: "Not Found", 503: "Service Unavailable"}[code]
            content_type = "text/plain; version=0.0.4" if path == "/metrics" else "text/plain"
            payload = body.encode()
            writer.write(f"HTTP/1.1 {code} {reason}\r\nContent-Type: {content_type}\r\n"
                         f"Content-Length: {len(payload)}\r\nConnection: close\r\n\r\n".encode() + payload)
            await writer.drain()
        except (asyncio.TimeoutError, ConnectionError):
            pass
        finally:
            writer.close()

    return await asyncio.start_server(handle, host, port, reuse_address=True)
