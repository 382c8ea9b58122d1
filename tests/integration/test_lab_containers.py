"""Lab containers: `lab up --containers M` attaches containers to every host through the CNI
plugin, exactly as a runtime does, and `lab down` detaches and removes them.

Checked on the end state: the container namespaces and their addresses in the kernel, the
plugin's allocation records in each host's run dir, pings between containers on different hosts
over the overlay, a container reaching the lab's outside world (the root namespace) only through
its host's masquerade, and nothing of the lab left after `down`, also after the daemons crashed.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from ipaddress import IPv4Address, IPv4Interface
from pathlib import Path

import pytest

from overlay.lab import LAB_ROOT, Lab, LabError, lab_names, list_links, list_netns, teardown
from tests.support.cni import allocations, host_veths, ip_json
from tests.support.lab import unique_lab_name

OVERLAYCTL = str(Path(sys.executable).parent / "overlayctl")


def lab_name() -> str:
    return unique_lab_name(LAB_LETTER)


LAB_LETTER = "m"


def leftovers(name: str) -> list[str]:
    mark = f"ovl-{name}-"
    return [netns for netns in list_netns() if netns.startswith(mark)] + \
           [link["ifname"] for link in list_links() if link.get("ifname", "").startswith(mark)]


def overlayctl(*args: str) -> subprocess.CompletedProcess:
    done = subprocess.run([OVERLAYCTL, "lab", *args], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr + done.stdout
    return done


def test_containers_attached_per_host_reach_each_other_and_the_underlay(lab):
    started = time.monotonic()
    lab.up(hosts=3, containers=2)
    lab.wait_converged(timeout=60)
    print(f"3 hosts with 2 containers each, converged {time.monotonic() - started:.1f} s after up")

    report = lab.status()
    for host in report["hosts"]:
        assert [c["name"] for c in host["containers"]] == [f"{host['name']}c1", f"{host['name']}c2"]
        for listed in host["containers"]:
            assert listed["netns"] == f"ovl-{lab.name}-{listed['name']}"
            assert len(listed["container_id"]) == 64
            # The address is in the kernel, on the container's eth0, inside the host's subnet.
            (link,) = ip_json("-4", "addr", "show", "dev", "eth0", netns=listed["netns"])
            (info,) = link["addr_info"]
            assert info["local"] == listed["ip"]
            assert IPv4Interface(f"{info['local']}/{info['prefixlen']}").network == IPv4Interface(host["subnet"]).network
        # The plugin recorded exactly these attachments in the host's run dir.
        recorded = allocations(Path(host["run_dir"]))
        assert sorted(a["address"].split("/")[0] for a in recorded) == sorted(c["ip"] for c in host["containers"])

    matrix = lab.container_reachability()
    assert len(matrix) == 6 * 5
    assert not [pair for pair, rtt in matrix.items() if rtt is None], matrix

    probe = lab.masquerade_probe("h2c1")
    print(probe)
    assert probe.rtt_ms is not None, "no reply from the root namespace"
    assert probe.underlay_source == probe.host_public_ip == lab.host("h2").public_ip
    assert probe.target == lab.gateway
    # The root namespace does not route the overlay into the lab: the reply needs the NAT.
    assert not any(line.startswith("10.244.") for line in subprocess.run(
        ["ip", "-4", "route", "show", "dev", lab.bridge], capture_output=True, text=True).stdout.splitlines())

    # One more container, named, then removed again: DEL releases its address and its host veth.
    veths_before = host_veths(lab.host("h1").netns)
    extra = lab.add_container("h1", name="web")
    assert extra.netns == f"ovl-{lab.name}-web" and extra.address in lab.subnet("h1")
    assert lab.container_ping("web", lab.container("h3c2").address) is not None
    assert len(host_veths(lab.host("h1").netns)) == len(veths_before) + 1
    lab.remove_container("web")
    assert f"ovl-{lab.name}-web" not in list_netns()
    assert host_veths(lab.host("h1").netns) == veths_before
    assert str(extra.address) not in json.dumps(allocations(lab.host("h1").run_dir))
    assert "web" not in [c.name for c in lab.containers]

    # What `down` does first: DEL every container while the daemons run; every allocation goes.
    errors = lab.detach_containers()
    assert errors == {c: None for c in ("h1c1", "h1c2", "h2c1", "h2c2", "h3c1", "h3c2")}
    for host in lab.hosts:
        assert allocations(host.run_dir) == []
        assert host_veths(host.netns) == set()
    assert not [netns for netns in list_netns() if netns.startswith(f"ovl-{lab.name}-h") and "c" in netns[-3:]]
    assert lab.status()["hosts"][0]["containers"] == []


def test_cli_up_with_containers_status_and_down_leave_nothing():
    name = lab_name()
    try:
        out = overlayctl("up", "--name", name, "--hosts", "2", "--containers", "2").stdout
        assert "4 container(s) attached through the CNI plugin" in out
        report = json.loads(overlayctl("status", "--name", name, "--json").stdout)
        containers = {c["name"]: c for host in report["hosts"] for c in host["containers"]}
        assert sorted(containers) == ["h1c1", "h1c2", "h2c1", "h2c2"]
        assert all(set(c) == {"name", "netns", "ip", "container_id"} and IPv4Address(c["ip"])
                   for c in containers.values())
        run_dirs = [Path(host["run_dir"]) for host in report["hosts"]]
        assert sum(len(allocations(run_dir)) for run_dir in run_dirs) == 4

        out = overlayctl("down", "--name", name).stdout
        for container in containers.values():
            assert container["netns"] in out
        assert leftovers(name) == []
        assert not (LAB_ROOT / name).exists()
    finally:
        teardown(name)


def test_down_after_a_crash_removes_containers_and_leftovers():
    name = lab_name()
    lab = Lab(name)
    try:
        lab.up(hosts=2, containers=1)
        # A crash: the daemons die without a word, and a container namespace the state never
        # recorded (a runtime killed between `netns add` and its record) is lying around.
        for host in lab.hosts:
            lab.kill_daemon(host)
        subprocess.run(["ip", "netns", "add", f"ovl-{name}-h2c9"], check=True)
        started = time.monotonic()
        removed = teardown(name)
        print(f"teardown with dead daemons: {time.monotonic() - started:.2f} s")
        assert {f"ovl-{name}-h1c1", f"ovl-{name}-h2c1", f"ovl-{name}-h2c9"} <= set(removed)
        assert leftovers(name) == []

        # A lone container namespace, its lab's state gone, is still found by `down --all`.
        subprocess.run(["ip", "netns", "add", f"ovl-{name}-h1c1"], check=True)
        assert name in lab_names()
        assert teardown(name) == [f"ovl-{name}-h1c1"]
    finally:
        teardown(name)


def test_container_names_are_checked(lab):
    lab.up(hosts=1)
    lab.wait_ready(timeout=60)
    for bad in ("h1", "br", "e1", "Web", "x" * 25, "a/b"):
        with pytest.raises(LabError, match="container name"):
            lab.add_container("h1", name=bad)
    assert lab.containers == []
    assert leftovers(lab.name) and not [netns for netns in leftovers(lab.name) if "c" in netns.rsplit("-", 1)[1]]


def test_demo_shows_containers_across_hosts_and_masquerade():
    name = lab_name()
    try:
        out = overlayctl("demo", "--name", name).stdout
        assert "9/9 pairs reachable" in out
        assert "30/30 container pairs reachable (24/24 across hosts)" in out
        lab = Lab.load(name)
        first = lab.containers[0]
        public_ip = lab.host(first.host).public_ip
        assert (f"masquerade: ping from container {first.name} ({first.address}) to {lab.gateway}" in out)
        assert f"with source {public_ip} (the host's public IP is {public_ip})" in out
        assert "reply: NONE" not in out
    finally:
        teardown(name)
    assert leftovers(name) == []
