"""The lab on a real kernel with a real etcd: it comes up, reports itself, and always goes away.

Every test uses a lab name of its own (`t` + 3 random characters), so it can run next to a
developer's lab or another test run, and removes that lab in a finally, also when it fails.
The full flow (daemons ready, ping over VXLAN) is skipped until the daemon can be imported.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import sys
import textwrap
import time
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path

import pytest
from click.testing import CliRunner

from overlay.lab import (LAB_ROOT, Lab, LabError, list_links, list_netns, netns_pids, pid_alive,
                         teardown, underlay_mac, wait_until)
from overlay.lab_cli import lab as lab_command

BIN = Path(sys.executable).parent
OVERLAYCTL = str(BIN / "overlayctl") if (BIN / "overlayctl").exists() else "overlayctl"


@pytest.fixture
def lab_name():
    name = "t" + "".join(secrets.choice("abcdefghijklmnopqrstuvwxyz0123456789") for _ in range(3))
    try:
        yield name
    finally:
        teardown(name)


def lab_objects(name: str) -> list[str]:
    mark = f"ovl-{name}-"
    return sorted({netns for netns in list_netns() if netns.startswith(mark)}
                  | {link["ifname"] for link in list_links() if link.get("ifname", "").startswith(mark)})


def lab_pids(name: str) -> list[int]:
    return [pid for netns in list_netns() if netns.startswith(f"ovl-{name}-") for pid in netns_pids(netns)]


def assert_gone(name: str, pids: list[int]) -> None:
    assert lab_objects(name) == []
    assert [pid for pid in pids if pid_alive(pid)] == []
    assert not (LAB_ROOT / name).exists()


def start_stray(netns: str) -> int:
    """A detached process inside a lab namespace, standing in for a daemon left running."""
    return subprocess.Popen(["ip", "netns", "exec", netns, "sleep", "300"], stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True).pid


def test_up_status_down(lab_name):
    lab = Lab(lab_name)
    with lab:
        lab.up(hosts=3, etcd_members=1, start_daemons=False)
        members = [f"ovl-{lab_name}-e1"]
        hosts = [f"ovl-{lab_name}-h{index}" for index in (1, 2, 3)]
        assert lab_objects(lab_name) == sorted({f"ovl-{lab_name}-br", *members, *hosts})

        result = CliRunner().invoke(lab_command, ["status", "--name", lab_name, "--json"])
        assert result.exit_code == 0, result.output
        report = json.loads(result.output)
        assert report["name"] == lab_name
        underlay = IPv4Network(report["underlay"]["cidr"])
        assert underlay.subnet_of(IPv4Network("198.18.0.0/15")) and underlay.prefixlen == 24
        assert report["etcd"]["netns"] == members
        assert report["etcd"]["prefix"] == "/coreos.com/network"
        assert [IPv4Address(url.split("//")[1].split(":")[0]) in underlay
                for url in report["etcd"]["endpoints"]] == [True]
        assert [host["netns"] for host in report["hosts"]] == hosts
        for host in report["hosts"]:
            assert set(host) >= {"name", "netns", "public_ip", "subnet", "vxlan_device", "daemon_pid",
                                 "ready", "containers"}
            assert IPv4Address(host["public_ip"]) in underlay
            assert (host["subnet"], host["daemon_pid"], host["ready"], host["containers"]) == (None, None, False, [])
            assert host["vxlan_device"] == "flannel.1"

        # The underlay works host to host, and from the root namespace to etcd.
        assert lab.ping("h1", report["hosts"][2]["public_ip"]) is not None
        stored = json.loads(lab.etcdctl("get", "--print-value-only", "/coreos.com/network/config").stdout)
        assert stored["Network"] == "10.244.0.0/16"
        assert stored["Backend"] == {"Type": "vxlan", "VNI": 1, "Port": 8472}
        # Inside a host, eth0 holds the public IP and the default route points at the bridge.
        routes = json.loads(lab.exec("h2", ["ip", "-j", "route", "show", "default"], check=True).stdout)
        assert routes[0]["gateway"] == str(lab.gateway) and routes[0]["dev"] == "eth0"

        host = lab.add_host(start_daemon=False)
        assert host.name == "h4" and host.netns in list_netns()
        lab.remove_host("h2")
        assert f"ovl-{lab_name}-h2" not in lab_objects(lab_name)
        assert [host.name for host in lab.hosts] == ["h1", "h3", "h4"]
        # Added again, h2 comes back with its address and its MAC: neighbours on the underlay
        # that still hold the old entry are right.
        again = lab.add_host(start_daemon=False)
        assert (again.name, again.public_ip) == ("h2", IPv4Address(report["hosts"][1]["public_ip"]))
        link = json.loads(lab.exec("h2", ["ip", "-j", "link", "show", "eth0"], check=True).stdout)[0]
        assert link["address"] == underlay_mac(again.public_ip)
        pids = lab_pids(lab_name)
        assert pids  # etcd runs inside its namespace
    assert_gone(lab_name, pids)


@pytest.mark.parametrize("state", ["state kept", "state lost"])
def test_down_cleans_up_after_a_crash(lab_name, state):
    # A lab made by the CLI outlives it; then everything is killed with -9, as a crash would.
    up = subprocess.run([OVERLAYCTL, "lab", "up", "--name", lab_name, "--hosts", "2", "--no-wait"],
                        capture_output=True, text=True, timeout=60)
    assert up.returncode == 0, up.stderr
    stray = start_stray(f"ovl-{lab_name}-h1")
    wait_until(lambda: stray in netns_pids(f"ovl-{lab_name}-h1"), time.monotonic() + 20,
               "the stray process to enter the namespace")
    pids = lab_pids(lab_name)
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass  # a daemon that had already exited
    survivor = start_stray(f"ovl-{lab_name}-h2")   # and one that is still running at `down`
    if state == "state lost":
        (LAB_ROOT / lab_name / "state.json").unlink()

    down = subprocess.run([OVERLAYCTL, "lab", "down", "--name", lab_name], capture_output=True, text=True,
                          timeout=60)
    assert down.returncode == 0, down.stderr
    assert_gone(lab_name, pids + [stray, survivor])


def test_half_finished_up_is_rolled_back(lab_name, monkeypatch):
    def fail(self, count):
        raise LabError("simulated failure while making hosts")
    monkeypatch.setattr(Lab, "_make_hosts", fail)
    lab = Lab(lab_name)
    with pytest.raises(LabError, match="simulated"):
        lab.up(hosts=2, start_daemons=False)
    assert_gone(lab_name, [])


def test_down_after_up_crashed_half_way(lab_name):
    # The process running `up` dies (no rollback) after etcd started, before any host exists.
    script = textwrap.dedent(f"""
        import os
        from overlay.lab import Lab
        Lab._make_hosts = lambda self, count: os._exit(9)
        Lab({lab_name!r}).up(hosts=2, start_daemons=False)
    """)
    crashed = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert crashed.returncode == 9, crashed.stderr
    assert f"ovl-{lab_name}-e1" in lab_objects(lab_name)
    pids = lab_pids(lab_name)
    assert pids  # the etcd member outlived its parent
    with pytest.raises(LabError, match="already exists"):
        Lab(lab_name).up(hosts=1, start_daemons=False)

    down = subprocess.run([OVERLAYCTL, "lab", "down", "--name", lab_name], capture_output=True, text=True,
                          timeout=60)
    assert down.returncode == 0, down.stderr
    assert_gone(lab_name, pids)


def test_an_up_of_a_name_another_up_has_claimed_is_refused_and_takes_nothing_down(lab_name):
    # Another `up` of this name has claimed it (its state dir) and made nothing yet: ours must
    # refuse, and must not roll back (which would take the other one's lab down).
    claimed = LAB_ROOT / lab_name
    claimed.mkdir(parents=True)
    marker = claimed / "theirs"
    marker.write_text("the other up's")
    with pytest.raises(LabError, match="already exists"):
        Lab(lab_name).up(hosts=1, start_daemons=False)
    assert marker.exists() and not lab_objects(lab_name)


def test_three_member_etcd_and_a_second_lab_beside_it(lab_name):
    other_name = lab_name[:-1] + ("x" if lab_name[-1] != "x" else "y")
    try:
        with Lab(lab_name) as lab, Lab(other_name) as other:
            lab.up(hosts=1, etcd_members=3, start_daemons=False)
            other.up(hosts=1, start_daemons=False)
            assert lab.status()["etcd"]["netns"] == [f"ovl-{lab_name}-e{index}" for index in (1, 2, 3)]
            members = lab.etcdctl("member", "list", "-w", "json").stdout
            assert len(json.loads(members)["members"]) == 3
            health = lab.etcdctl("endpoint", "health", check=False)
            assert health.returncode == 0 and health.stderr.count("is healthy") + health.stdout.count("is healthy") == 3
            # Two labs at once: distinct underlays, each its own etcd.
            assert not lab.underlay.overlaps(other.underlay)
            assert json.loads(other.etcdctl("get", "--print-value-only", "/coreos.com/network/config").stdout)
    finally:
        teardown(other_name)
    assert lab_objects(lab_name) == [] and lab_objects(other_name) == []


def _daemon_importable() -> str | None:
    probe = subprocess.run([sys.executable, "-c", "import overlay.daemon"], capture_output=True, text=True)
    return None if probe.returncode == 0 else probe.stderr.strip().splitlines()[-1]


def test_hosts_become_ready_and_reach_each_other_over_the_overlay(lab_name):
    missing = _daemon_importable()
    if missing:
        pytest.skip(f"the daemon cannot run yet: {missing}")
    with Lab(lab_name) as lab:
        started = time.monotonic()
        lab.up(hosts=3)
        lab.wait_converged(timeout=60)
        print(f"3 hosts ready and converged {time.monotonic() - started:.1f} s after up began")
        report = lab.status()
        subnets = [host["subnet"] for host in report["hosts"]]
        assert all(host["ready"] for host in report["hosts"]), report
        assert None not in subnets and len(set(subnets)) == 3
        assert all(IPv4Network(subnet).subnet_of(IPv4Network("10.244.0.0/16")) for subnet in subnets)

        matrix = lab.reachability()
        assert [pair for pair, rtt in matrix.items() if rtt is None] == []
        assert_pings_travel_as_vxlan(lab)

        # A restarted daemon keeps its subnet and becomes ready again.
        before = lab.subnet("h2")
        old_pid = lab.daemon_pid("h2")
        new_pid = lab.restart("h2")
        assert new_pid != old_pid and not pid_alive(old_pid)
        lab.wait_ready(["h2"], timeout=60)
        assert lab.subnet("h2") == before
        pids = lab_pids(lab_name)
    assert_gone(lab_name, pids)


def assert_pings_travel_as_vxlan(lab: Lab) -> None:
    """Sniffing h1's underlay port (the root end of its veth: a bridge device itself does not see
    frames forwarded between its ports), a ping h1 -> h2 over the overlay is VXLAN on UDP 8472
    with VNI 1, outer addresses the public IPs, inner addresses the VXLAN device addresses."""
    from scapy.all import AsyncSniffer
    from scapy.layers.inet import ICMP, IP, UDP
    from scapy.layers.vxlan import VXLAN

    h1, h2 = lab.host("h1"), lab.host("h2")
    source, target = str(lab.overlay_address(h1)), str(lab.overlay_address(h2))
    sniffer = AsyncSniffer(iface=h1.link, store=True,
                           lfilter=lambda packet: UDP in packet and packet[UDP].dport == 8472)
    sniffer.start()
    try:
        wait_until_sniffing = time.monotonic() + 10
        while not getattr(sniffer, "running", False) and time.monotonic() < wait_until_sniffing:
            time.sleep(0.02)
        assert lab.ping(h1, target, count=3, wait=1) is not None
    finally:
        packets = sniffer.stop() or []
    echoes = [packet for packet in packets if VXLAN in packet and ICMP in packet[VXLAN]
              and packet[VXLAN][IP].src == source and packet[VXLAN][IP].dst == target]
    assert echoes, f"no VXLAN-encapsulated ping seen among {len(packets)} packets on {h1.link}"
    for packet in echoes:
        assert packet[VXLAN].vni == 1
        assert (packet[IP].src, packet[IP].dst) == (str(h1.public_ip), str(h2.public_ip))


def test_lab_demo_command(lab_name):
    missing = _daemon_importable()
    if missing:
        pytest.skip(f"the daemon cannot run yet: {missing}")
    demo = subprocess.run([OVERLAYCTL, "lab", "demo", "--name", lab_name], capture_output=True, text=True,
                          timeout=180)
    assert demo.returncode == 0, demo.stdout + demo.stderr
    assert "9/9 pairs reachable" in demo.stdout
    assert "3 lease(s)" in demo.stdout
    assert f"overlayctl lab down --name {lab_name}" in demo.stdout
    assert Lab.load(lab_name).converged()   # left up for the newcomer to explore
