"""ADD / CHECK / DEL latency of our plugin against the reference bridge + host-local, same run.

    sudo .venv/bin/python -m bench.cni_bench [--rounds 30] [--concurrent 20] [--bursts 7]

Both plugins are exec'd exactly as a runtime does (CNI environment, config on stdin) from a
process already inside one host namespace (`ovl-ct-bench-h`), so both pay the same exec cost;
our warm service runs standalone in that namespace. Each attachment gets a fresh container
namespace (made outside the timed section). Rounds interleave the two plugins so that machine
noise hits both alike; so do the bursts of concurrent ADDs (each a fresh set of namespaces, all
deleted again before the next), whose addresses are checked to be distinct. Prints medians in
milliseconds; asserts nothing else.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

HOST_NS = "ovl-ct-bench-h"
REFERENCE_DIR = "/usr/lib/cni"


def _ip(*args, check=True):
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=check)


def _run(executable: str, command: str, config: dict, container_id: str, netns: str | None):
    env = {"CNI_COMMAND": command, "CNI_CONTAINERID": container_id, "CNI_IFNAME": "eth0", "CNI_PATH": REFERENCE_DIR}
    if netns:
        env["CNI_NETNS"] = netns
    stdin = json.dumps(config).encode()
    started = time.perf_counter()
    done = subprocess.run([executable], input=stdin, env=env, capture_output=True)
    elapsed = time.perf_counter() - started
    if done.returncode != 0:
        raise RuntimeError(f"{executable} {command} failed: {done.stdout.decode()} {done.stderr.decode()}")
    return elapsed * 1e3, done.stdout.decode()


def _exec(executable: str, command: str, config: dict, container_id: str, netns: str | None) -> float:
    return _run(executable, command, config, container_id, netns)[0]


def _exec_result(executable: str, command: str, config: dict, container_id: str, netns: str | None) -> str:
    return _run(executable, command, config, container_id, netns)[1]


def _children_cpu() -> float:
    """CPU seconds (user + system) of every child waited for so far: the plugins, and what
    they ran (the reference bridge runs host-local)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _process_cpu(pid: int) -> float:
    """CPU seconds (user + system) of a running process so far: our service."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _add_prev(config: dict, result_json: str) -> dict:
    return {**config, "prevResult": json.loads(result_json)}


def inner(rounds: int, concurrent: int, bursts: int, work: Path) -> None:
    """Runs inside HOST_NS."""
    from cni.install import install
    from overlay.subnetfile import SubnetFile, write_subnet_file
    from ipaddress import IPv4Interface, IPv4Network

    run_dir = work / "run"
    write_subnet_file(run_dir, SubnetFile(IPv4Network("10.244.0.0/16"), IPv4Interface("10.244.7.1/24"), 1450, True))
    ours, _ = install(work / "bin", work / "net.d", str(run_dir))
    service = subprocess.Popen([sys.executable, "-m", "cni.service", "--run-dir", str(run_dir), "--log-level", os.environ.get("CNI_BENCH_LOG", "WARNING")],
                               cwd=Path(__file__).resolve().parents[1], stderr=open(work / "service.log", "wb"))
    deadline = time.monotonic() + 20
    while not (run_dir / "cni.sock").exists():
        if time.monotonic() > deadline or service.poll() is not None:
            raise RuntimeError("our CNI service did not start")
        time.sleep(0.02)
    plugins = {
        "ours": (str(ours), {"cniVersion": "1.0.0", "name": "bench-ours", "type": "overlay", "runDir": str(run_dir)}),
        "reference": (f"{REFERENCE_DIR}/bridge", {
            "cniVersion": "1.0.0", "name": "bench-ref", "type": "bridge", "bridge": "ovl-ct-ref0",
            "isGateway": True, "isDefaultGateway": True, "mtu": 1450,
            "ipam": {"type": "host-local", "ranges": [[{"subnet": "10.245.7.0/24"}]],
                     "dataDir": str(work / "host-local")}}),
    }
    namespaces = []

    def new_netns(label: str) -> str:
        name = f"ovl-ct-bench-{label}"
        _ip("netns", "add", name)
        namespaces.append(name)
        return f"/run/netns/{name}"

    timings = {name: {"ADD": [], "CHECK": [], "DEL": []} for name in plugins}
    try:
        # one warm-up attachment each (bridge creation, page cache)
        for name, (executable, config) in plugins.items():
            path = new_netns(f"w{name[0]}")
            _exec(executable, "ADD", config, f"warm-{name}", path)
            _exec(executable, "DEL", config, f"warm-{name}", path)
        for n in range(rounds):
            for name, (executable, config) in plugins.items():
                path = new_netns(f"{name[0]}{n}")
                cid = f"bench-{name}-{n}"
                env = {"CNI_COMMAND": "ADD", "CNI_CONTAINERID": cid, "CNI_NETNS": path, "CNI_IFNAME": "eth0",
                       "CNI_PATH": REFERENCE_DIR}
                started = time.perf_counter()
                done = subprocess.run([executable], input=json.dumps(config).encode(), env=env, capture_output=True)
                timings[name]["ADD"].append((time.perf_counter() - started) * 1e3)
                if done.returncode:
                    raise RuntimeError(f"{name} ADD failed: {done.stdout.decode()}")
                checked = _add_prev(config, done.stdout.decode())
                timings[name]["CHECK"].append(_exec(executable, "CHECK", checked, cid, path))
                timings[name]["DEL"].append(_exec(executable, "DEL", checked, cid, path))
        burst = {name: [] for name in plugins}
        burst_cpu = {name: [] for name in plugins}
        for b in range(bursts):
            for name, (executable, config) in plugins.items():
                paths = [new_netns(f"c{name[0]}{b}-{n}") for n in range(concurrent)]
                children_before = _children_cpu()
                service_before = _process_cpu(service.pid) if name == "ours" else 0.0
                started = time.perf_counter()
                with ThreadPoolExecutor(concurrent) as pool:
                    results = list(pool.map(
                        lambda n: _exec_result(executable, "ADD", config, f"burst-{name}-{b}-{n}", paths[n]),
                        range(concurrent)))
                burst[name].append((time.perf_counter() - started) * 1e3)
                plugins_cpu = (_children_cpu() - children_before) * 1e3 / concurrent
                service_cpu = ((_process_cpu(service.pid) - service_before) * 1e3 / concurrent
                               if name == "ours" else 0.0)
                burst_cpu[name].append((plugins_cpu, service_cpu))
                addresses = [json.loads(r)["ips"][0]["address"] for r in results]
                if len(set(addresses)) != len(addresses):
                    raise RuntimeError(f"{name}: duplicate addresses in a burst: {sorted(addresses)}")
                with ThreadPoolExecutor(concurrent) as pool:
                    list(pool.map(lambda n: _exec(executable, "DEL", config, f"burst-{name}-{b}-{n}", paths[n]),
                                  range(concurrent)))
                for path in paths:
                    name_ = path.rsplit("/", 1)[1]
                    _ip("netns", "del", name_, check=False)
                    namespaces.remove(name_)
    finally:
        for name in namespaces:
            _ip("netns", "del", name, check=False)
        service.terminate()
        service.wait(10)

    print(f"{'median ms':<12}{'ours':>10}{'reference':>12}{'ratio':>8}")
    for command in ("ADD", "CHECK", "DEL"):
        a, b = statistics.median(timings["ours"][command]), statistics.median(timings["reference"][command])
        print(f"{command:<12}{a:>10.1f}{b:>12.1f}{a / b:>8.2f}")
    a, b = statistics.median(burst["ours"]), statistics.median(burst["reference"])
    # Each burst of ours runs right before one of the reference: the two see the same noise,
    # so the median of their ratios is steadier than the ratio of the medians.
    paired = statistics.median(x / y for x, y in zip(burst["ours"], burst["reference"]))
    print(f"{concurrent} concurrent ADDs, total ms (median of {bursts}): ours {a:.0f}, reference {b:.0f}, "
          f"ratio {a / b:.2f} (median of paired ratios {paired:.2f})")
    print(f"  each burst, ours: {' '.join(f'{x:.0f}' for x in burst['ours'])}; "
          f"reference: {' '.join(f'{x:.0f}' for x in burst['reference'])}")
    ours_plugin = statistics.median(p for p, _ in burst_cpu["ours"])
    ours_service = statistics.median(s for _, s in burst_cpu["ours"])
    reference_cpu = statistics.median(p for p, _ in burst_cpu["reference"])
    print(f"  CPU per ADD in the bursts, ms: ours {ours_plugin + ours_service:.1f} (plugin {ours_plugin:.1f}, "
          f"service {ours_service:.1f}), reference {reference_cpu:.1f} (bridge and host-local)")
    print(f"({rounds} rounds, {bursts} bursts, cniVersion 1.0.0, each attachment in a fresh namespace)")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--concurrent", type=int, default=20)
    parser.add_argument("--bursts", type=int, default=7, help="concurrent bursts per plugin (interleaved)")
    parser.add_argument("--inner", metavar="WORKDIR", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.inner:
        inner(args.rounds, args.concurrent, args.bursts, Path(args.inner))
        return 0
    if os.geteuid() != 0:
        print("needs root (network namespaces)", file=sys.stderr)
        return 2
    _ip("netns", "add", HOST_NS)
    try:
        with tempfile.TemporaryDirectory(prefix="ovl-ct-bench-") as work:
            return subprocess.run(["ip", "netns", "exec", HOST_NS, sys.executable, "-m", "bench.cni_bench",
                                   "--rounds", str(args.rounds), "--concurrent", str(args.concurrent),
                                   "--bursts", str(args.bursts),
                                   "--inner", work], cwd=Path(__file__).resolve().parents[1]).returncode
    finally:
        _ip("netns", "del", HOST_NS, check=False)


if __name__ == "__main__":
    sys.exit(main())
