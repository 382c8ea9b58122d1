"""The CNI plugin end to end: the installed executable, exec'd with the CNI environment and stdin
as a runtime does, against the warm service running standalone in a namespace that plays a host.

Every namespace made here is named ovl-ct-<pid>-..., and removed afterwards, also on failure."""

from __future__ import annotations

import os
import subprocess
from concurrent.futures import ThreadPoolExecutor
from ipaddress import IPv4Address, IPv4Interface

import pytest

from cni.service import host_ifname
from tests.support.cni import Plugin, Service, add_netns, allocations, del_netns, host_veths, ip, ip_json

VERSIONS = ["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"]
TAG = f"ovl-ct-{os.getpid()}"
SUBNET = "10.244.3.1/24"


@pytest.fixture(scope="module")
def host(tmp_path_factory):
    """A host namespace running the CNI service on its own run dir, and the installed plugin."""
    base = tmp_path_factory.mktemp("cni")
    name = f"{TAG}-h"
    add_netns(name)
    service = None
    try:
        run_dir = base / "run"
        run_dir.mkdir()
        service = Service(name, run_dir, SUBNET)
        plugin = Plugin(base / "bin", base / "net.d", run_dir)
        yield name, service, plugin
    finally:
        if service is not None:
            service.stop()
        del_netns(name)


@pytest.fixture
def containers():
    """Make container namespaces on demand; all removed at the end of the test."""
    made = []

    def make(label: str) -> str:
        name = f"{TAG}-{label}"
        made.append(name)
        return add_netns(name)
    try:
        yield make
    finally:
        for name in made:
            del_netns(name)


def container_state(netns_path: str, ifname: str = "eth0") -> dict:
    name = os.path.basename(netns_path)
    link = ip_json("-d", "addr", "show", "dev", ifname, netns=name)[0]
    routes = ip_json("route", "show", "default", netns=name)
    return {"mac": link["address"], "mtu": link["mtu"], "up": "UP" in link["flags"],
            "kind": link.get("linkinfo", {}).get("info_kind"),
            "addresses": [f"{a['local']}/{a['prefixlen']}" for a in link["addr_info"] if a["family"] == "inet"],
            "default": [r.get("gateway") for r in routes]}


def with_prev(config: dict, result: dict) -> dict:
    return {**config, "prevResult": result}


@pytest.mark.parametrize("version", VERSIONS)
def test_add_check_del_del(host, containers, version):
    host_ns, service, plugin = host
    cid = f"ctr-{version.replace('.', '')}"
    path = containers(f"v{version.replace('.', '')}")
    config = plugin.config(version)

    status, result = plugin.run("ADD", config, cid, path)
    assert status == 0, result
    veth = host_ifname(cid, "eth0")
    assert result["cniVersion"] == version
    assert set(result) == {"cniVersion", "interfaces", "ips", "routes", "dns"}
    host_if, container_if = result["interfaces"]
    assert host_if["name"] == veth and "sandbox" not in host_if
    assert container_if["name"] == "eth0" and container_if["sandbox"] == path
    address = IPv4Interface(result["ips"][0]["address"])
    assert address.network == IPv4Interface(SUBNET).network and address.ip != IPv4Address("10.244.3.1")
    assert container_if["mac"] == "0a:58:" + ":".join(f"{b:02x}" for b in address.ip.packed)
    expected_ip = {"address": str(address), "gateway": "10.244.3.1", "interface": 1}
    if version < "1.0.0":
        expected_ip["version"] = "4"
    assert result["ips"] == [expected_ip]
    assert result["routes"] == [{"dst": "0.0.0.0/0", "gw": "10.244.3.1"}]
    assert result["dns"] == {}
    if version == "1.1.0":
        assert host_if["mtu"] == container_if["mtu"] == 1450
    else:
        assert "mtu" not in host_if and "mtu" not in container_if

    # The kernel agrees with the result.
    state = container_state(path)
    assert state == {"mac": container_if["mac"], "mtu": 1450, "up": True, "kind": "veth",
                     "addresses": [str(address)], "default": ["10.244.3.1"]}
    host_link = ip_json("-d", "link", "show", "dev", veth, netns=host_ns)[0]
    assert host_link["master"] == "ovl-cni0" and host_link["address"] == host_if["mac"] and host_link["mtu"] == 1450
    bridge = ip_json("addr", "show", "dev", "ovl-cni0", netns=host_ns)[0]
    assert "10.244.3.1" in [a["local"] for a in bridge["addr_info"]]
    assert [a["address"] for a in allocations(service.run_dir) if a["containerID"] == cid] == [str(address.ip)]

    if version >= "0.4.0":
        assert plugin.run("CHECK", with_prev(config, result), cid, path) == (0, None)
    else:
        status, error = plugin.run("CHECK", with_prev(config, result), cid, path)
        assert status != 0 and error["code"] == 1

    for _ in range(2):
        assert plugin.run("DEL", with_prev(config, result), cid, path) == (0, None)
        assert veth not in host_veths(host_ns)
        assert not [a for a in allocations(service.run_dir) if a["containerID"] == cid]
        assert ip("link", "show", "dev", "eth0", netns=os.path.basename(path), check=False).returncode != 0


