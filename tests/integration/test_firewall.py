"""overlay.firewall against real iptables (nft backend) and nftables, each test in a fresh
namespace named ovl-kt-<random>-fw, removed afterwards also when the test fails.

Most tests pass netns, which runs the iptables and nft commands in that namespace. The
in-process path (libnftables, taken when netns is None) acts on the caller's own namespace, so
those tests run a small Python child under `ip netns exec` that calls overlay.firewall with no
netns, and check the result with nft in that namespace."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import textwrap
import time
import uuid
from ipaddress import IPv4Address, IPv4Network

import pytest

from overlay import firewall

NETWORK = IPv4Network("10.244.0.0/16")
OWN = IPv4Network("10.244.7.0/24")   # the host's own subnet


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


@pytest.fixture
def ns2():
    name = f"ovl-kt-{uuid.uuid4().hex[:6]}-fw2"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False)


REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# Prepended to every in-process child: no subprocess may be started unless the test allows it,
# so a pass proves the work was done through libnftables in this process.
CHILD_PRELUDE = """
import json, logging, subprocess, sys, threading
from ipaddress import IPv4Address
from overlay import firewall
logging.basicConfig(level=logging.WARNING, stream=sys.stderr, format="%(levelname)s %(message)s")
def _no_subprocess(*args, **kwargs):
    raise AssertionError(f"subprocess started: {args[0] if args else kwargs}")
if not ALLOW_SUBPROCESS:
    subprocess.run = subprocess.Popen = _no_subprocess
def ips(*last):
    return [IPv4Address(f"198.18.0.{n}") for n in last]
