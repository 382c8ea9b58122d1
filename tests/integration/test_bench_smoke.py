"""A short run of every benchmark (tiny sizes), so the benchmarks cannot rot.

Each runs through the same entry as `overlayctl bench --smoke WHICH` in its own lab, into a
temporary results directory (never bench/results, which holds the full runs). Only the structure
of what comes out is checked: JSON with the figures a reader needs, plots, the table. Never a
timing: these are figures of a noisy 2-core machine, and the full runs report them.
"""

from __future__ import annotations

import json
import math
import subprocess

import pytest
from click.testing import CliRunner

from bench.cli import bench_command
from bench.common import percentile, summary
from overlay.lab import lab_names


def _stat_ok(stat: dict, n: int | None = None) -> bool:
    return (stat.get("n", 0) >= 1 and all(math.isfinite(stat[k]) for k in ("median", "p5", "p95", "min", "max"))
            and stat["min"] <= stat["median"] <= stat["max"] and (n is None or stat["n"] == n))


def test_summary_statistics():
    assert percentile([1, 2, 3, 4], 50) == 2.5
    assert percentile([5], 99) == 5
    stats = summary([3, 1, 2], tail=True)
    assert (stats["n"], stats["median"], stats["min"], stats["max"]) == (3, 2, 1, 3) and "p99" in stats
    assert summary([]) == {"n": 0}


@pytest.fixture(scope="module")
def smoke_results(tmp_path_factory):
    results = tmp_path_factory.mktemp("bench-results")
    outcome = CliRunner().invoke(bench_command, ["all", "--smoke", "--quiet", "--results-dir", str(results)],
                                 catch_exceptions=False)
    assert outcome.exit_code == 0, outcome.output
    # Every benchmark tore its own lab down (cni makes namespaces of its own, not a lab).
    payloads = {path.stem: json.loads(path.read_text()) for path in results.glob("*.json")}
    assert set(payloads) == {"throughput", "latency", "convergence", "scale", "cni", "moves"}
    made = {payload["lab"] for payload in payloads.values() if "lab" in payload}
    made |= set(payloads["throughput"]["labs"])    # throughput may use several
    assert len(made) == 5 and not made & set(lab_names())
    tag = payloads["cni"]["namespace_tag"]
    left = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert f"ovl-ct-bench-{tag}" not in left
    return results


def load(results, name: str) -> dict:
    return json.loads((results / f"{name}.json").read_text())


def test_throughput_smoke(smoke_results):
    payload = load(smoke_results, "throughput")
    paths = set(payload["paths"])
    assert paths >= {"overlay", "underlay", "handmade"}
    # Container paths come in pairs (ours and hand-built), or are named as not measured.
    assert {"container", "handmade_container"} <= paths or "container" in payload["not_measured"]
    assert payload["paths"]["overlay"]["devices"]["h1"]["mtu"] == payload["paths"]["handmade"]["devices"]["h1"]["mtu"]
    assert "offloads_on" in payload["paths"]["overlay"]["devices"]["h1"]
    for mode in ("tcp1", "tcp4", "udp"):
        result = payload["results"][mode]
        for path in paths:
            assert _stat_ok(result["paths"][path]["gbps"], n=1)
            assert result["paths"][path]["gbps"]["median"] > 0
        assert _stat_ok(result["ratios"]["overlay/handmade"])
        if "container" in paths:
            assert _stat_ok(result["ratios"]["container/handmade_container"])
    target = payload["target"]            # one round: a verdict, and no interval to decide it
    assert set(target["met"]) == set(target["decided"]) == {"tcp1", "tcp4", "udp"}
    assert not any(target["decided"].values()) and not any(target["ci95"].values())
    cost = payload["vxlan_filter_cost"]   # UDP with and without the VXLAN source filter
    assert cost["pair"] in ("container/handmade_container", "overlay/handmade")
    assert cost["with_filter_runs"] and cost["without_filter_runs"]
    assert all(ratio > 0 for ratio in cost["with_filter_runs"] + cost["without_filter_runs"])
    assert (smoke_results / "throughput.png").stat().st_size > 0