def test_repeated_add_returns_the_same_result(host, containers):
    _, _, plugin = host
    path = containers("rep")
    first = plugin.run("ADD", plugin.config(), "rep", path)
    second = plugin.run("ADD", plugin.config(), "rep", path)
    try:
        assert first[0] == 0 and first == second
    finally:
        assert plugin.run("DEL", plugin.config(), "rep", path)[0] == 0


def test_a_bridge_removed_behind_the_services_back_is_made_again(host, containers):
    """The service remembers the bridge's index for a second; an ADD that finds it gone (the
    veth request names a master that no longer exists) checks the bridge again and retries."""
    host_ns, _, plugin = host
    first, second = containers("br1"), containers("br2")
    assert plugin.run("ADD", plugin.config(), "br1", first)[0] == 0
    try:
        ip("link", "del", "ovl-cni0", netns=host_ns)
        status, result = plugin.run("ADD", plugin.config(), "br2", second)
        assert status == 0, result
        bridge = ip_json("-d", "link", "show", "dev", "ovl-cni0", netns=host_ns)[0]
        veth = ip_json("-d", "link", "show", "dev", host_ifname("br2", "eth0"), netns=host_ns)[0]
        assert veth["master"] == "ovl-cni0" and "UP" in bridge["flags"]
        assert container_state(second)["default"] == ["10.244.3.1"]
    finally:
        plugin.run("DEL", plugin.config(), "br1", first)
        plugin.run("DEL", plugin.config(), "br2", second)


def test_container_reaches_its_gateway(host, containers):
    _, _, plugin = host
    path = containers("ping")
    status, result = plugin.run("ADD", plugin.config(), "ping", path)
    try:
        assert status == 0
        done = subprocess.run(["ip", "netns", "exec", os.path.basename(path), "ping", "-c", "1", "-W", "2",
                               "10.244.3.1"], capture_output=True, text=True)
        assert done.returncode == 0, done.stdout + done.stderr
    finally:
        plugin.run("DEL", plugin.config(), "ping", path)


def test_check_reports_drift(host, containers):
    host_ns, _, plugin = host
    path = containers("drift")
    config = plugin.config()
    status, result = plugin.run("ADD", config, "drift", path)
    try:
        assert status == 0
        address = result["ips"][0]["address"]
        ip("addr", "del", address, "dev", "eth0", netns=os.path.basename(path))
        status, error = plugin.run("CHECK", with_prev(config, result), "drift", path)
        assert status != 0 and error["code"] == 101 and address in error["msg"]
        ip("link", "set", host_ifname("drift", "eth0"), "down", netns=host_ns)
        status, error = plugin.run("CHECK", with_prev(config, result), "drift", path)
        assert status != 0 and "down" in error["msg"]
        # CHECK without prevResult is refused: the spec says it must be given
        assert plugin.run("CHECK", config, "drift", path)[1]["code"] == 101
    finally:
        assert plugin.run("DEL", config, "drift", path)[0] == 0