result = {}
"""


def in_process(ns: str, body: str, *, allow_subprocess: bool = False) -> tuple[dict, str]:
    """Run body (Python) in a child inside ns; (the dict it leaves in `result`, its stderr)."""
    code = (f"ALLOW_SUBPROCESS = {allow_subprocess}\n" + CHILD_PRELUDE + textwrap.dedent(body)
            + "\nprint(json.dumps(result))\n")
    done = subprocess.run(["ip", "netns", "exec", ns, sys.executable, "-c", code], capture_output=True,
                          text=True, timeout=120, cwd=REPO, env={**os.environ, "PYTHONPATH": REPO})
    if done.returncode != 0:
        raise AssertionError(f"child in {ns} failed:\n{done.stderr}")
    return json.loads(done.stdout.splitlines()[-1]), done.stderr


def nft_sources(ns: str) -> set[str] | None:
    done = subprocess.run(["ip", "netns", "exec", ns, "nft", "-j", "list", "set", "ip", "overlay", "vxlan_sources"],
                          capture_output=True, text=True, timeout=30)
    if done.returncode != 0:
        return None
    return set(next(entry["set"] for entry in json.loads(done.stdout)["nftables"] if "set" in entry).get("elem", []))


def test_rules_are_applied_with_masquerade(ns):
    # Another tool's rules, which must survive and come after our jump.
    run(ns, "iptables", "-A", "FORWARD", "-j", "DROP")
    run(ns, "iptables", "-t", "nat", "-A", "POSTROUTING", "-s", "192.0.2.0/24", "-j", "MASQUERADE")

    firewall.apply_rules(NETWORK, OWN, True, netns=ns)

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
        "-A OVERLAY-POSTRTG ! -s 10.244.0.0/16 -d 10.244.7.0/24",
        "-A OVERLAY-POSTRTG ! -s 10.244.0.0/16 -d 10.244.0.0/16"]
    assert [rule.rsplit(" -j ", 1)[1] for rule in nat] == ["RETURN", "MASQUERADE --random-fully", "RETURN",
                                                           "MASQUERADE --random-fully"]
    postrouting = rules(ns, "nat", "POSTROUTING")
    assert sum(rule.endswith("-j OVERLAY-POSTRTG") for rule in postrouting) == 1
    assert "-A POSTROUTING -s 192.0.2.0/24 -j MASQUERADE" in postrouting
    assert firewall.rules_present(netns=ns)


def test_applying_twice_changes_nothing(ns):
    firewall.apply_rules(NETWORK, OWN, True, netns=ns)
    first = saved(ns)
    firewall.apply_rules(NETWORK, OWN, True, netns=ns)
    assert saved(ns) == first


def test_duplicate_jumps_are_reduced_to_one(ns):
    firewall.apply_rules(NETWORK, OWN, False, netns=ns)
    run(ns, "iptables", "-A", "FORWARD", "-j", "OVERLAY-FWD")
    assert not firewall.rules_present(netns=ns)
    firewall.apply_rules(NETWORK, OWN, False, netns=ns)
    assert sum(rule.endswith("-j OVERLAY-FWD") for rule in rules(ns, "filter", "FORWARD")) == 1
    assert firewall.rules_present(netns=ns)


def test_rules_present_notices_a_deleted_jump_or_rule(ns):
    firewall.apply_rules(NETWORK, OWN, True, netns=ns)
    jump = next(rule for rule in rules(ns, "filter", "FORWARD") if rule.endswith("-j OVERLAY-FWD"))
    run(ns, "iptables", "-D", "FORWARD", *shlex.split(jump)[2:])
    assert not firewall.rules_present(netns=ns)
    firewall.apply_rules(NETWORK, OWN, True, netns=ns)
    assert firewall.rules_present(netns=ns)

    run(ns, "iptables", "-t", "nat", "-D", "OVERLAY-POSTRTG", "3")
    assert not firewall.rules_present(netns=ns)
    firewall.apply_rules(NETWORK, OWN, True, netns=ns)
    assert firewall.rules_present(netns=ns)
    # A process that did not apply them (the daemon after a restart) still sees a missing jump.
    firewall._applied.pop(ns)
    assert firewall.rules_present(netns=ns)
    run(ns, "iptables", "-t", "nat", "-F", "POSTROUTING")
    assert not firewall.rules_present(netns=ns)


def test_masquerade_on_and_off(ns):
    firewall.apply_rules(NETWORK, OWN, True, netns=ns)
    assert len(rules(ns, "nat", "OVERLAY-POSTRTG")) == 5   # the chain declaration and its four rules

    firewall.apply_rules(NETWORK, OWN, False, netns=ns)
    assert "OVERLAY-POSTRTG" not in run(ns, "iptables-save", "-t", "nat")
    assert len(rules(ns, "filter", "OVERLAY-FWD")) == 3
    assert firewall.rules_present(netns=ns)

    firewall.apply_rules(NETWORK, OWN, True, netns=ns)
    assert len(rules(ns, "nat", "OVERLAY-POSTRTG")) == 5
    assert firewall.rules_present(netns=ns)


def test_a_changed_network_rewrites_the_chains(ns):
    firewall.apply_rules(NETWORK, OWN, True, netns=ns)
    firewall.apply_rules(IPv4Network("10.50.0.0/16"), IPv4Network("10.50.3.0/24"), True, netns=ns)
    text = saved(ns)
    assert "10.244." not in text
    assert text.count("10.50.0.0/16") == 2 + 6  # two filter rules; the nat rules name it 2, 1, 1, 2 times
    assert text.count("10.50.3.0/24") == 1


def test_remove_rules_leaves_others_alone_and_is_idempotent(ns):
    run(ns, "iptables", "-A", "FORWARD", "-j", "DROP")
    firewall.apply_rules(NETWORK, OWN, True, netns=ns)
    firewall.remove_rules(netns=ns)
    text = saved(ns)
    assert "OVERLAY" not in text
    assert "-A FORWARD -j DROP" in text
    assert not firewall.rules_present(netns=ns)
    firewall.remove_rules(netns=ns)
    assert saved(ns) == text


def test_an_iptables_failure_is_a_kernel_error(ns):
    with pytest.raises(firewall.FirewallError, match="iptables-save"):
        firewall.apply_rules(NETWORK, OWN, True, netns=f"{ns}-missing")


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


def test_a_filter_with_no_peers_is_recognised_as_ours(ns):
    # The first host of a cluster has no peers: its empty set lists with no elements line, and
    # must still read back as our filter (not be rewritten whole at every resync).
    assert firewall.sync_vxlan_filter(8472, [], netns=ns) == "table"
    run(ns, "nft", "add", "table", "ip", "someone_else")      # another commit: our memory no longer vouches
    assert firewall.vxlan_filter_present(8472, [], netns=ns)
    assert firewall.sync_vxlan_filter(8472, [], netns=ns) == ""
    assert firewall.sync_vxlan_filter(8472, PEERS, netns=ns) == "elements"
    run(ns, "nft", "delete", "table", "ip", "someone_else")
    assert firewall.sync_vxlan_filter(8472, [], netns=ns) == "elements"


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
    firewall.apply_rules(NETWORK, OWN, True, netns=ns)
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



# ---------------------------------------------------------------------- in-process (libnftables)


def host_filter() -> tuple[int, str]:
    """Our table in the test runner's own namespace, as nft lists it (or its error)."""
    done = subprocess.run(["nft", "-s", "list", "table", "ip", firewall.VXLAN_TABLE], capture_output=True, text=True)
    return done.returncode, done.stdout


