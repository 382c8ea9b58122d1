"""A real runtime drives the plugin: podman 4.3 (CNI backend) as the runtime of lab host h1 attaches
a container through our `overlay` plugin, and that container and a lab container on host h2 reach
each other over the VXLAN overlay. Removing the podman container releases its attachment (DEL).

Skipped, saying why, where podman, runc or a static busybox (the image; no registry is reachable)
are missing: `apt-get install podman runc busybox-static` (scripts/bootstrap installs them).
Podman runs with a private configuration and storage under a temporary directory, see
tests/support/podman.py; nothing of the machine's own is read or left changed.
"""

from __future__ import annotations

import time
from ipaddress import IPv4Address

import pytest

from overlay.lab import CNI_NETWORK_NAME, list_netns
from tests.support.cni import allocations, host_veths
from tests.support.podman import Podman, missing_tools

MISSING = missing_tools()
pytestmark = pytest.mark.skipif(bool(MISSING), reason=f"podman test needs {', '.join(MISSING)} "
                                                      "(apt-get install podman runc busybox-static)")


LAB_LETTER = "p"


@pytest.fixture
def podman(lab, tmp_path):
    lab.up(hosts=2, containers=1)
    bin_dir, conf_dir = lab.cni_dirs("h1")
    runtime = Podman(tmp_path / "podman", lab.host("h1").netns, conf_dir, [bin_dir])
    try:
        yield runtime
    finally:
        runtime.close()


def test_podman_container_on_one_host_reaches_a_lab_container_on_another(lab, podman):
    image = podman.import_busybox()
    lab.wait_converged(timeout=60)
    target = lab.container("h2c1").address
    h1 = lab.host("h1")
    veths_before = host_veths(h1.netns)

    started = time.monotonic()
    podman.run("run", "--detach", "--name", "ovl-pod", "--network", CNI_NETWORK_NAME, image, "sleep", "120")
    print(f"podman run --detach through the overlay plugin: {time.monotonic() - started:.2f} s")
    address = IPv4Address(podman.run("inspect", "--format",
                                     f"{{{{.NetworkSettings.Networks.{CNI_NETWORK_NAME}.IPAddress}}}}",
                                     "ovl-pod").stdout.strip())
    assert address in lab.subnet("h1")
    # The container has that address on eth0, as the plugin's result said.
    shown = podman.run("exec", "ovl-pod", "ip", "-4", "-o", "addr", "show", "eth0").stdout
    assert f"inet {address}/{lab.subnet('h1').prefixlen}" in shown
    recorded = [a for a in allocations(h1.run_dir) if a["address"].split("/")[0] == str(address)]
    assert len(recorded) == 1 and len(recorded[0]["containerID"]) == 64
    assert len(host_veths(h1.netns)) == len(veths_before) + 1

    # Across hosts, both ways: podman's container on h1 <-> the lab's container on h2.
    ping = podman.run("exec", "ovl-pod", "sh", "-c",
                      f"for i in 1 2 3 4 5; do ping -c 1 -W 2 {target} && exit 0; done; exit 1", check=False)
    assert ping.returncode == 0, ping.stdout + ping.stderr
    assert lab.container_ping("h2c1", address) is not None

    # Removing the container runs DEL: the address and the host veth are released.
    podman.run("rm", "--force", "--time", "0", "ovl-pod")
    assert str(address) not in {a["address"].split("/")[0] for a in allocations(h1.run_dir)}
    assert host_veths(h1.netns) == veths_before
    assert not [netns for netns in list_netns() if netns.startswith("netns-") and netns not in podman.netns_before]
    # The lab's own container on h1 is untouched.
    assert [a["address"].split("/")[0] for a in allocations(h1.run_dir)] == [str(lab.container("h1c1").address)]
    assert lab.container_ping("h1c1", target) is not None
