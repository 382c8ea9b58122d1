"""ADD / CHECK / DEL latency of our plugin against the reference bridge + host-local, same run.

    sudo .venv/bin/python -m bench.cni_bench [--rounds 30] [--concurrent 20] [--bursts 7]
    sudo .venv/bin/overlayctl bench cni          # the same, into bench/results/cni.json + the table

Both plugins are exec'd exactly as a runtime does (CNI environment, config on stdin) from a
process already inside one host namespace (`ovl-ct-bench-h`), so both pay the same exec cost;
our warm service runs standalone in that namespace. Each attachment gets a fresh container
namespace (made outside the timed section). Rounds interleave the two plugins, which goes first
alternating from round to round (in_turn), so that machine noise and the kernel's clean-up after
the previous round hit both alike; so do the bursts of concurrent ADDs (each a fresh set of namespaces, all
deleted again before the next), whose addresses are checked to be distinct. In the bursts each
call is timed too (ADD, then CHECK and DEL of the same attachments, each 20 at once), beside the
burst's total. main() prints medians in milliseconds; asserts nothing else.

run(results_dir, smoke, progress) is the entry `overlayctl bench cni` uses (bench.cli): the same
measurement, into `<results_dir>/cni.json` with the raw samples, summaries (median, p5, p95, p99),
ratios ours/reference (medians of per-round ratios: each round of ours sits next to one of the
reference), a `table` for bench/results/README.md and a plot (cni.png). Namespaces carry a random
tag per run, so two runs (a smoke test beside a full run) never meet.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import secrets
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

HOST_NS = "ovl-ct-bench-h"
NS_PREFIX = "ovl-ct-bench-"
REFERENCE_DIR = "/usr/lib/cni"
FULL = {"rounds": 30, "concurrent": 20, "bursts": 7}
SMOKE = {"rounds": 3, "concurrent": 4, "bursts": 1}


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


def in_turn(plugins: dict, round_index: int) -> list:
    """The plugins of one round, the order reversed every other round: whichever goes second
    meets the kernel still cleaning up after the first (namespaces, veths), so each side goes
    first equally often."""
    items = list(plugins.items())
    return items if round_index % 2 == 0 else items[::-1]


def _add_prev(config: dict, result_json: str) -> dict:
    return {**config, "prevResult": json.loads(result_json)}


def inner(rounds: int, concurrent: int, bursts: int, work: Path, tag: str = "") -> dict:
    """Runs inside the host namespace; returns the samples (and writes them to work/samples.json)."""
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
        name = f"{NS_PREFIX}{tag}{label}"
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
            for name, (executable, config) in in_turn(plugins, n):
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
        burst_calls = {name: {"ADD": [], "CHECK": [], "DEL": []} for name in plugins}
        for b in range(bursts):
            for name, (executable, config) in in_turn(plugins, b):
                paths = [new_netns(f"c{name[0]}{b}-{n}") for n in range(concurrent)]
                children_before = _children_cpu()
                service_before = _process_cpu(service.pid) if name == "ours" else 0.0
                started = time.perf_counter()
                with ThreadPoolExecutor(concurrent) as pool:
                    timed = list(pool.map(
                        lambda n: _run(executable, "ADD", config, f"burst-{name}-{b}-{n}", paths[n]),
                        range(concurrent)))
                burst[name].append((time.perf_counter() - started) * 1e3)
                results = [out for _, out in timed]
                burst_calls[name]["ADD"] += [ms for ms, _ in timed]
                plugins_cpu = (_children_cpu() - children_before) * 1e3 / concurrent
                service_cpu = ((_process_cpu(service.pid) - service_before) * 1e3 / concurrent
                               if name == "ours" else 0.0)
                burst_cpu[name].append((plugins_cpu, service_cpu))
                addresses = [json.loads(r)["ips"][0]["address"] for r in results]
                if len(set(addresses)) != len(addresses):
                    raise RuntimeError(f"{name}: duplicate addresses in a burst: {sorted(addresses)}")
                with ThreadPoolExecutor(concurrent) as pool:
                    burst_calls[name]["CHECK"] += list(pool.map(
                        lambda n: _exec(executable, "CHECK", _add_prev(config, results[n]), f"burst-{name}-{b}-{n}",
                                        paths[n]), range(concurrent)))
                with ThreadPoolExecutor(concurrent) as pool:
                    burst_calls[name]["DEL"] += list(pool.map(
                        lambda n: _exec(executable, "DEL", _add_prev(config, results[n]), f"burst-{name}-{b}-{n}",
                                        paths[n]), range(concurrent)))
                for path in paths:
                    name_ = path.rsplit("/", 1)[1]
                    _ip("netns", "del", name_, check=False)
                    namespaces.remove(name_)
    finally:
        for name in namespaces:
            _ip("netns", "del", name, check=False)
        service.terminate()
        service.wait(10)

    samples = {"rounds": rounds, "concurrent": concurrent, "bursts": bursts, "sequential": timings,
               "burst_total": burst, "burst_calls": burst_calls,
               "burst_cpu": {name: [{"plugins": p, "service": s} for p, s in values]
                             for name, values in burst_cpu.items()}}
    (work / "samples.json").write_text(json.dumps(samples))
    print_summary(samples)
    return samples


def print_summary(samples: dict) -> None:
    """What main() has always printed."""
    timings, burst = samples["sequential"], samples["burst_total"]
    rounds, concurrent, bursts = samples["rounds"], samples["concurrent"], samples["bursts"]
    burst_cpu = {name: [(v["plugins"], v["service"]) for v in values] for name, values in samples["burst_cpu"].items()}
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
    parser.add_argument("--tag", default="", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.inner:
        inner(args.rounds, args.concurrent, args.bursts, Path(args.inner), args.tag)
        return 0
    if os.geteuid() != 0:
        print("needs root (network namespaces)", file=sys.stderr)
        return 2
    return measure(args.rounds, args.concurrent, args.bursts)[0]


def measure(rounds: int, concurrent: int, bursts: int, tag: str = "", capture: bool = False) -> tuple[int, dict | None, str]:
    """Make the host namespace, run inner() in it, remove it: (exit code, samples or None, its output
    when captured)."""
    host_ns = f"{NS_PREFIX}{tag}h" if tag else HOST_NS
    _ip("netns", "add", host_ns)
    try:
        with tempfile.TemporaryDirectory(prefix=NS_PREFIX) as work:
            done = subprocess.run(["ip", "netns", "exec", host_ns, sys.executable, "-m", "bench.cni_bench",
                                   "--rounds", str(rounds), "--concurrent", str(concurrent), "--bursts", str(bursts),
                                   "--inner", work, "--tag", tag], cwd=Path(__file__).resolve().parents[1],
                                  capture_output=capture, text=True)
            raw = Path(work) / "samples.json"
            samples = json.loads(raw.read_text()) if done.returncode == 0 and raw.exists() else None
            return done.returncode, samples, (done.stdout or "") + (done.stderr or "")
    finally:
        _ip("netns", "del", host_ns, check=False)


# ------------------------------------------------------------------------------- overlayctl bench cni

def _ratios(ours: list[float], reference: list[float]) -> list[float]:
    return [a / b for a, b in zip(ours, reference) if b > 0]


def _fmt(stat: dict, digits: int = 1) -> str:
    if not stat.get("n"):
        return "–"
    return f"{stat['median']:.{digits}f} [{stat['p5']:.{digits}f}–{stat['p95']:.{digits}f}]"


def digest(samples: dict) -> dict:
    """Summaries and ratios from the raw samples (what cni.json carries beside them)."""
    from .common import summary
    out: dict = {"sequential": {}, "concurrent": {}}
    for command in ("ADD", "CHECK", "DEL"):
        seq = {name: summary(samples["sequential"][name][command], tail=True, digits=3) for name in ("ours", "reference")}
        seq["ratio"] = summary(_ratios(samples["sequential"]["ours"][command],
                                       samples["sequential"]["reference"][command]), digits=3)
        out["sequential"][command] = seq
        con = {name: summary(samples["burst_calls"][name][command], tail=True, digits=3) for name in ("ours", "reference")}
        # calls of a burst are not paired one to one: the ratio of the medians of the same bursts
        con["ratio_of_medians"] = (round(con["ours"]["median"] / con["reference"]["median"], 3)
                                   if con["ours"].get("n") and con["reference"].get("n") else None)
        out["concurrent"][command] = con
    out["burst_total_ms"] = {name: summary(samples["burst_total"][name], tail=True, digits=3)
                             for name in ("ours", "reference")}
    out["burst_total_ms"]["ratio"] = summary(_ratios(samples["burst_total"]["ours"],
                                                     samples["burst_total"]["reference"]), digits=3)
    cpu = samples["burst_cpu"]
    out["cpu_per_add_ms"] = {
        "ours_plugin": summary([v["plugins"] for v in cpu["ours"]], digits=3),
        "ours_service": summary([v["service"] for v in cpu["ours"]], digits=3),
        "ours_total": summary([v["plugins"] + v["service"] for v in cpu["ours"]], digits=3),
        "reference": summary([v["plugins"] for v in cpu["reference"]], digits=3)}
    return out


def table(samples: dict, figures: dict) -> dict:
    from .common import P99_SAMPLES
    from .report import high
    concurrent = samples["concurrent"]
    rows = []
    for command in ("ADD", "CHECK", "DEL"):
        s = figures["sequential"][command]
        rows.append([f"{command}, one at a time", _fmt(s["ours"]), high(s["ours"], 1),
                     _fmt(s["reference"]), high(s["reference"], 1), _fmt(s["ratio"], 2)])
    for command in ("ADD", "CHECK", "DEL"):
        c = figures["concurrent"][command]
        ratio = c["ratio_of_medians"]
        rows.append([f"{command}, {concurrent} at once (each call)", _fmt(c["ours"]), high(c["ours"], 1),
                     _fmt(c["reference"]), high(c["reference"], 1),
                     "–" if ratio is None else f"{ratio:.2f} (of medians)"])
    b = figures["burst_total_ms"]
    rows.append([f"{concurrent} ADDs at once, whole burst", _fmt(b["ours"], 0), high(b["ours"], 0),
                 _fmt(b["reference"], 0), high(b["reference"], 0), _fmt(b["ratio"], 2)])
    cpu = figures["cpu_per_add_ms"]
    ratio = (cpu["ours_total"]["median"] / cpu["reference"]["median"]
             if cpu["ours_total"].get("n") and cpu["reference"].get("median") else None)
    rows.append(["CPU per ADD in the bursts (ms)", f"{_fmt(cpu['ours_total'])} (plugin {cpu['ours_plugin'].get('median', 0):.1f}, "
                 f"service {cpu['ours_service'].get('median', 0):.1f})", "–", _fmt(cpu["reference"]), "–",
                 "–" if ratio is None else f"{ratio:.2f} (of medians)"])
    return {
        "title": "CNI plugin: ADD / CHECK / DEL, ours vs the reference bridge + host-local",
        "columns": ["operation", "ours (ms)", "ours p99 / max (ms)", "reference (ms)", "reference p99 / max (ms)",
                    "ours / reference"],
        "rows": rows,
        "notes": [
            f"Both plugins exec'd as a runtime does (CNI environment, config on stdin, cniVersion 1.0.0) from "
            f"the same host namespace, each attachment in a fresh container namespace made outside the timed "
            f"section; our service warm and standalone. Reference: Debian's `bridge` with `host-local` IPAM "
            f"({REFERENCE_DIR}). {samples['rounds']} rounds of ADD, CHECK, DEL one at a time, the two plugins "
            f"interleaved, each going first in every other round; {samples['bursts']} bursts of {concurrent} "
            "concurrent ADDs per plugin (interleaved the same way), "
            f"then CHECK and DEL of those {concurrent} at once, each call timed, addresses checked distinct.",
            f"Median [p5–p95] in ms, and the p99, or with fewer than {P99_SAMPLES} samples the maximum. Ratios: medians of "
            "per-round ratios where rounds pair ours with the reference (one at a time, whole bursts); for "
            "single calls within bursts, which do not pair, the ratio of the medians. CPU: user + system of "
            "the plugin processes (and, for ours, of the service) per ADD.",
        ],
    }


def plot(samples: dict, figures: dict, path: Path) -> None:
    from .report import _err, _plt
    plt = _plt()
    labels = [f"{c}\none at a time" for c in ("ADD", "CHECK", "DEL")] + \
             [f"{c}\n{samples['concurrent']} at once" for c in ("ADD", "CHECK", "DEL")]
    stats = {name: [figures["sequential"][c][name] for c in ("ADD", "CHECK", "DEL")]
             + [figures["concurrent"][c][name] for c in ("ADD", "CHECK", "DEL")] for name in ("ours", "reference")}
    fig, ax = plt.subplots(figsize=(9, 4.5))
    for offset, name in ((-0.2, "ours"), (0.2, "reference")):
        medians, err = _err(stats[name])
        ax.bar([i + offset for i in range(len(labels))], medians, 0.4, yerr=err, capsize=3,
               label="ours" if name == "ours" else "reference bridge + host-local")
        ax.plot([i + offset for i in range(len(labels))], [s.get("p99", 0) for s in stats[name]], "k_",
                markersize=12)
    ax.set_xticks(range(len(labels)))
    ax.set_xticklabels(labels, fontsize=8)
    ax.set_ylabel("ms per call (median, p5–p95; dash: p99)")
    ax.set_title("CNI plugin latency")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run(results_dir: Path, smoke: bool = False, progress=None) -> dict:
    """`overlayctl bench cni`: measure, write <results_dir>/cni.json (and cni.png), return the payload."""
    from .common import Progress, machine, now_iso, write_result
    progress = progress or Progress("cni")
    sizes = SMOKE if smoke else FULL
    tag = "".join(secrets.choice("abcdefghijklmnopqrstuvwxyz0123456789") for _ in range(3)) + "-"
    payload = {"benchmark": "cni", "started": now_iso(), "machine": machine(), "options": dict(sizes),
               "namespace_tag": tag}
    progress(f"ours vs reference: {sizes['rounds']} rounds of ADD/CHECK/DEL, {sizes['bursts']} bursts of "
             f"{sizes['concurrent']} concurrent (namespaces {NS_PREFIX}{tag}*)")
    code, samples, output = measure(sizes["rounds"], sizes["concurrent"], sizes["bursts"], tag=tag, capture=True)
    if code != 0 or samples is None:
        raise RuntimeError(f"the CNI benchmark failed (exit {code}): {output.strip()[-2000:]}")
    for line in output.strip().splitlines():
        progress(line)
    figures = digest(samples)
    results_dir.mkdir(parents=True, exist_ok=True)
    plot(samples, figures, results_dir / "cni.png")
    payload.update({"results": figures, "samples_ms": samples, "table": table(samples, figures), "plot": "cni.png",
                    "finished": now_iso()})
    path = write_result(results_dir, "cni", payload)
    progress(f"wrote {path}")
    return payload


if __name__ == "__main__":
    sys.exit(main())
