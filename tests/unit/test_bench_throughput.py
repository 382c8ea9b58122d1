"""bench.throughput's pure parts: a run's steady rate, the rounds' split over labs, the
filter-cost order."""

from collections import Counter

from bench.common import median_ci
from bench.throughput import ThroughputOptions, _parse, filter_cost_order, steady_gbps, target_verdict


def _report(rates_gbps: list[float], seconds: list[float]) -> dict:
    """The shape of iperf3's `--get-server-output` JSON, with these receiver intervals."""
    return {"server_output_json": {"intervals": [
        {"sum": {"bits_per_second": rate * 1e9, "seconds": length}} for rate, length in zip(rates_gbps, seconds)]}}


def test_a_burst_shorter_than_half_the_run_does_not_move_the_steady_rate():
    # 6 full intervals, two of them in another tenant's burst, then iperf3's few-ms stub.
    raw = _report([12.1, 12.4, 8.6, 8.8, 12.3, 12.2, 3.0], [0.5] * 6 + [0.003])
    assert steady_gbps(raw, 0.5) == 12.15   # median of the six full intervals; the stub is left out
    raw = _report([12.0, 12.2, 12.4], [0.5, 0.5, 0.5])
    assert steady_gbps(raw, 0.5) == 12.2


def test_without_the_servers_report_the_whole_run_mean_is_the_figure():
    assert steady_gbps({}, 0.5) is None
    raw = {"end": {"sum_received": {"bits_per_second": 11.5e9}, "sum_sent": {"retransmits": 3}}}
    parsed = _parse("tcp1", raw, 0.5)
    assert parsed["gbps"] == parsed["mean_gbps"] == 11.5
    assert parsed["retransmits"] == 3


def test_udp_keeps_the_loss_beside_the_steady_rate():
    raw = {**_report([0.70, 0.72, 0.71], [0.5] * 3),
           "end": {"sum": {"bits_per_second": 0.8e9, "lost_percent": 10.0, "jitter_ms": 0.01},
                   "sum_received": {"bits_per_second": 0.69e9}}}
    parsed = _parse("udp", raw, 0.5)
    assert parsed["gbps"] == 0.71
    assert parsed["mean_gbps"] == 0.69
    assert parsed["lost_percent"] == 10.0
    assert parsed["sender_gbps"] == 0.8


def test_rounds_are_split_over_the_labs_and_none_is_empty():
    assert ThroughputOptions(repeats=12, labs=2).rounds_per_lab() == [6, 6]
    assert ThroughputOptions(repeats=7, labs=3).rounds_per_lab() == [3, 2, 2]
    assert ThroughputOptions(repeats=1, labs=2).rounds_per_lab() == [1]
    assert ThroughputOptions(repeats=5, labs=0).rounds_per_lab() == [5]
    assert sum(ThroughputOptions().rounds_per_lab()) == ThroughputOptions().repeats


def test_filter_cost_rounds_balance_states_and_orders():
    runs = [run for index in range(8) for run in filter_cost_order(index)]
    # Each state runs in every round, first in half of them; each state's pair goes each way as often.
    assert all({state for state, _ in filter_cost_order(index)} == {True, False} for index in range(8))
    assert Counter(filter_cost_order(index)[0][0] for index in range(8)) == {True: 4, False: 4}
    assert Counter(runs) == {(True, True): 4, (True, False): 4, (False, True): 4, (False, False): 4}


def test_the_median_interval_is_the_binomial_order_statistics():
    # n = 12: ranks 3 and 10 (P(Binomial(12, 1/2) <= 2) = 0.019 <= 0.025 < P(<= 3) = 0.073).
    assert median_ci(list(range(1, 13))) == (3.0, 10.0)
    assert median_ci([5.0, 1.0, 4.0, 2.0, 6.0, 3.0]) == (1.0, 6.0)   # n = 6: the extremes (96.9%)
    assert median_ci(list(range(1, 25))) == (7.0, 18.0)
    assert median_ci([1.0, 2.0, 3.0, 4.0, 5.0]) is None               # too few for 95%


def _runs(gbps: list[float]) -> list[dict]:
    return [{"gbps": value} for value in gbps]


def test_the_target_verdict_says_whether_the_noise_decides_it():
    pair = "container/handmade_container"
    hand = [10.0] * 12
    clear = [10.1, 10.2, 9.9, 10.0, 10.3, 10.1, 10.2, 10.0, 10.1, 10.2, 10.0, 10.1]   # every ratio >= 0.99
    noisy = [10.1, 8.0, 12.0, 9.5, 10.4, 7.9, 12.5, 9.6, 10.2, 8.1, 11.9, 9.7]       # median 0.99, wide
    low = [9.0, 9.2, 9.1, 8.9, 9.3, 9.0, 9.1, 9.2, 8.8, 9.0, 9.1, 9.2]                # every ratio < 0.94
    samples = {"tcp1": {"container": _runs(clear), "handmade_container": _runs(hand)},
               "tcp4": {"container": _runs(noisy), "handmade_container": _runs(hand)},
               "udp": {"container": _runs(low), "handmade_container": _runs(hand)}}
    verdict = target_verdict(samples, pair)
    assert verdict["met"] == {"tcp1": True, "tcp4": True, "udp": False}
    assert verdict["decided"] == {"tcp1": True, "tcp4": False, "udp": True}
    assert verdict["ci95"]["tcp4"][0] < 0.98 < verdict["ci95"]["tcp4"][1]
    assert verdict["median"]["tcp4"] == 0.99