def test_bad_input_codes(host, containers):
    _, service, plugin = host
    path = containers("bad")
    good = plugin.config()
    cases = [
        (b'{"cniVersion": "1.1.0", "name": ', {}, 6),
        (plugin.config("0.2.0"), {}, 1),
        (plugin.config("7.0.0"), {}, 1),
        (good, {"CNI_IFNAME": None}, 4),
        (good, {"CNI_CONTAINERID": "bad id"}, 4),
        (good, {"CNI_COMMAND": "PLUG"}, 4),
        ({**good, "bridge": ["x"]}, {}, 7),
        ({**good, "ipam": {"type": "host-local"}}, {}, 2),
    ]
    for stdin, env, code in cases:
        status, error = plugin.run("ADD", stdin, "bad", path, env=env)
        assert status != 0 and error["code"] == code, (stdin, env, error)
        assert error["msg"]
    # A netns path that does not exist: code 3, and nothing allocated or made.
    status, error = plugin.run("ADD", good, "bad", f"/run/netns/{TAG}-does-not-exist")
    assert status != 0 and error["code"] == 3 and "does-not-exist" in error["msg"]
    assert not [a for a in allocations(service.run_dir) if a["containerID"] == "bad"]
    assert host_ifname("bad", "eth0") not in host_veths(host[0])


def test_failed_add_leaves_nothing(host, containers):
    host_ns, service, plugin = host
    path = containers("taken")
    # CNI_IFNAME is already taken inside the container by something not ours.
    # (A veth pair of its own: this kernel has no dummy driver.)
    ip("link", "add", "eth0", "type", "veth", "peer", "name", "ovl-ct-own", netns=os.path.basename(path))
    before = allocations(service.run_dir)
    status, error = plugin.run("ADD", plugin.config(), "taken", path)
    assert status != 0 and error["code"] == 102
    assert allocations(service.run_dir) == before
    assert host_ifname("taken", "eth0") not in host_veths(host_ns)
    assert ip_json("link", "show", "dev", "eth0", netns=os.path.basename(path))[0]["link"] == "ovl-ct-own"


def test_del_is_idempotent_and_tolerant(host, containers):
    host_ns, service, plugin = host
    config = plugin.config()
    # never added, no netns given
    assert plugin.run("DEL", config, "never") == (0, None)
    # the netns is gone before DEL (the kernel took the veth pair with it)
    path = containers("gone")
    assert plugin.run("ADD", config, "gone", path)[0] == 0
    del_netns(os.path.basename(path))
    assert plugin.run("DEL", config, "gone", path) == (0, None)
    assert plugin.run("DEL", config, "gone") == (0, None)
    assert not [a for a in allocations(service.run_dir) if a["containerID"] == "gone"]


