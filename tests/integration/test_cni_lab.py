"""The CNI plugin against real overlayd hosts: containers on two lab hosts reach each other over
the VXLAN overlay, attached through the plugin exactly as a runtime attaches them, with the
daemon hosting the CNI service in each host's namespace. Container namespaces: ovl-ct-<pid>-*."""

from __future__ import annotations

import os
import secrets
import subprocess
from ipaddress import IPv4Interface

import pytest

from overlay.lab import Lab, teardown
from tests.support.cni import Plugin, add_netns, del_netns, wait_for

TAG = f"ovl-ct-{os.getpid()}-lab"


@pytest.fixture
def lab():
    name = "c" + "".join(secrets.choice("abcdefghijklmnopqrstuvwxyz0123456789") for _ in range(3))
    try:
        with Lab(name) as handle:
            yield handle
    finally:
        teardown(name)


@pytest.fixture
def containers():
    made = []

    def make(label: str) -> str:
        made.append(f"{TAG}-{label}")
        return add_netns(made[-1])
    try:
        yield make
    finally:
        for name in made:
            del_netns(name)


def ping(netns_path: str, address: str) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", "netns", "exec", os.path.basename(netns_path), "ping", "-c", "1", "-W", "2",
                           address], capture_output=True, text=True)


def test_containers_on_two_hosts_reach_each_other(lab, containers, tmp_path):
    lab.up(hosts=2)
    lab.wait_converged(timeout=90)
    attached = []
    try:
        results = {}
        for host in ("h1", "h2"):
            plugin = Plugin(tmp_path / host / "bin", tmp_path / host / "net.d", lab.host(host).run_dir)
            path = containers(host)
            # The runtime need not be in the host's namespace: the plugin only talks to the
            # daemon's socket, and the daemon does the work inside the host.
            status, result = plugin.run("ADD", plugin.config(), f"lab-{host}", path)
            assert status == 0, result
            attached.append((plugin, host, path))
            address = IPv4Interface(result["ips"][0]["address"])
            assert address.network == lab.subnet(host)
            results[host] = (path, str(address.ip))
        (path1, ip1), (path2, ip2) = results["h1"], results["h2"]
        done = wait_for(lambda: ping(path1, ip2).returncode == 0 or None, 20, "a ping from h1's container to h2's")
        assert done and ping(path2, ip1).returncode == 0

        # While h1's daemon is down the plugin answers "try again later"; once it is back, ADD works.
        plugin = attached[0][0]
        lab.stop_daemon("h1")
        status, error = plugin.run("ADD", plugin.config(), "lab-h1-late", containers("late"))
        assert status != 0 and error["code"] == 11
        lab.start_daemon("h1")
        lab.wait_ready(["h1"], timeout=60)
        status, result = plugin.run("ADD", plugin.config(), "lab-h1-late", os.path.join("/run/netns", f"{TAG}-late"))
        assert status == 0, result
        attached.append((plugin, "h1", f"/run/netns/{TAG}-late"))
        # the first container kept its address and connectivity across the restart
        assert ping(path1, ip2).returncode == 0
    finally:
        for plugin, host, path in attached:
            cid = "lab-h1-late" if path.endswith("late") else f"lab-{host}"
            plugin.run("DEL", plugin.config(), cid, path)