def test_in_process_sync_writes_the_callers_namespace_without_running_nft(ns):
    host_before = host_filter()
    result, _ = in_process(ns, """
        assert firewall._library() is not None, "libnftables did not load"
        result["first"] = firewall.sync_vxlan_filter(8472, ips(12, 13))
        result["again"] = firewall.sync_vxlan_filter(8472, ips(13, 12))
        result["present"] = firewall.vxlan_filter_present(8472, ips(12, 13))
        result["joined"] = firewall.sync_vxlan_filter(8472, ips(12, 13, 14))
        result["left"] = firewall.sync_vxlan_filter(8472, ips(14))
        result["sources"] = sorted(map(str, firewall.vxlan_filter_sources()))
    """)
    assert result == {"first": "table", "again": "", "present": True, "joined": "elements", "left": "elements",
                      "sources": ["198.18.0.14"]}
    assert nft_sources(ns) == {"198.18.0.14"}
    assert "udp dport 8472 ip saddr != @vxlan_sources counter" in vxlan_rule(ns)
    assert host_filter() == host_before    # the test runner's namespace was not touched


def test_in_process_notices_and_repairs_drift_made_by_the_nft_command(ns):
    result, _ = in_process(ns, """
        import os
        def nft(*argv):
            # the subprocess module is fenced off in the child; drift is made by a real nft all the same
            assert os.spawnvp(os.P_WAIT, "nft", ["nft", *argv]) == 0
        firewall.sync_vxlan_filter(8472, ips(12, 13))
        nft("add", "element", "ip", "overlay", "vxlan_sources", "{ 203.0.113.9 }")
        result["extra element"] = firewall.sync_vxlan_filter(8472, ips(12, 13))
        nft("flush", "chain", "ip", "overlay", "vxlan_input")
        result["rule gone"] = firewall.sync_vxlan_filter(8472, ips(12, 13))
        # Recreated by hand as an interval set holding a range: not ours, though the names match.
        nft("delete table ip overlay; add table ip overlay; add set ip overlay vxlan_sources "
            "{ type ipv4_addr; flags interval; elements = { 198.18.0.12-198.18.0.13 } }")
        result["not an address"] = firewall.vxlan_filter_present(8472, ips(12, 13))
        result["range repaired"] = firewall.sync_vxlan_filter(8472, ips(12, 13))
        nft("delete", "table", "ip", "overlay")
        result["table gone"] = firewall.vxlan_filter_sources()
        result["rewritten"] = firewall.sync_vxlan_filter(4789, ips(12, 13))
        firewall.remove_vxlan_filter()
        firewall.remove_vxlan_filter()
        result["removed"] = firewall.vxlan_filter_sources()
    """)
    assert result == {"extra element": "elements", "rule gone": "table", "not an address": False,
                      "range repaired": "table", "table gone": None, "rewritten": "table", "removed": None}
    assert nft_sources(ns) is None


def test_in_process_errors_carry_nfts_own_message(ns):
    result, _ = in_process(ns, """
        try:
            firewall._nft(["add element ip overlay vxlan_sources { 198.18.0.1 }"], None)
        except firewall.FirewallError as exc:
            result["missing table"] = str(exc)
        firewall.sync_vxlan_filter(8472, ips(12))
        try:
            firewall._nft(["add element ip overlay vxlan_sources { 198.18.0 }"], None)
        except firewall.FirewallError as exc:
            result["syntax"] = str(exc)
        # A failed command leaves the context usable, its buffers empty.
        result["after"] = firewall.sync_vxlan_filter(8472, ips(12, 13))
    """)
    assert "No such file or directory" in result["missing table"]
    assert "syntax error" in result["syntax"] and "198.18.0 }" in result["syntax"]
    assert "nft script was" in result["syntax"]
    assert result["after"] == "elements"
    assert nft_sources(ns) == {"198.18.0.12", "198.18.0.13"}


