"""What every benchmark shares: statistics, progress lines, result files, and its own lab.

Design notes
- Statistics are plain functions over lists of floats: percentiles by linear interpolation
  between order statistics (the "R7" definition numpy uses by default), so p50 of an even-sized
  sample is the mean of the middle two. `summary()` is the one shape every figure takes in the
  JSON: n, median, p5, p95, min, max (p99 where a tail matters). With few samples p5/p95 sit
  close to min/max; n is always reported so a reader can tell. `median_ci()` says how far a
  median can be trusted: the order statistics that bracket the true median with 95%
  probability whatever the distribution (binomial), so a verdict near a threshold can say it
  is within noise instead of flipping from run to run.
- Progress goes to stderr as `[  12.3 s] bench name: what`, so stdout stays clean for a caller.
- `bench_lab()` is the only way a benchmark gets a lab: a random name "b" + 3 characters (lab
  names are at most 4, everything the lab makes is `ovl-<name>-*`), and `teardown(name)` in a
  finally, after the Lab's own down, so even an interrupted run leaves nothing behind.
- Results: `write_result()` adds the machine (kernel, CPUs, load average before the run) and the
  time, writes `<dir>/<name>.json` atomically, and returns the path.
"""

from __future__ import annotations

import json
import math
import os
import platform
import secrets
import subprocess
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

from overlay.lab import Lab, teardown

RESULTS_DIR = Path(__file__).resolve().parent / "results"
_NAME_CHARS = "abcdefghijklmnopqrstuvwxyz0123456789"


# ------------------------------------------------------------------------------- statistics

P99_SAMPLES = 100   # fewer samples than this: their p99 is about their maximum, and is said to be one


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100), interpolating linearly between order statistics."""
    if not values:
        return math.nan
    ordered = sorted(values)
    position = (len(ordered) - 1) * q / 100.0
    low = math.floor(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def median_ci(values: Sequence[float], confidence: float = 0.95) -> tuple[float, float] | None:
    """A distribution-free confidence interval of the median: the order statistics (k, n+1-k)
    with the largest k for which a Binomial(n, 1/2) falls below k with probability at most
    (1 - confidence) / 2. None when n is too small for that confidence (n < 6 at 95%)."""
    ordered = sorted(float(v) for v in values)
    n = len(ordered)
    tail, below = (1.0 - confidence) / 2, 0.0
    k = 0
    while k < n // 2:
        below += math.comb(n, k) / 2.0 ** n     # P(X <= k) for X ~ Binomial(n, 1/2)
        if below > tail:
            break
        k += 1
    return (ordered[k - 1], ordered[n - k]) if k else None


def summary(values: Sequence[float], tail: bool = False, digits: int = 6) -> dict:
    """n, median, p5, p95, min, max (and p99 when tail) of values, rounded to `digits`."""
    values = [float(v) for v in values if v is not None and not math.isnan(v)]
    if not values:
        return {"n": 0}
    out = {"n": len(values), "median": percentile(values, 50), "p5": percentile(values, 5),
           "p95": percentile(values, 95), "min": min(values), "max": max(values)}
    if tail:
        out["p99"] = percentile(values, 99)
    return {key: (round(value, digits) if isinstance(value, float) else value) for key, value in out.items()}


# ------------------------------------------------------------------------------- progress

@dataclass
class Progress:
    """Timestamped progress lines on stderr; quiet=True keeps them (for tests) without printing."""
    name: str
    quiet: bool = False
    started: float = field(default_factory=time.monotonic)
    lines: list[str] = field(default_factory=list)

    def __call__(self, message: str) -> None:
        line = f"[{time.monotonic() - self.started:7.1f} s] {self.name}: {message}"
        self.lines.append(line)
        if not self.quiet:
            print(line, file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------- the lab

def lab_name() -> str:
    return "b" + "".join(secrets.choice(_NAME_CHARS) for _ in range(3))


@contextmanager
def bench_lab() -> Iterator[Lab]:
    """A fresh lab under a random name, always torn down (also on KeyboardInterrupt)."""
    name = lab_name()
    try:
        with Lab(name) as lab:
            yield lab
    finally:
        teardown(name)


# ------------------------------------------------------------------------------- the machine

def machine() -> dict:
    """What the figures were measured on: they mean little without it."""
    try:
        load = os.getloadavg()
    except OSError:
        load = (math.nan,) * 3
    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    versions = {}
    for tool, argv in (("iperf3", ["iperf3", "--version"]), ("iproute2", ["ip", "-V"]),
                       ("etcd", ["etcd", "--version"])):
        try:
            out = subprocess.run(argv, capture_output=True, text=True, timeout=10).stdout
            versions[tool] = out.splitlines()[0].strip() if out else ""
        except (OSError, subprocess.SubprocessError):
            versions[tool] = None
    return {"kernel": platform.release(), "cpus": os.cpu_count(), "cpu_model": model,
            "python": platform.python_version(), "loadavg_at_start": [round(x, 2) for x in load],
            "tools": versions}


# ------------------------------------------------------------------------------- results

def write_result(results_dir: Path, name: str, payload: dict) -> Path:
    results_dir.mkdir(parents=True, exist_ok=True)
    path = results_dir / f"{name}.json"
    tmp = path.with_name(f".{name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(payload, indent=2, sort_keys=False) + "\n")
    os.replace(tmp, path)
    return path


def read_results(results_dir: Path) -> dict[str, dict]:
    """Every <name>.json in results_dir, by name (unreadable files are skipped)."""
    found = {}
    if results_dir.is_dir():
        for path in sorted(results_dir.glob("*.json")):
            try:
                found[path.stem] = json.loads(path.read_text())
            except (OSError, ValueError):
                continue
    return found


def now_iso() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")
