"""overlay.firewall against real iptables (nft backend), each test in a fresh namespace
named ovl-kt-<random>-fw, removed afterwards also when the test fails."""

from __future__ import annotations

import shlex
import subprocess
import time
import uuid
from ipaddress import IPv4Address, IPv4Network

import pytest

from overlay import firewall

NETWORK = IPv4Network("10.244.0.0/16")


def run(ns: str, *argv: str, stdin: str | None = None, check: bool = True) -> str:
    done = subprocess.run(["nsenter", f"--net=/run/netns/{ns}", *argv], input=stdin,
                          capture_output=True, text=True, timeout=30)
    if check and done.returncode != 0:
        raise AssertionError(f"{' '.join(argv)} failed: {done.stderr.strip()}")
    return done.stdout


def saved(ns: str) -> str:
    """iptables-save of both tables without its time-stamped comment lines."""
    return "".join(line + "\n" for table in ("filter", "nat")
                   for line in run(ns, "iptables-save", "-t", table).splitlines()
                   if not line.startswith("#"))


def rules(ns: str, table: str, chain: str) -> list[str]:
    return run(ns, "iptables", "-t", table, "-S", chain, check=False).splitlines()


@pytest.fixture
def ns():
    name = f"ovl-kt-{uuid.uuid4().hex[:6]}-fw"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        yield name
    finally:
        firewall._applied.pop(name, None)
        firewall._vxlan_applied.pop(name, None)
        subprocess.run(["ip", "netns", "del", name], check=False)


def test_rules_are_applied_with_masquerade(ns):
    # Another tool's rules, which must survive and come after our jump.
    run(ns, "iptables", "-A", "FORWARD", "-j", "DROP")
    run(ns, "iptables", "-t", "nat", "-A", "POSTROUTING", "-s", "192.0.2.0/24", "-j", "MASQUERADE")

    firewall.apply_rules(NETWORK, True, netns=ns)

    forward = rules(ns, "filter", "FORWARD")
    assert forward[1].endswith("-j OVERLAY-FWD") and forward[2] == "-A FORWARD -j DROP"
    fwd = rules(ns, "filter", "OVERLAY-FWD")[1:]
    assert [rule.split(" -m comment")[0] for rule in fwd] == [
        "-A OVERLAY-FWD -s 10.244.0.0/16", "-A OVERLAY-FWD -d 10.244.0.0/16"]
    assert all(rule.endswith("-j ACCEPT") for rule in fwd)
    nat = rules(ns, "nat", "OVERLAY-POSTRTG")[1:]
    assert [rule.split(" -m comment")[0] for rule in nat] == [
        "-A OVERLAY-POSTRTG -s 10.244.0.0/16 -d 10.244.0.0/16",
        "-A OVERLAY-POSTRTG -s 10.244.0.0/16 ! -d 224.0.0.0/4",
        "-A OVERLAY-POSTRTG ! -s 10.244.0.0/16 -d 10.244.0.0/16"]
    assert nat[0].endswith("-j RETURN")
    assert all(rule.endswith("-j MASQUERADE --random-fully") for rule in nat[1:])
    postrouting = rules(ns, "nat", "POSTROUTING")
    assert sum(rule.endswith("-j OVERLAY-POSTRTG") for rule in postrouting) == 1
    assert "-A POSTROUTING -s 192.0.2.0/24 -j MASQUERADE" in postrouting
    assert firewall.rules_present(netns=ns)


def test_applying_twice_changes_nothing(ns):
    firewall.apply_rules(NETWORK, True, netns=ns)
    first = saved(ns)
    firewall.apply_rules(NETWORK, True, netns=ns)
    assert saved(ns) == first


def test_duplicate_jumps_are_reduced_to_one(ns):
    firewall.apply_rules(NETWORK, False, netns=ns)
    run(ns, "iptables", "-A", "FORWARD", "-j", "OVERLAY-FWD")
    assert not firewall.rules_present(netns=ns)
    firewall.apply_rules(NETWORK, False, netns=ns)
    assert sum(rule.endswith("-j OVERLAY-FWD") for rule in rules(ns, "filter", "FORWARD")) == 1
    assert firewall.rules_present(netns=ns)