def test_in_process_follows_the_calling_threads_namespace(ns, ns2):
    """The context's netlink socket belongs to the namespace it was made in: a thread that
    entered another namespace gets a context there, and the first thread's work stays in its own."""
    result, _ = in_process(ns, f"""
        import ctypes, os
        libc = ctypes.CDLL(None, use_errno=True)
        firewall.sync_vxlan_filter(8472, ips(1))
        def elsewhere():
            fd = os.open("/run/netns/{ns2}", os.O_RDONLY)
            assert libc.setns(fd, 0x40000000) == 0, ctypes.get_errno()   # CLONE_NEWNET, this thread only
            os.close(fd)
            firewall._vxlan_applied.clear()
            result["there"] = firewall.sync_vxlan_filter(8472, ips(2))
        thread = threading.Thread(target=elsewhere)
        thread.start()
        thread.join()
        firewall._vxlan_applied.clear()
        result["back here"] = firewall.sync_vxlan_filter(8472, ips(1, 3))
    """)
    assert result == {"there": "table", "back here": "table"}
    assert nft_sources(ns) == {"198.18.0.1", "198.18.0.3"}
    assert nft_sources(ns2) == {"198.18.0.2"}


def test_in_process_from_several_threads_at_once(ns):
    """One writer (the daemon's netlink thread) and readers in other threads share the one
    context: no call fails, and a reader only ever sees a whole transaction's result."""
    result, _ = in_process(ns, """
        a, b = ips(1, 2, 3), ips(4, 5)
        firewall.sync_vxlan_filter(8472, a)
        errors, seen, stop = [], set(), threading.Event()
        def writer():
            try:
                for i in range(40):
                    assert firewall.sync_vxlan_filter(8472, b if i % 2 == 0 else a) == "elements"
            except Exception as exc:
                errors.append(repr(exc))
            stop.set()
        def reader():
            try:
                while not stop.is_set():
                    seen.add(tuple(sorted(map(str, firewall.vxlan_filter_sources()))))
            except Exception as exc:
                errors.append(repr(exc))
        threads = [threading.Thread(target=writer)] + [threading.Thread(target=reader) for _ in range(3)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        result["errors"] = errors
        result["seen"] = sorted(seen)
    """)
    assert result["errors"] == []
    assert set(map(tuple, result["seen"])) <= {("198.18.0.1", "198.18.0.2", "198.18.0.3"), ("198.18.0.4", "198.18.0.5")}
    assert nft_sources(ns) == {"198.18.0.1", "198.18.0.2", "198.18.0.3"}


def test_without_libnftables_the_nft_command_is_used_and_it_is_logged_once(ns):
    result, stderr = in_process(ns, """
        import ctypes
        def unloadable(*args, **kwargs):
            raise OSError("libnftables.so.1: cannot open shared object file")
        ctypes.CDLL = unloadable
        result["first"] = firewall.sync_vxlan_filter(8472, ips(12))
        result["second"] = firewall.sync_vxlan_filter(8472, ips(12, 13))
        result["library"] = firewall._library() is not None
    """, allow_subprocess=True)
    assert result == {"first": "table", "second": "elements", "library": False}
    assert stderr.count("libnftables not usable") == 1
    assert nft_sources(ns) == {"198.18.0.12", "198.18.0.13"}


def test_the_filter_at_many_peers_in_process(ns):
    """In-process costs, printed (pytest -s); never asserted on this noisy machine."""
    result, _ = in_process(ns, """
        import time
        for peers in (1000, 5000):
            sources = [IPv4Address(int(IPv4Address("172.16.0.0")) + i) for i in range(peers)]
            firewall._vxlan_applied.clear()
            firewall._vxlan_known.clear()
            timings = []
            for wanted, expect in ((sources, "table"), (sources, ""),
                                   (sources[1:] + [IPv4Address("198.18.0.99")], "elements")):
                started = time.perf_counter()
                assert firewall.sync_vxlan_filter(8472, wanted) == expect
                timings.append(time.perf_counter() - started)
            assert len(firewall.vxlan_filter_sources()) == peers
            result[peers] = timings
    """)
    for peers, (whole, unchanged, one) in result.items():
        print(f"VXLAN source filter in-process at {peers} peers: whole table {1000 * whole:.0f} ms, "
              f"unchanged {1000 * unchanged:.0f} ms, one left, one joined {1000 * one:.0f} ms")


