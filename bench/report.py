"""The Markdown table and the plots, regenerated from the JSON results and nothing else.

Design notes
- `write_report(results_dir)` reads every <name>.json there and writes README.md (the table a
  user reads; the top README links it) and one PNG per benchmark beside it. It runs at the end
  of every benchmark and on its own (`bench report`), so the table never holds a figure that is
  not in a JSON file, and a figure is never typed by hand.
- Cells show the median and, in brackets, the spread the JSON holds (p5-p95, which with few runs
  is close to min-max), and n where it is small. Ratios are medians of per-round ratios.
- Plots use matplotlib's Agg backend (no display); error bars are p5..p95.
- moves (issue 7) has its own section and plot here, like the four lab benchmarks.
- A benchmark this module does not know (the CNI one, written by its own module) is shown from
  its `table` field: {"title", "columns": [...], "rows": [[...], ...], "notes": [...]}, and its
  `plot` field (a PNG file name beside the JSON) when it drew one.
"""

from __future__ import annotations

from pathlib import Path

from .common import P99_SAMPLES, read_results

ORDER = ("throughput", "latency", "convergence", "scale", "cni", "moves")
PATH_ORDER = ("container", "handmade_container", "overlay", "handmade", "underlay")
SHORT = {"container": "containers, ours", "handmade_container": "containers, hand-built",
         "overlay": "hosts, ours", "handmade": "hosts, hand-built", "underlay": "underlay"}


def _num(value, digits: int = 2) -> str:
    if value is None:
        return "–"
    if isinstance(value, float) and value != value:
        return "–"
    return f"{value:.{digits}f}"


def cell(stat: dict | None, digits: int = 2, scale: float = 1.0) -> str:
    if not stat or not stat.get("n"):
        return "–"
    text = f"{stat['median'] * scale:.{digits}f} [{stat['p5'] * scale:.{digits}f}–{stat['p95'] * scale:.{digits}f}]"
    return text + (f" n={stat['n']}" if stat["n"] < 3 else "")


def high(stat: dict | None, digits: int = 1) -> str:
    """The high tail of a figure: its p99 when there are enough samples for one, else the maximum,
    said to be the maximum of n (of 10 samples, the maximum is below the true p99 9 times in 10)."""
    if not stat or not stat.get("n"):
        return "–"
    if stat["n"] >= P99_SAMPLES:
        return _num(stat.get("p99"), digits)
    return f"{_num(stat.get('max'), digits)} (max of {stat['n']})"