def test_del_with_unreadable_records_still_unplugs_and_fails_until_they_are_readable(host, containers):
    host_ns, service, plugin = host
    config = plugin.config()
    path = containers("records")
    assert plugin.run("ADD", config, "records", path)[0] == 0
    records = service.run_dir / "cni-ipam" / "allocations.json"
    kept = records.read_bytes()
    try:
        records.write_bytes(kept[: len(kept) // 2])   # a short file, as a full disk leaves one
        status, error = plugin.run("DEL", config, "records", path)
        assert status != 0 and error["code"] == 5, error     # the runtime will try again
        assert host_ifname("records", "eth0") not in host_veths(host_ns)
    finally:
        records.write_bytes(kept)
    assert plugin.run("DEL", config, "records", path) == (0, None)
    assert not [a for a in allocations(service.run_dir) if a["containerID"] == "records"]


def test_del_of_an_older_container_never_unplugs_a_newer_one(host, containers):
    _, _, plugin = host
    config = plugin.config()
    old_path, new_path = containers("old"), containers("new")
    status, old = plugin.run("ADD", config, "pod-a-old", old_path)
    assert status == 0
    status, new = plugin.run("ADD", config, "pod-a-new", new_path)
    try:
        assert status == 0
        assert plugin.run("DEL", config, "pod-a-old", old_path) == (0, None)
        assert plugin.run("DEL", config, "pod-a-old") == (0, None)
        assert plugin.run("CHECK", with_prev(config, new), "pod-a-new", new_path) == (0, None)
    finally:
        plugin.run("DEL", config, "pod-a-new", new_path)


def test_gc_frees_what_a_crashed_runtime_left(host, containers):
    host_ns, service, plugin = host
    config = plugin.config(name="ovl-ct-gc")
    paths = {cid: containers(cid) for cid in ("gc1", "gc2", "gc3")}
    for cid, path in paths.items():
        assert plugin.run("ADD", config, cid, path)[0] == 0
    # An orphan host veth (as a crash between creation and rollback would leave), and an
    # attachment of another network that this GC must not touch.
    orphan = "ovlv" + "0" * 11
    ip("link", "add", orphan, "type", "veth", "peer", "name", "ovl-ct-peer", netns=host_ns)
    other = plugin.config(name="ovl-ct-other")
    other_path = containers("gco")
    assert plugin.run("ADD", other, "gco", other_path)[0] == 0
    try:
        keep = [{"containerID": "gc1", "ifname": "eth0"}]
        gc = {**config, "cni.dev/valid-attachments": keep, "cni.dev/attachments": keep}
        assert plugin.run("GC", gc) == (0, None)
        mine = {a["containerID"] for a in allocations(service.run_dir) if a["network"] == "ovl-ct-gc"}
        assert mine == {"gc1"}
        veths = host_veths(host_ns)
        assert host_ifname("gc1", "eth0") in veths and host_ifname("gco", "eth0") in veths
        assert host_ifname("gc2", "eth0") not in veths and host_ifname("gc3", "eth0") not in veths
        assert orphan not in veths
    finally:
        for cid, path in paths.items():
            plugin.run("DEL", config, cid, path)
        plugin.run("DEL", other, "gco", other_path)


def test_status(host, tmp_path):
    _, service, plugin = host
    assert plugin.run("STATUS", plugin.config()) == (0, None)
    status, error = plugin.run("STATUS", plugin.config("1.0.0"))
    assert status != 0 and error["code"] == 1
    # no daemon at all behind this run dir
    nobody = {**plugin.config(), "runDir": str(tmp_path)}
    status, error = plugin.run("STATUS", nobody)
    assert status != 0 and error["code"] == 50
    assert plugin.run("ADD", nobody, "x", "/run/netns/x")[1]["code"] == 11
    assert plugin.run("DEL", nobody, "x") == (0, None)
    # daemon up, subnet file gone (e.g. the lease was lost)
    subnet_file = service.run_dir / "subnet.env"
    saved = subnet_file.read_bytes()
    subnet_file.unlink()
    try:
        status, error = plugin.run("STATUS", plugin.config())
        assert status != 0 and error["code"] == 50
    finally:
        subnet_file.write_bytes(saved)


def test_50_parallel_adds_get_distinct_addresses_and_dels_empty_the_pool(host, containers):
    host_ns, service, plugin = host
    config = plugin.config(name="ovl-ct-par")
    paths = [containers(f"p{n}") for n in range(50)]
    with ThreadPoolExecutor(50) as pool:
        results = list(pool.map(lambda n: plugin.run("ADD", config, f"par{n}", paths[n]), range(50)))
        assert [status for status, _ in results] == [0] * 50, [r for s, r in results if s]
        addresses = {result["ips"][0]["address"] for _, result in results}
        assert len(addresses) == 50
        assert len([a for a in allocations(service.run_dir) if a["network"] == "ovl-ct-par"]) == 50
        dels = list(pool.map(lambda n: plugin.run("DEL", config, f"par{n}", paths[n]), range(50)))
    assert dels == [(0, None)] * 50
    assert not [a for a in allocations(service.run_dir) if a["network"] == "ovl-ct-par"]
    assert not {host_ifname(f"par{n}", "eth0") for n in range(50)} & host_veths(host_ns)


def test_exhausted_subnet_is_a_clear_error_and_leaks_nothing(tmp_path, containers):
    name = f"{TAG}-hx"
    add_netns(name)
    service = None
    try:
        run_dir = tmp_path / "run"
        run_dir.mkdir()
        service = Service(name, run_dir, "10.244.9.1/29")   # 5 addresses for containers
        plugin = Plugin(tmp_path / "bin", tmp_path / "net.d", run_dir)
        config = plugin.config(name="ovl-ct-small")
        for n in range(5):
            assert plugin.run("ADD", config, f"x{n}", containers(f"x{n}"))[0] == 0
        status, error = plugin.run("ADD", config, "x5", containers("x5"))
        assert status != 0 and error["code"] == 100 and "10.244.9.0/29" in error["msg"]
        assert len(allocations(run_dir)) == 5
        assert host_ifname("x5", "eth0") not in host_veths(name)
    finally:
        if service is not None:
            service.stop()
        del_netns(name)


def test_chained_with_the_reference_portmap(host, containers, tmp_path):
    """overlay then portmap, run as libcni runs a conflist: prevResult flows through portmap
    unchanged, and a host port reaches the container."""
    from cni.install import conflist
    from cni.runtime import Attachment, ConfList

    host_ns, service, plugin = host
    conf = conflist("ovl-ct-pm", str(service.run_dir), "ovl-cni0", portmap=True)
    # portmap programs iptables where it runs: run the chain inside the test host's namespace.
    chain = ConfList(conf, (str(plugin.executable.parent), "/usr/lib/cni"), host_netns=f"/run/netns/{host_ns}")
    chain.runtime_config = {"portMappings": [{"hostPort": 18080, "containerPort": 8080, "protocol": "tcp"}]}
    path = containers("pm")
    attachment = Attachment("pm", path)
    result = chain.add(attachment)
    server = None
    try:
        ours = [a for a in allocations(service.run_dir) if a["containerID"] == "pm"]
        assert result["ips"][0]["address"].split("/")[0] == ours[0]["address"]
        assert result["interfaces"][1] == {"name": "eth0", "mac": result["interfaces"][1]["mac"], "sandbox": path}
        # (No CHECK through the chain: Debian's portmap 1.1.1 fails its own CHECK on a host with
        # ip6tables when the result holds no IPv6 address, "could not check ipv6 dnat".)
        assert plugin.run("CHECK", {**plugin.config("1.0.0", name="ovl-ct-pm"), "prevResult": result},
                          "pm", path) == (0, None)
        # A TCP server in the container, reached through the host port on the host's address.
        server = subprocess.Popen(
            ["ip", "netns", "exec", os.path.basename(path), "python3", "-c",
             "import socket; s = socket.create_server(('0.0.0.0', 8080)); print('up', flush=True); "
             "c, _ = s.accept(); c.sendall(b'hello from the container'); c.close()"],
            stdout=subprocess.PIPE, text=True)
        assert server.stdout.readline().strip() == "up"
        client = subprocess.run(
            ["ip", "netns", "exec", host_ns, "python3", "-c",
             "import socket; c = socket.create_connection(('10.244.3.1', 18080), timeout=5); "
             "print(c.recv(100).decode())"], capture_output=True, text=True, timeout=15)
        assert client.stdout.strip() == "hello from the container", client.stderr
    finally:
        if server is not None:
            server.kill()
            server.wait()
        chain.delete(attachment, result)
    assert not [a for a in allocations(service.run_dir) if a["containerID"] == "pm"]
    rules = subprocess.run(["ip", "netns", "exec", host_ns, "iptables-save", "-t", "nat"], capture_output=True,
                           text=True).stdout
    assert "CNI-HOSTPORT-DNAT" in rules and "18080" not in rules   # portmap ran in the host, and cleaned up