def test_in_process_the_ruleset_generation_spares_listings_until_anything_commits(ns):
    """While nothing commits to nftables in the namespace (its ruleset generation stays), the
    filter and the iptables rules are known without listing them; any commit by anyone (nft,
    iptables-nft) makes the next call look again, and drift is repaired as before."""
    result, _ = in_process(ns, """
        import os
        from ipaddress import IPv4Network
        listings = {"nft": 0, "iptables-save": 0}
        read_table, run = firewall._read_vxlan_table, firewall._run
        def counted_read(netns):
            listings["nft"] += 1
            return read_table(netns)
        def counted_run(argv, netns, stdin=None):
            if argv[0] == "iptables-save":
                listings["iptables-save"] += 1
            return run(argv, netns, stdin)
        firewall._read_vxlan_table, firewall._run = counted_read, counted_run
        def nft(*argv):
            assert os.spawnvp(os.P_WAIT, "nft", ["nft", *argv]) == 0
        def step(name, value):
            result[name] = [value, dict(listings)]
            listings.update(nft=0, **{"iptables-save": 0})
        g0 = firewall.ruleset_generation()
        step("generation is a number", isinstance(g0, int))
        step("first sync", firewall.sync_vxlan_filter(8472, ips(12, 13)))
        step("unchanged", firewall.sync_vxlan_filter(8472, ips(12, 13)))
        step("one joined", firewall.sync_vxlan_filter(8472, ips(12, 13, 14)))
        step("update", firewall.update_vxlan_filter(8472, ips(15), ips(12)))
        step("update again", firewall.update_vxlan_filter(8472, ips(15), ips(12)))
        step("sources", sorted(map(str, firewall.vxlan_filter_sources())))
        nft("add", "element", "ip", "overlay", "vxlan_sources", "{ 203.0.113.9 }")
        step("update after drift", firewall.update_vxlan_filter(8472, ips(16), ()))
        step("drift repaired", firewall.sync_vxlan_filter(8472, ips(13, 14, 15)))
        step("sources repaired", sorted(map(str, firewall.vxlan_filter_sources())))
        firewall.apply_rules(IPv4Network("10.244.0.0/16"), IPv4Network("10.244.7.0/24"), True)
        listings.update(nft=0, **{"iptables-save": 0})
        step("rules checked", firewall.rules_present())
        step("rules known", firewall.rules_present())
        # iptables-restore committed since the set was last seen: listed once, then known again.
        step("set after the rules", [firewall.update_vxlan_filter(8472, ips(16), ()),
                                     firewall.sync_vxlan_filter(8472, ips(13, 14, 15))])
        step("after our own set change", [firewall.update_vxlan_filter(8472, ips(16), ()), firewall.rules_present()])
        assert os.spawnvp(os.P_WAIT, "iptables", ["iptables", "-t", "nat", "-F", "OVERLAY-POSTRTG"]) == 0
        step("rule flushed by iptables", firewall.rules_present())
        firewall.apply_rules(IPv4Network("10.244.0.0/16"), IPv4Network("10.244.7.0/24"), True)
        listings.update(nft=0, **{"iptables-save": 0})
        step("rules back", [firewall.rules_present(), firewall.rules_present()])
    """, allow_subprocess=True)
    none = {"nft": 0, "iptables-save": 0}
    assert result["generation is a number"] == [True, none]
    assert result["first sync"][0] == "table"
    assert result["unchanged"] == ["", none]
    assert result["one joined"] == ["elements", none]
    assert result["update"] == [True, none]
    assert result["update again"] == [True, none]
    assert result["sources"][0] == ["198.18.0.13", "198.18.0.14", "198.18.0.15"]
    assert result["update after drift"] == [False, none]
    assert result["drift repaired"] == ["elements", {"nft": 1, "iptables-save": 0}]
    assert result["sources repaired"][0] == ["198.18.0.13", "198.18.0.14", "198.18.0.15"]
    if firewall._iptables_on_nftables():
        assert result["rules checked"] == [True, {"nft": 0, "iptables-save": 2}]
        assert result["rules known"] == [True, none]
        assert result["set after the rules"] == [[False, ""], {"nft": 1, "iptables-save": 0}]
        assert result["after our own set change"] == [[True, True], none]
        assert result["rule flushed by iptables"] == [False, {"nft": 0, "iptables-save": 2}]
        assert result["rules back"] == [[True, True], {"nft": 0, "iptables-save": 2}]
    assert nft_sources(ns) == {"198.18.0.13", "198.18.0.14", "198.18.0.15", "198.18.0.16"}
