"""Latency: ping RTT p50/p99 and a TCP request/response rate over ours, the underlay, hand-built VXLAN.

Design notes
- Same lab and paths as throughput (bench.paths), so the three are side by side in one run.
- ping: `ping -i 0.01 -c COUNT` (root may go below 0.2 s), one RTT per reply line parsed from the
  output; per run the p50 and p99 of those RTTs, then the median and spread of those across
  rounds. Lost replies are counted, not hidden.
- request/response: bench.rr (1-byte TCP round trips on one connection for a fixed time), the
  server in the other host's namespace bound to the path's address. Rate (transactions/s) and
  per-transaction p50/p99.
- Rounds rotate the path order; the ratio ours / hand-built (RTT and rate) is taken per round.
"""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
from dataclasses import dataclass

from overlay.lab import Lab

from .common import Progress, bench_lab, machine, now_iso, percentile, summary, write_result
from .paths import COMPARISONS, NetPath, all_paths, ns_exec, ns_spawn

RR_BASE_PORT = 7301
_RTT = re.compile(r"time=([0-9.]+) ms")
_SENT = re.compile(r"(\d+) packets transmitted, (\d+) received")


@dataclass(frozen=True)
class LatencyOptions:
    pings: int = 200
    interval: float = 0.01
    rr_seconds: float = 5.0
    repeats: int = 5

    @classmethod
    def smoke(cls) -> "LatencyOptions":
        return cls(pings=20, interval=0.01, rr_seconds=0.5, repeats=1)


def ping_run(path: NetPath, options: LatencyOptions) -> dict:
    result = ns_exec(path.client.netns, ["ping", "-n", "-i", str(options.interval), "-c", str(options.pings),
                                         "-W", "1", "-I", str(path.client.address), str(path.server.address)],
                      timeout=options.pings * (options.interval + 0.05) + 30)
    rtts = [float(value) for value in _RTT.findall(result.stdout)]
    counts = _SENT.search(result.stdout)
    sent, received = (int(counts[1]), int(counts[2])) if counts else (options.pings, len(rtts))
    return {"p50_ms": percentile(rtts, 50), "p99_ms": percentile(rtts, 99), "sent": sent,
            "lost": sent - received}


def _start_rr_servers(lab: Lab, paths: list[NetPath]) -> dict[str, tuple[subprocess.Popen, int]]:
    servers = {}
    for offset, path in enumerate(paths):
        port = RR_BASE_PORT + offset
        process = ns_spawn(path.server.netns, [sys.executable, "-m", "bench.rr", "serve",
                                               str(path.server.address), str(port)],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        servers[path.name] = (process, port)
    for name, (process, _) in servers.items():
        line = process.stdout.readline()
        if line.strip() != "listening":
            raise RuntimeError(f"request/response server for {name} did not start")
    return servers


def rr_run(path: NetPath, port: int, options: LatencyOptions) -> dict:
    result = ns_exec(path.client.netns, [sys.executable, "-m", "bench.rr", "client", str(path.server.address),
                                         str(port), str(options.rr_seconds), "--bind", str(path.client.address)],
                      timeout=options.rr_seconds + 60, check=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


def run(results_dir, options: LatencyOptions | None = None, progress: Progress | None = None) -> dict:
    options = options or LatencyOptions()
    progress = progress or Progress("latency")
    payload = {"benchmark": "latency", "started": now_iso(), "machine": machine(),
               "options": options.__dict__, "not_measured": {}}
    with bench_lab() as lab:
        payload["lab"] = lab.name
        progress(f"lab {lab.name}: 2 hosts, etcd, 2 daemons")
        lab.up(hosts=2)
        lab.wait_converged(timeout=120)
        paths, payload["not_measured"] = all_paths(lab)
        payload["paths"] = {path.name: {"label": path.label, "client": str(path.client.address),
                                        "server": str(path.server.address)} for path in paths}
        # One ping each way first: ARP on the underlay is resolved before anything is timed.
        for path in paths:
            ns_exec(path.client.netns, ["ping", "-n", "-q", "-c", "1", "-W", "2", str(path.server.address)])
        servers = _start_rr_servers(lab, paths)
        pings = {path.name: [] for path in paths}
        rrs = {path.name: [] for path in paths}
        try:
            for round_index in range(options.repeats):
                shift = round_index % len(paths)
                for path in paths[shift:] + paths[:shift]:
                    sample = ping_run(path, options)
                    pings[path.name].append(sample)
                    rr = rr_run(path, servers[path.name][1], options)
                    rrs[path.name].append(rr)
                    progress(f"round {round_index + 1}/{options.repeats} {path.name:9} ping p50 "
                             f"{sample['p50_ms'] * 1000:6.0f} us p99 {sample['p99_ms'] * 1000:6.0f} us, "
                             f"rr {rr['rate_per_s']:8.0f}/s")
        finally:
            for process, _ in servers.values():
                process.send_signal(signal.SIGTERM)
            for process, _ in servers.values():
                try:
                    process.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()
    results = {}
    for path in paths:
        name = path.name
        results[name] = {
            "ping_p50_us": summary([s["p50_ms"] * 1000 for s in pings[name]], digits=1),
            "ping_p99_us": summary([s["p99_ms"] * 1000 for s in pings[name]], digits=1),
            "ping_lost": sum(s["lost"] for s in pings[name]),
            "ping_sent": sum(s["sent"] for s in pings[name]),
            "rr_rate_per_s": summary([r["rate_per_s"] for r in rrs[name]], digits=1),
            "rr_p50_us": summary([r["p50_us"] for r in rrs[name]], digits=1),
            "rr_p99_us": summary([r["p99_us"] for r in rrs[name]], digits=1),
            "runs": {"ping": pings[name], "rr": rrs[name]},
        }

    def ratio(samples: dict[str, list[dict]], key: str, a: str, b: str) -> dict:
        """Per round: a's figure over b's, from the two runs of that round."""
        return summary([x[key] / y[key] for x, y in zip(samples[a], samples[b]) if y[key] > 0])

    payload["results"] = results
    payload["ratios"] = {}
    for a, b in COMPARISONS:
        if a in pings and b in pings:
            payload["ratios"][f"ping p50 {a}/{b}"] = ratio(pings, "p50_ms", a, b)
            payload["ratios"][f"rr rate {a}/{b}"] = ratio(rrs, "rate_per_s", a, b)
    payload["finished"] = now_iso()
    written = write_result(results_dir, "latency", payload)
    progress(f"wrote {written}")
    return payload