def test_rules_present_notices_a_deleted_jump_or_rule(ns):
    firewall.apply_rules(NETWORK, True, netns=ns)
    jump = next(rule for rule in rules(ns, "filter", "FORWARD") if rule.endswith("-j OVERLAY-FWD"))
    run(ns, "iptables", "-D", "FORWARD", *shlex.split(jump)[2:])
    assert not firewall.rules_present(netns=ns)
    firewall.apply_rules(NETWORK, True, netns=ns)
    assert firewall.rules_present(netns=ns)

    run(ns, "iptables", "-t", "nat", "-D", "OVERLAY-POSTRTG", "3")
    assert not firewall.rules_present(netns=ns)
    firewall.apply_rules(NETWORK, True, netns=ns)
    assert firewall.rules_present(netns=ns)
    # A process that did not apply them (the daemon after a restart) still sees a missing jump.
    firewall._applied.pop(ns)
    assert firewall.rules_present(netns=ns)
    run(ns, "iptables", "-t", "nat", "-F", "POSTROUTING")
    assert not firewall.rules_present(netns=ns)


def test_masquerade_on_and_off(ns):
    firewall.apply_rules(NETWORK, True, netns=ns)
    assert len(rules(ns, "nat", "OVERLAY-POSTRTG")) == 4

    firewall.apply_rules(NETWORK, False, netns=ns)
    assert "OVERLAY-POSTRTG" not in run(ns, "iptables-save", "-t", "nat")
    assert len(rules(ns, "filter", "OVERLAY-FWD")) == 3
    assert firewall.rules_present(netns=ns)

    firewall.apply_rules(NETWORK, True, netns=ns)
    assert len(rules(ns, "nat", "OVERLAY-POSTRTG")) == 4
    assert firewall.rules_present(netns=ns)


def test_a_changed_network_rewrites_the_chains(ns):
    firewall.apply_rules(NETWORK, True, netns=ns)
    firewall.apply_rules(IPv4Network("10.50.0.0/16"), True, netns=ns)
    text = saved(ns)
    assert "10.244.0.0/16" not in text
    assert text.count("10.50.0.0/16") == 2 + 5  # two filter rules; the nat rules name it 2, 1, 2 times


def test_remove_rules_leaves_others_alone_and_is_idempotent(ns):
    run(ns, "iptables", "-A", "FORWARD", "-j", "DROP")
    firewall.apply_rules(NETWORK, True, netns=ns)
    firewall.remove_rules(netns=ns)
    text = saved(ns)
    assert "OVERLAY" not in text
    assert "-A FORWARD -j DROP" in text
    assert not firewall.rules_present(netns=ns)
    firewall.remove_rules(netns=ns)
    assert saved(ns) == text


def test_an_iptables_failure_is_a_kernel_error(ns):
    with pytest.raises(firewall.FirewallError, match="iptables-save"):
        firewall.apply_rules(NETWORK, True, netns=f"{ns}-missing")


# ---------------------------------------------------------------------- the VXLAN source filter

PEERS = [IPv4Address("198.18.0.12"), IPv4Address("198.18.0.13")]


def vxlan_rule(ns: str) -> str:
    return run(ns, "nft", "list", "chain", "ip", "overlay", "vxlan_input")


def test_vxlan_filter_drops_all_but_the_peers_and_is_idempotent(ns):
    assert firewall.vxlan_filter_sources(netns=ns) is None
    assert firewall.sync_vxlan_filter(8472, PEERS, netns=ns) == "table"
    assert firewall.vxlan_filter_sources(netns=ns) == frozenset(PEERS)
    rule = vxlan_rule(ns)
    assert "hook input" in rule and "udp dport 8472 ip saddr != @vxlan_sources counter" in rule and " drop" in rule
    assert firewall.vxlan_filter_present(8472, PEERS, netns=ns)
    # Nothing changed: nothing written (the rule's handle stays the same).
    before = run(ns, "nft", "-a", "list", "table", "ip", "overlay")
    assert firewall.sync_vxlan_filter(8472, reversed(PEERS), netns=ns) == ""
    assert run(ns, "nft", "-a", "list", "table", "ip", "overlay") == before