def test_latency_smoke(smoke_results):
    payload = load(smoke_results, "latency")
    for path in payload["paths"]:
        result = payload["results"][path]
        assert _stat_ok(result["ping_p50_us"]) and _stat_ok(result["ping_p99_us"])
        assert _stat_ok(result["rr_rate_per_s"]) and result["rr_rate_per_s"]["median"] > 0
        assert result["ping_sent"] > 0
    assert _stat_ok(payload["ratios"]["rr rate overlay/handmade"])
    assert (smoke_results / "latency.png").stat().st_size > 0


def test_convergence_smoke(smoke_results):
    payload = load(smoke_results, "convergence")
    size = payload["sizes"]["2"]
    assert _stat_ok(size["converged_all_ms"]) and _stat_ok(size["ready_s"]) and _stat_ok(size["removed_all_ms"])
    join = size["joins"][0]
    assert join["converged_all_s"] >= join["converged_median_observer_s"] >= 0 and join["watch_late_s"] >= 0
    assert payload["target"]["met"] is None       # not run at 50 hosts
    assert (smoke_results / "convergence.png").stat().st_size > 0


def test_scale_smoke(smoke_results):
    payload = load(smoke_results, "scale")
    size = payload["sizes"]["50"]
    assert size["objects_after_programming"] == {"routes": 50, "neighbours": 50, "fdb": 50}
    assert size["ip_batch_floor"]["routes_programmed"] == 50
    for key in ("program_from_last_write_s", "cold_start_routes_s", "one_change_add_ms", "one_change_delete_ms"):
        assert _stat_ok(size[key]), key
    assert size["rss_mb_live"]["VmHWM"] > 0
    assert size["idle_cpu"]["percent_overall"] >= 0
    assert (smoke_results / "scale.png").stat().st_size > 0


def test_cni_smoke(smoke_results):
    payload = load(smoke_results, "cni")
    options = payload["options"]
    figures = payload["results"]
    for command in ("ADD", "CHECK", "DEL"):
        sequential, concurrent = figures["sequential"][command], figures["concurrent"][command]
        for plugin in ("ours", "reference"):
            assert _stat_ok(sequential[plugin], n=options["rounds"]) and "p99" in sequential[plugin]
            assert _stat_ok(concurrent[plugin], n=options["bursts"] * options["concurrent"])
        assert _stat_ok(sequential["ratio"], n=options["rounds"]) and concurrent["ratio_of_medians"] > 0
    assert _stat_ok(figures["burst_total_ms"]["ours"], n=options["bursts"])
    assert _stat_ok(figures["cpu_per_add_ms"]["ours_total"]) and _stat_ok(figures["cpu_per_add_ms"]["reference"])
    table = payload["table"]
    assert table["title"] and all(len(row) == len(table["columns"]) for row in table["rows"])
    assert len(table["rows"]) == 8 and table["notes"]
    assert (smoke_results / payload["plot"]).stat().st_size > 0


def test_moves_smoke(smoke_results):
    payload = load(smoke_results, "moves")
    assert payload["options"] == {"hosts": 3, "moves": 1}
    move = payload["moves"][0]
    assert move["from"] != move["to"] and move["tcp_round_trips"] > 0
    assert move["reach_all_ms"] >= move["reach_median_ms"]
    for key in ("reach_all_ms", "tcp_longest_pause_ms", "add_ms", "del_ms"):
        assert _stat_ok(payload[key], n=1), key
    assert payload["target"]["met"] == {"reach": None, "tcp_pause": None}     # not run at 10 hosts
    assert (smoke_results / "moves.png").stat().st_size > 0


def test_table_regenerated_from_json(smoke_results):
    table = (smoke_results / "README.md").read_text()
    for heading in ("## Throughput", "## Latency", "## Convergence", "## Scale", "## CNI plugin", "## Moves"):
        assert heading in table
    # `report` alone rebuilds the same table from the JSON.
    before = table
    (smoke_results / "README.md").unlink()
    outcome = CliRunner().invoke(bench_command, ["report", "--results-dir", str(smoke_results)])
    assert outcome.exit_code == 0, outcome.output
    assert (smoke_results / "README.md").read_text() == before