def _table(columns: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return lines


def _ratio_label(key: str) -> str:
    a, b = key.split("/")
    return f"{SHORT.get(a, a)} / {SHORT.get(b, b)}"


def _first_end(path_info: dict) -> dict:
    devices = path_info.get("devices", {})
    return next(iter(devices.values()), {})


def _verdict(met) -> str:
    return "not tested at that size" if met is None else ("met" if met else "NOT met")


def _throughput_verdict(target: dict, mode: str) -> str:
    """"tcp1 met (1.014, 95% CI of the median 0.99–1.03: decided)" and the like."""
    text = f"{mode} {_verdict(target['met'][mode])}"
    interval = target.get("ci95", {}).get(mode)
    if not interval:
        return text
    how = "decided" if target["decided"][mode] else "within noise: the interval holds 0.98"
    return f"{text} ({_num(target['median'][mode], 3)}, 95% CI of the median {_num(interval[0], 3)}–{_num(interval[1], 3)}: {how})"


def _machine_line(payload: dict) -> str:
    m = payload.get("machine", {})
    return (f"_Run {payload.get('started', '?')} on {m.get('cpus', '?')} CPUs ({m.get('cpu_model', '?')}), "
            f"kernel {m.get('kernel', '?')}, load average at start {m.get('loadavg_at_start', '?')}._")


# ------------------------------------------------------------------------------- sections

def throughput_section(p: dict) -> list[str]:
    opts = p.get("options", {})
    labs = p.get("labs") or [p.get("lab")]
    out = ["## Throughput (iperf3, Gbit/s)", "",
           f"Between two lab hosts, container to container and host to host; {opts.get('repeats')} rounds of "
           f"{opts.get('seconds')} s per mode and path over {len(labs)} fresh lab{'s' if len(labs) > 1 else ''}, "
           "paths interleaved; ours and the hand-built VXLAN (hosts, and containers) back to back in ABBA "
           "order, the other ratios from the same rounds"
           + ("; client on CPU 0 and server on CPU 1"
              if opts.get("pin_cpus") and p.get("machine", {}).get("cpus", 1) >= 2 else "")
           + f". UDP: unlimited rate, {p.get('udp_datagram_bytes')}-byte datagrams on every path. "
           + (f"A run's figure is the receiver's steady rate, the median of its {opts['interval']} s intervals "
              "(a burst of another tenant's load on this shared machine drags a whole-run mean down on one side "
              "of a pair at random; whole-run means are in the JSON). " if opts.get("interval") else
              "A run's figure is the receiver's rate. ")
           + "Median [p5–p95] over rounds; ratios are medians of per-round ratios.", ""]
    results = p.get("results", {})
    paths = [name for name in PATH_ORDER if name in p.get("paths", {})]
    first = next(iter(results.values()), {})
    ratio_keys = list(first.get("ratios", {}))
    columns = ["mode"] + [SHORT.get(name, name) for name in paths] + [_ratio_label(k) for k in ratio_keys]
    rows = []
    for mode in ("tcp1", "tcp4", "udp"):
        if mode not in results:
            continue
        r = results[mode]
        label = {"tcp1": "TCP, 1 stream", "tcp4": "TCP, 4 streams", "udp": "UDP"}[mode]
        rows.append([label] + [cell(r["paths"][name]["gbps"]) for name in paths]
                    + [cell(r["ratios"].get(key), 3) for key in ratio_keys])
    out += _table(columns, rows)
    out += ["", "Paths: " + "; ".join(f"**{SHORT.get(name, name)}**: {p['paths'][name]['label']}, "
                                      f"{p['paths'][name]['client']} → {p['paths'][name]['server']}, MTU "
                                      f"{_first_end(p['paths'][name]).get('mtu')}" for name in paths) + "."]
    for key in ("overlay_vs_handmade_setting_differences", "container_vs_handmade_setting_differences"):
        if key in p:
            out += [f"Settings that differ, {key.split('_vs_')[0]} vs hand-built: "
                    f"{'; '.join(p[key]) or 'none (MTU, VXLAN flags, offloads all equal)'}."]
    overlay = p.get("paths", {}).get("overlay")
    if overlay:
        out += [f"Offloads on our VXLAN device: {', '.join(_first_end(overlay).get('offloads_on', [])) or 'none'}."]
    target = p.get("target", {})
    if target:
        out += [f"Target {target.get('what')}: " + "; ".join(
            _throughput_verdict(target, mode) for mode in target.get("met", {})) + "."]
        by_lab = {mode: r.get("ratios_by_lab", {}).get(target.get("pair", ""), {}) for mode, r in results.items()}
        if any(len(labs_) > 1 for labs_ in by_lab.values()):
            out += ["The same ratio, lab by lab (median of that lab's rounds): " + "; ".join(
                f"{mode} " + ", ".join(_num(s.get("median"), 3) for s in labs_.values())
                for mode, labs_ in by_lab.items() if labs_) + "."]
    cost = p.get("vxlan_filter_cost")
    if cost:
        out += [f"Cost of the VXLAN source filter (a per-packet nftables lookup the hand-built path does not have): "
                f"UDP {_ratio_label(cost['pair'])} {cell(cost['with_filter'], 3)} with it, "
                f"{cell(cost['without_filter'], 3)} without it ({len(cost['with_filter_runs'])} rounds each after "
                "the table's rounds, daemons stopped, their filter table loaded and deleted in turn, ABBA)."]
    for name, why in p.get("not_measured", {}).items():
        out += [f"Not measured: {name} ({why})."]
    return out + ["", _machine_line(p), "", "![throughput](throughput.png)", ""]


def latency_section(p: dict) -> list[str]:
    opts = p.get("options", {})
    out = ["## Latency", "",
           f"ping: {opts.get('pings')} echoes {opts.get('interval')} s apart per run; request/response: "
           f"1-byte TCP round trips on one connection for {opts.get('rr_seconds')} s (bench/rr.py); "
           f"{opts.get('repeats')} rounds, paths interleaved. Median [p5–p95] across rounds.", ""]
    results = p.get("results", {})
    rows = []
    for name in PATH_ORDER:
        if name not in results:
            continue
        r = results[name]
        rows.append([SHORT.get(name, name), cell(r["ping_p50_us"], 0), cell(r["ping_p99_us"], 0),
                     f"{r['ping_lost']}/{r['ping_sent']}", cell(r["rr_rate_per_s"], 0), cell(r["rr_p50_us"], 1),
                     cell(r["rr_p99_us"], 1)])
    out += _table(["path", "ping p50 (µs)", "ping p99 (µs)", "lost", "TCP RR (trans/s)", "RR p50 (µs)",
                   "RR p99 (µs)"], rows)
    ratios = p.get("ratios", {})
    out += ["", "Ratios (per round): " + "; ".join(f"{key} {cell(value, 3)}" for key, value in ratios.items()) + "."]
    for name, why in p.get("not_measured", {}).items():
        out += [f"Not measured: {name} ({why})."]
    return out + ["", _machine_line(p), "", "![latency](latency.png)", ""]


def convergence_section(p: dict) -> list[str]:
    opts = p.get("options", {})
    out = ["## Convergence", "",
           "A newcomer joins a lab of N hosts (N-1 observers): from its lease being in etcd to its "
           "route, neighbour and FDB entry on every observer (kernel notifications stamped by `ip -ts "
           "monitor`). The lease's moment is the earlier of our own etcd watch seeing it and the first "
           "kernel object of it on any observer: at 20 and 50 hosts our watch, on the same 2 CPUs, mostly "
           "hears of it after the first daemon has acted, so the figure leaves out that fastest observer's "
           f"own delivery (~1-2 ms at N=2). {opts.get('joins')} joins per N. Ready: daemon start to /readyz "
           "200 (includes the interpreter's start-up). Median [p5–p95]; beside it the p99, or with fewer than "
           f"{P99_SAMPLES} samples the maximum.", ""]
    rows = []
    for size, s in sorted(p.get("sizes", {}).items(), key=lambda item: int(item[0])):
        conv = s["converged_all_ms"]
        rows.append([size, cell(conv, 1), high(conv, 1), cell(s["converged_median_observer_ms"], 1),
                     cell(s["removed_all_ms"], 1), cell(s["ready_s"], 2), high(s["ready_s"], 2)])
    out += _table(["hosts N", "on every other host (ms)", "p99 / max (ms)", "median observer (ms)",
                   "lease deleted → removed everywhere (ms)", "start → ready (s)", "ready p99 / max (s)"], rows)
    target = p.get("target", {})
    if target:
        at = p.get("sizes", {}).get(str(target.get("hosts")), {}).get("converged_all_ms", {})
        if at.get("n", 0) >= P99_SAMPLES:
            out += ["", f"Target {target.get('what')}: p99 {target.get('p99_ms')} ms at {target.get('hosts')} "
                        f"hosts, {_verdict(target.get('met'))}."]
        elif at:
            # Too few joins for a p99: judged on the slowest one, which is above the p99 of these.
            out += ["", f"Target {target.get('what')}: {at['n']} joins are too few for a p99; the slowest of "
                        f"them took {_num(at.get('max'), 1)} ms at {target.get('hosts')} hosts, "
                        f"{_verdict(at.get('max', float('inf')) < target.get('limit_ms', 200))}."]
    return out + ["", _machine_line(p), "", "![convergence](convergence.png)", ""]


def scale_section(p: dict) -> list[str]:
    opts = p.get("options", {})
    out = ["## Scale (one daemon, fake peers written straight into etcd)", "",
           f"{opts.get('repeats')} live programming runs per size (from the last etcd write acknowledged to "
           "the kernel's notification of the last route, `ip -ts monitor`), one "
           "change = one lease added, to its route notification from our own etcd watch seeing it (which on "
           "a busy machine can hear of it after the daemon, hence negative p5s) and from the put's answer "
           "(an upper bound: it includes etcd's own delivery), "
           f"{opts.get('changes')} per size; idle CPU over {opts.get('idle_seconds')} s"
           + (f", from {opts['idle_settle']} s after the size's other measurements (its first read-back, a "
              "one-off of programming, comes before)" if opts.get("idle_settle") else "")
           + "; floor = `ip -batch` + "
           "`bridge -batch` programming the same peers, same run.", ""]
    rows = []
    for size, s in sorted(p.get("sizes", {}).items(), key=lambda item: int(item[0])):
        rows.append([size, cell(s["program_from_last_write_s"], 3), cell(s["cold_start_routes_s"], 3),
                     cell(s["ip_batch_floor"]["seconds"], 3), _num(s.get("ratio_program_to_ip_batch"), 1),
                     cell(s["one_change_add_ms"], 1), cell(s.get("one_change_add_from_put_ms"), 1),
                     high(s.get("one_change_add_from_put_ms") or s["one_change_add_ms"], 1),
                     cell(s["one_change_add_reconcile_ms"], 1), cell(s["remove_all_s"], 3),
                     _num(s["rss_mb_live"].get("VmHWM"), 1), _num(s["idle_cpu"].get("percent_overall"), 2)])
    out += _table(["peers", "program all (s)", "cold start → all routes (s)", "ip -batch floor (s)",
                   "ours / floor", "one change, from our watch (ms)", "from the etcd put (ms)",
                   "from the put, p99 / max (ms)", "daemon reconcile for it (ms)",
                   "remove all (s)", "peak RSS (MB)", "idle CPU (%)"], rows)
    targets = p.get("targets", {})
    if targets:
        out += ["", f"Targets at {targets.get('peers')} peers: " + "; ".join(
            f"{key.replace('_', ' ')}: {_verdict(ok)}" for key, ok in targets.items() if key != "peers") + "."]
    return out + ["", _machine_line(p), "", "![scale](scale.png)", ""]


def moves_section(p: dict) -> list[str]:
    opts = p.get("options", {})
    out = ["## Moves (a container keeps its address on another host)", "",
           f"{opts.get('hosts', p.get('hosts'))} lab hosts, one container each; one container moves host to host "
           f"{opts.get('moves', len(p.get('moves', [])))} times (DEL on the old host, ADD with `IP=` its address on "
           "the next). Reach: from ADD returning on the new host until every other container's `ping -D -i 0.005` "
           "at the address is answered (iputils' wall-clock stamps; negative = answered before ADD returned); "
           "the slowest container is the move's figure. TCP pause: the longest gap between round trips of an "
           "8-byte echo every 10 ms from a container on a third host, across the move, on one connection that "
           f"must survive. Median [p5–p95] over moves and the maximum beside (a p99 from {P99_SAMPLES} moves "
           "on).", ""]
    rows = []
    for label, key in (("attach → every other container answers (ms)", "reach_all_ms"),
                       ("attach → median container answers (ms)", "reach_median_ms"),
                       ("TCP longest pause across the move (ms)", "tcp_longest_pause_ms"),
                       ("DEL on the old host (ms)", "del_ms"), ("ADD on the new host (ms)", "add_ms")):
        stat = p.get(key)
        if not stat:
            continue
        rows.append([label, cell(stat, 1), _num(stat.get("p99"), 1) if stat.get("n", 0) >= P99_SAMPLES else "–",
                     _num(stat.get("max"), 1)])
    out += _table(["per move", "median [p5–p95]", "p99", "max"], rows)
    target = p.get("target", {})
    if target:
        met = target.get("met", {})
        out += ["", f"Target {target.get('what')}: reach {_verdict(met.get('reach'))}, "
                    f"TCP pause {_verdict(met.get('tcp_pause'))}."]
    return out + ["", _machine_line(p), "", "![moves](moves.png)", ""]


def generic_section(name: str, p: dict) -> list[str]:
    table = p.get("table") or {}
    out = [f"## {table.get('title', name)}", ""]
    if table.get("columns"):
        out += _table(table["columns"], table.get("rows", []))
    for note in table.get("notes", []):      # each note a paragraph of its own
        out += ["", note]
    if p.get("machine"):
        out += ["", _machine_line(p)]
    if p.get("plot"):
        out += ["", f"![{name}]({p['plot']})"]
    return out + [""]


SECTIONS = {"throughput": throughput_section, "latency": latency_section,
            "convergence": convergence_section, "scale": scale_section, "moves": moves_section}


# ------------------------------------------------------------------------------- plots

def _plt():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _err(stats: list[dict], scale: float = 1.0):
    medians = [s.get("median", 0) * scale for s in stats]
    low = [max(0.0, (s.get("median", 0) - s.get("p5", 0)) * scale) for s in stats]
    high = [max(0.0, (s.get("p95", 0) - s.get("median", 0)) * scale) for s in stats]
    return medians, [low, high]


def plot_throughput(p: dict, path: Path) -> None:
    plt = _plt()
    results = p["results"]
    modes = [m for m in ("tcp1", "tcp4", "udp") if m in results]
    paths = [name for name in PATH_ORDER if name in p["paths"]]
    fig, ax = plt.subplots(figsize=(8, 4.5))
    width = 0.8 / max(1, len(paths))
    for index, name in enumerate(paths):
        medians, err = _err([results[m]["paths"][name]["gbps"] for m in modes])
        ax.bar([i + index * width for i in range(len(modes))], medians, width, yerr=err, capsize=3,
               label=SHORT.get(name, name))
    ax.set_xticks([i + width * (len(paths) - 1) / 2 for i in range(len(modes))])
    ax.set_xticklabels([{"tcp1": "TCP 1 stream", "tcp4": "TCP 4 streams", "udp": "UDP"}[m] for m in modes])
    ax.set_ylabel("Gbit/s (median, p5–p95)")
    ax.set_title("Throughput between two lab hosts")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_latency(p: dict, path: Path) -> None:
    plt = _plt()
    results = p["results"]
    paths = [name for name in PATH_ORDER if name in results]
    labels = [SHORT.get(name, name).replace(", ", "\n") for name in paths]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    for offset, key, label in ((-0.2, "ping_p50_us", "p50"), (0.2, "ping_p99_us", "p99")):
        medians, err = _err([results[name][key] for name in paths])
        left.bar([i + offset for i in range(len(paths))], medians, 0.4, yerr=err, capsize=3, label=label)
    left.set_xticks(range(len(paths)))
    left.set_xticklabels(labels, fontsize=8)
    left.set_ylabel("ping RTT (µs)")
    left.legend()
    medians, err = _err([results[name]["rr_rate_per_s"] for name in paths])
    right.bar(range(len(paths)), medians, 0.6, yerr=err, capsize=3, color="tab:green")
    right.set_xticks(range(len(paths)))
    right.set_xticklabels(labels, fontsize=8)
    right.set_ylabel("1-byte TCP transactions / s")
    fig.suptitle("Latency between two lab hosts (median, p5–p95)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_convergence(p: dict, path: Path) -> None:
    plt = _plt()
    sizes = sorted(p["sizes"], key=int)
    xs = [int(s) for s in sizes]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    conv = [p["sizes"][s]["converged_all_ms"] for s in sizes]
    left.plot(xs, [c["median"] for c in conv], "o-", label="median")
    left.plot(xs, [c.get("p99", c["max"]) for c in conv], "s--", label="p99")
    left.fill_between(xs, [c["min"] for c in conv], [c["max"] for c in conv], alpha=0.2, label="min–max")
    left.axhline(200, color="red", linestyle=":", label="target p99 at 50 hosts")
    left.set_xlabel("hosts")
    left.set_ylabel("lease in etcd → on every other host (ms)")
    left.legend(fontsize=8)
    ready = [p["sizes"][s]["ready_s"] for s in sizes]
    medians, err = _err(ready)
    right.errorbar(xs, medians, yerr=err, fmt="o-", capsize=3)
    right.set_xlabel("hosts")
    right.set_ylabel("daemon start → ready (s)")
    fig.suptitle("Convergence of a newcomer (median, spread)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_scale(p: dict, path: Path) -> None:
    plt = _plt()
    sizes = sorted(p["sizes"], key=int)
    xs = [int(s) for s in sizes]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    for key, label, fmt in (("program_from_last_write_s", "ours, live", "o-"),
                            ("cold_start_routes_s", "ours, cold start", "s-")):
        medians, err = _err([p["sizes"][s][key] for s in sizes])
        left.errorbar(xs, medians, yerr=err, fmt=fmt, capsize=3, label=label)
    medians, err = _err([p["sizes"][s]["ip_batch_floor"]["seconds"] for s in sizes])
    left.errorbar(xs, medians, yerr=err, fmt="^--", capsize=3, label="ip -batch floor")
    left.set_yscale("log")
    left.set_xlabel("peers")
    left.set_ylabel("time to program every peer (s)")
    left.legend(fontsize=8)
    medians, err = _err([p["sizes"][s]["one_change_add_ms"] for s in sizes])
    right.errorbar(xs, medians, yerr=err, fmt="o-", capsize=3, label="one change, etcd → route")
    medians, err = _err([p["sizes"][s]["one_change_add_reconcile_ms"] for s in sizes])
    right.errorbar(xs, medians, yerr=err, fmt="s--", capsize=3, label="daemon's reconcile for it")
    right.set_xlabel("peers")
    right.set_ylabel("ms")
    right.legend(fontsize=8)
    fig.suptitle("One daemon at scale (median, p5–p95)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_moves(p: dict, path: Path) -> None:
    plt = _plt()
    moves = p.get("moves", [])
    xs = list(range(1, len(moves) + 1))
    fig, ax = plt.subplots(figsize=(8, 4))
    ax.plot(xs, [m["reach_all_ms"] for m in moves], "o-", label="attach → every other container answers")
    ax.plot(xs, [m["reach_median_ms"] for m in moves], "s:", label="attach → median container answers")
    ax.plot(xs, [m["tcp_longest_pause_ms"] for m in moves], "^--", label="TCP longest pause")
    ax.axhline(p.get("target", {}).get("ms", 1000), color="red", linestyle=":", label="target")
    ax.set_xticks(xs)
    ax.set_xticklabels([f"{m['from']}→{m['to']}" for m in moves], fontsize=8)
    ax.set_ylabel("ms")
    ax.set_yscale("symlog", linthresh=10)
    ax.set_ylim(top=3 * p.get("target", {}).get("ms", 1000))
    ax.set_title(f"A container moving between hosts ({p.get('hosts')} hosts)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


PLOTS = {"throughput": plot_throughput, "latency": plot_latency, "convergence": plot_convergence,
         "scale": plot_scale, "moves": plot_moves}


def write_report(results_dir: Path) -> Path:
    results = read_results(results_dir)
    lines = ["# Benchmark results", "",
             "Generated by `overlayctl bench` (or `python -m bench`) from the JSON files in this directory; "
             "do not edit by hand. Regenerate the table and plots alone with `overlayctl bench report`. "
             "Each figure is the median of repeated runs with its spread [p5–p95]; every comparison is a "
             "ratio measured within one run.", "",
             "Paths: **containers, ours** = a container on each of two lab hosts attached by our CNI plugin, "
             "across our VXLAN device; **containers, hand-built** = the same topology (bridge, veth, same MTU) "
             "made with iproute2 across a VXLAN device made with iproute2 (the kernel's limit); **hosts, ours** "
             "/ **hosts, hand-built** = the host namespaces' own addresses on those two VXLAN devices; "
             "**underlay** = host to host without VXLAN.", ""]
    names = [name for name in ORDER if name in results] + sorted(set(results) - set(ORDER))
    if not names:
        lines += ["No results yet: run `overlayctl bench all`.", ""]
    for name in names:
        payload = results[name]
        section = SECTIONS.get(name)
        lines += section(payload) if section else generic_section(name, payload)
        plot = PLOTS.get(name)
        if plot is not None:
            plot(payload, results_dir / f"{name}.png")
    readme = results_dir / "README.md"
    results_dir.mkdir(parents=True, exist_ok=True)
    readme.write_text("\n".join(lines).rstrip() + "\n")
    return readme