def test_a_peer_leaving_or_joining_changes_only_the_set(ns):
    firewall.sync_vxlan_filter(8472, PEERS, netns=ns)
    handles = [line for line in run(ns, "nft", "-a", "list", "chain", "ip", "overlay", "vxlan_input").splitlines()
               if "# handle" in line]
    newcomer = IPv4Address("198.18.0.14")
    assert firewall.sync_vxlan_filter(8472, [PEERS[0], newcomer], netns=ns) == "elements"
    assert firewall.vxlan_filter_sources(netns=ns) == {PEERS[0], newcomer}
    assert [line for line in run(ns, "nft", "-a", "list", "chain", "ip", "overlay", "vxlan_input").splitlines()
            if "# handle" in line] == handles
    assert firewall.sync_vxlan_filter(8472, [], netns=ns) == "elements"
    assert firewall.vxlan_filter_sources(netns=ns) == frozenset()   # no peers: VXLAN from no one


def test_drift_in_the_filter_is_noticed_and_repaired(ns):
    firewall.sync_vxlan_filter(8472, PEERS, netns=ns)
    run(ns, "nft", "add", "element", "ip", "overlay", "vxlan_sources", "{ 203.0.113.9 }")
    assert not firewall.vxlan_filter_present(8472, PEERS, netns=ns)
    assert firewall.sync_vxlan_filter(8472, PEERS, netns=ns) == "elements"
    run(ns, "nft", "flush", "chain", "ip", "overlay", "vxlan_input")        # the drop rule gone
    assert not firewall.vxlan_filter_present(8472, PEERS, netns=ns)
    assert firewall.sync_vxlan_filter(8472, PEERS, netns=ns) == "table"
    assert "drop" in vxlan_rule(ns)
    run(ns, "nft", "delete", "table", "ip", "overlay")
    assert not firewall.vxlan_filter_present(8472, PEERS, netns=ns)
    assert firewall.sync_vxlan_filter(8472, PEERS, netns=ns) == "table"
    # Another port (the config changed): the rule is rewritten.
    assert firewall.sync_vxlan_filter(4789, PEERS, netns=ns) == "table"
    assert "udp dport 4789" in vxlan_rule(ns)
    # A new process (the daemon restarted) does not trust what it did not write: one rewrite.
    firewall._vxlan_applied.pop(ns)
    assert firewall.sync_vxlan_filter(4789, PEERS, netns=ns) == "table"
    assert firewall.sync_vxlan_filter(4789, PEERS, netns=ns) == ""


def test_removing_the_filter_is_idempotent_and_leaves_iptables_alone(ns):
    firewall.apply_rules(NETWORK, True, netns=ns)
    firewall.sync_vxlan_filter(8472, PEERS, netns=ns)
    firewall.remove_vxlan_filter(netns=ns)
    assert firewall.vxlan_filter_sources(netns=ns) is None
    firewall.remove_vxlan_filter(netns=ns)
    assert firewall.rules_present(netns=ns)


@pytest.mark.parametrize("peers", [1000, 5000])
def test_the_filter_at_many_peers(ns, peers):
    """The cost of the writes, printed (pytest -s); never asserted on this noisy machine."""
    sources = [IPv4Address(int(IPv4Address("172.16.0.0")) + i) for i in range(peers)]
    timings = {}
    for what, wanted, expect in (("whole table", sources, "table"), ("unchanged", sources, ""),
                                 ("one left, one joined", sources[1:] + [IPv4Address("198.18.0.99")], "elements")):
        started = time.perf_counter()
        assert firewall.sync_vxlan_filter(8472, wanted, netns=ns) == expect
        timings[what] = time.perf_counter() - started
    assert len(firewall.vxlan_filter_sources(netns=ns)) == peers
    print(f"VXLAN source filter at {peers} peers: " + ", ".join(f"{what} {1000 * t:.0f} ms"
                                                               for what, t in timings.items()))
