"""Pieces of the benchmark reports that decide what a figure is called."""

from bench.cni_bench import in_turn
from bench.report import high


def test_a_p99_needs_a_hundred_samples_else_the_maximum_says_so():
    few = {"n": 10, "median": 5.0, "p5": 1.0, "p95": 9.0, "p99": 9.9, "max": 10.0}
    assert high(few, 1) == "10.0 (max of 10)"
    many = {**few, "n": 100}
    assert high(many, 1) == "9.9"
    assert high(None) == high({"n": 0}) == "–"


def test_the_plugins_take_turns_going_first():
    plugins = {"ours": 1, "reference": 2}
    firsts = [in_turn(plugins, index)[0][0] for index in range(6)]
    assert firsts == ["ours", "reference"] * 3
    assert all(sorted(name for name, _ in in_turn(plugins, index)) == ["ours", "reference"] for index in range(6))
