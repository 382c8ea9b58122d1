"""Moved workloads keep their address: a lab container moved to another host (`Lab.move_container`,
the same as `overlayctl lab move`) keeps its namespace and address, and the overlay follows it.

Real kernel, real etcd, one overlayd per lab host, containers attached through the CNI plugin as
a runtime attaches them. Checked on the end state: pings from every other container, the origin
host's routes and silence, the claim in etcd, and what is left after DEL. Waits poll against
deadlines; nothing sleeps to wait.
"""

from __future__ import annotations

import base64
import json
import secrets
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from ipaddress import IPv4Interface

import pytest

from cni.runtime import Attachment, PluginFailed
from overlay.lab import Lab, LabError, wait_until
from overlay.lease import DEFAULT_PREFIX
from bench.moves import SERVER   # the echo server the benchmark moves, the same here
from tests.support.lab import unique_lab_name

CLAIMS = f"{DEFAULT_PREFIX}/claims/"


def lab_name() -> str:
    return unique_lab_name(LAB_LETTER)


LAB_LETTER = "m"


def claims(lab: Lab) -> dict[str, dict]:
    out = lab.etcdctl("get", "--prefix", CLAIMS, "-w", "json").stdout
    kvs = json.loads(out).get("kvs") or []
    return {base64.b64decode(kv["key"]).decode()[len(CLAIMS):]: json.loads(base64.b64decode(kv["value"]))
            for kv in kvs}


def reaches_all(lab: Lab, target: str, timeout: float = 20.0) -> None:
    """Every other container pings the target's address (retrying until the deadline)."""
    moved = lab.container(target)
    others = [c for c in lab.containers if c.name != target]

    def until_reached(source) -> float:
        deadline = time.monotonic() + timeout
        while True:
            rtt = lab.container_ping(source, moved.address, wait=0.5)
            if rtt is not None:
                return rtt
            assert time.monotonic() < deadline, f"{source.name} on {source.host} cannot reach {target} {moved.address}"
    with ThreadPoolExecutor(max_workers=len(others)) as pool:
        list(pool.map(until_reached, others))


def host_route(lab: Lab, host: str, address) -> str:
    return lab.exec(host, ["ip", "-o", "route", "get", str(address)]).stdout.strip()


def test_moved_container_keeps_its_address_and_everyone_reaches_it(lab):
    lab.up(hosts=3, containers=2)
    lab.wait_converged(timeout=60)
    mover = lab.container("h1c1")
    address = mover.address
    reaches_all(lab, "h1c1")

    moved = lab.move_container("h1c1", "h2")
    assert moved.host == "h2" and moved.address == address and str(moved.ip) == f"{address}/32"
    assert moved.netns == mover.netns
    held = claims(lab)[str(address)]
    assert held["PublicIP"] == str(lab.host("h2").public_ip) and held["Subnet"] == str(lab.subnet("h2"))
    # Inside the container nothing depends on a bridge: a /32 and a gateway on-link.
    routes = lab.container_exec("h1c1", ["ip", "-4", "route"]).stdout
    assert "default via 169.254.1.1 dev eth0" in routes and "169.254.1.1 dev eth0 proto static scope link" in routes

    reaches_all(lab, "h1c1")
    # CHECK on the new host verifies the moved attachment (host route, /32, gateway).
    lab.conflist("h2").check(lab._attachment(moved), moved.result)
    # The origin routes the address to the new host's VTEP, not to its bridge...
    via = f"via {lab.subnet('h2').network_address} dev flannel.1"
    assert via in host_route(lab, "h1", address)
    assert via in host_route(lab, "h3", address)
    # ...and nothing on the origin answers for it: its bridge has no port with that MAC any more.
    fdb = lab.exec("h1", ["bridge", "fdb", "show", "br", "ovl-cni0"]).stdout
    assert "0a:58:" + ":".join(f"{b:02x}" for b in address.packed) not in fdb
    # The origin keeps the address out of its pool while it is claimed.
    with pytest.raises(LabError, match="claimed by host"):
        lab.add_container("h1", name="back", ip=address)

    # A claim that vanishes (deleted by hand here; a lease lost and re-acquired does the same)
    # is made again by the host whose container has the address.
    lab.etcdctl("del", CLAIMS + str(address))
    wait_until(lambda: str(address) in claims(lab), time.monotonic() + 15, f"h2 to claim {address} again")
    reaches_all(lab, "h1c1")

    # DEL on the new host releases it everywhere; the address can come home.
    lab.remove_container("h1c1")
    assert str(address) not in claims(lab)
    for host in ("h1", "h3"):
        wait_until(lambda: via not in host_route(lab, host, address), time.monotonic() + 10,
                   f"{host} to drop its route of {address} to h2")
    home = lab.add_container("h1", name="home", ip=address)
    assert home.address == address
    reaches_all(lab, "home")


def test_two_hosts_claiming_one_address_at_once_exactly_one_wins(lab):
    lab.up(hosts=3, containers=1)
    lab.wait_converged(timeout=60)
    wanted = lab.subnet("h1").network_address + 77      # nobody has it
    contenders = ["h2", "h3"]
    links_before = {host: host_links(lab, host) for host in contenders}
    # Two runtimes, one on each host, ADD a container asking for the same address at the same
    # moment (the plugin exec'd directly: the Lab handle is not thread-safe).
    netns = {host: _netns(lab, f"{host}c9") for host in contenders}
    start = threading.Barrier(len(contenders))

    def add(host: str):
        attachment = claiming(netns[host], wanted)
        conflist = lab.conflist(host)
        start.wait()
        try:
            return host, conflist.add(attachment)
        except PluginFailed as exc:
            return host, exc
    with ThreadPoolExecutor(max_workers=2) as pool:
        outcomes = dict(pool.map(add, contenders))
    winners = [host for host, outcome in outcomes.items() if isinstance(outcome, dict)]
    losers = [host for host, outcome in outcomes.items() if isinstance(outcome, PluginFailed)]
    assert len(winners) == 1 and len(losers) == 1, outcomes
    winner, loser = winners[0], losers[0]
    error = outcomes[loser]
    assert error.code == 103 and f"claimed by host {lab.host(winner).public_ip}" in error.error["msg"], error.error
    # The loser left nothing behind: no link, no route, no record, no address in the container.
    assert host_links(lab, loser) == links_before[loser]
    assert str(wanted) not in lab.exec(loser, ["ip", "route", "show", "proto", "212"]).stdout
    records = json.loads((lab.host(loser).run_dir / "cni-ipam" / "allocations.json").read_text())
    assert str(wanted) not in {a["address"] for a in records["allocations"]}
    assert "eth0" not in subprocess.run(["ip", "-n", netns[loser], "-o", "link"], capture_output=True,
                                        text=True).stdout
    assert claims(lab)[str(wanted)]["PublicIP"] == str(lab.host(winner).public_ip)
    # The winner's container is reached from the containers of every host.
    for source in lab.containers:
        wait_until(lambda: subprocess.run(["ip", "netns", "exec", source.netns, "ping", "-c1", "-W1", str(wanted)],
                                          capture_output=True).returncode == 0,
                   time.monotonic() + 15, f"{source.name} to reach {wanted} on {winner}")


def host_links(lab: Lab, host: str) -> set[str]:
    return {line.split(":")[1].strip().split("@")[0] for line in lab.exec(host, ["ip", "-o", "link"]).stdout.splitlines()}


# --- a TCP connection across the move ----------------------------------------------------------

CLIENT = r"""
import socket, sys, time
sock = socket.create_connection((sys.argv[1], 5555), timeout=30)
sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
duration, longest, last, sent = float(sys.argv[2]), 0.0, time.monotonic(), 0
end = time.monotonic() + duration
while time.monotonic() < end:
    sock.sendall(sent.to_bytes(8, "big"))
    got = b""
    while len(got) < 8:
        chunk = sock.recv(8 - len(got))
        if not chunk:
            raise SystemExit("connection closed")
        got += chunk
    assert int.from_bytes(got, "big") == sent
    now = time.monotonic()
    longest, last, sent = max(longest, now - last), now, sent + 1
    time.sleep(0.01)
print(f"{sent} {longest:.3f}", flush=True)
"""


def tcp_stream_across_move(lab: Lab, mover: str, client: str, to_host: str, duration: float = 6.0):
    """Run an echo server in `mover` and a client in `client` that round-trips every 10 ms; move
    the server's container halfway. (round trips, longest pause in s, move timings)."""
    server = subprocess.Popen(["ip", "netns", "exec", lab.container(mover).netns, sys.executable, "-c", SERVER],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert server.stdout.readline().strip() == "listening"
        runner = subprocess.Popen(["ip", "netns", "exec", lab.container(client).netns, sys.executable, "-c", CLIENT,
                                   str(lab.container(mover).address), str(duration)],
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        time.sleep(duration / 3)   # let the stream run before the move (a fixed share of the stream, not a wait)
        timings: dict = {}
        lab.move_container(mover, to_host, timings=timings)
        out, err = runner.communicate(timeout=duration + 60)
        assert runner.returncode == 0, f"the TCP stream broke across the move: {err or out}"
        count, longest = out.split()
        return int(count), float(longest), timings
    finally:
        server.kill()
        server.wait()


def test_tcp_connection_pauses_and_carries_on_across_a_move(lab):
    lab.up(hosts=3, containers=1)
    lab.wait_converged(timeout=60)
    reaches_all(lab, "h1c1")
    count, longest, timings = tcp_stream_across_move(lab, "h1c1", "h3c1", "h2")
    print(f"TCP stream across the move: {count} round trips, longest pause {longest * 1000:.0f} ms; "
          f"DEL {1000 * (timings['del_done'] - timings['del_started']):.0f} ms, "
          f"ADD {1000 * (timings['add_done'] - timings['del_done']):.0f} ms")
    assert count > 100
    assert longest < 5.0


# --- the origin decides ---------------------------------------------------------------------------

def records(lab: Lab, host: str) -> dict:
    return json.loads((lab.host(host).run_dir / "cni-ipam" / "allocations.json").read_text())


def _netns(lab: Lab, name: str) -> str:
    netns = f"ovl-{lab.name}-{name}"
    subprocess.run(["ip", "netns", "add", netns], check=True)
    return netns


def claiming(netns: str, address) -> Attachment:
    return Attachment(secrets.token_hex(32), f"/run/netns/{netns}", "eth0", f"IP={address}")


def failed_claim(lab: Lab, host: str, attachment: Attachment, address) -> PluginFailed:
    """The ADD of an attachment claiming `address` on host, which must fail and leave on host no
    link, no record and no claim of the address; the failure."""
    links_before = host_links(lab, host)
    with pytest.raises(PluginFailed) as failed:
        lab.conflist(host).add(attachment)
    assert host_links(lab, host) == links_before
    assert str(address) not in {a["address"] for a in records(lab, host)["allocations"]}
    assert str(address) not in claims(lab)
    return failed.value


def test_claim_of_an_address_in_use_on_its_origin_is_refused_and_leaves_nothing_behind(lab):
    lab.up(hosts=3, containers=1)
    lab.wait_converged(timeout=60)
    busy = lab.container("h1c1")              # still attached on h1: its address is in use there
    netns = _netns(lab, "h2c9")
    attachment = claiming(netns, busy.address)
    error = failed_claim(lab, "h2", attachment, busy.address)
    assert error.code == 103, error.error
    assert (f"in use on origin host {lab.host('h1').public_ip} (subnet {lab.subnet('h1')})" in error.error["msg"]
            and f"container {busy.container_id[:12]} eth0" in error.error["msg"]), error.error
    # Nothing else left on the claimant either: no host route, no address inside.
    assert str(busy.address) not in lab.exec("h2", ["ip", "route", "show", "proto", "212"]).stdout
    assert "eth0" not in subprocess.run(["ip", "-n", netns, "-o", "link"], capture_output=True, text=True).stdout
    # The origin kept it all along: no route away, nothing reserved, reached from every container.
    assert f"via {lab.subnet('h2').network_address}" not in host_route(lab, "h1", busy.address)
    assert records(lab, "h1").get("reserved", []) == []
    reaches_all(lab, "h1c1")
    # A DEL of the refused attachment (a runtime cleaning up) is harmless.
    lab.conflist("h2").delete(attachment)


def test_the_origin_never_hands_out_a_granted_address(lab):
    from cni.allocator import AllocationStore, AttachmentKey, allocate, store_dir
    from cni.errors import PoolExhausted

    lab.up(hosts=3, containers=1)
    lab.wait_converged(timeout=60)
    address = lab.container("h1c1").address
    lab.move_container("h1c1", "h2")
    assert claims(lab)[str(address)]["Grant"] == "Granted"
    assert str(address) in records(lab, "h1")["reserved"]     # reserved before it was granted
    # Hold the origin's allocator busy: four threads allocate from h1's records (the same file and
    # lock the CNI service and the daemon's granter use) until the pool is exhausted, while real
    # ADDs run through h1's plugin.
    subnet = lab.subnet("h1")
    store = AllocationStore(store_dir(lab.host("h1").run_dir))
    handed_out: list = []

    def allocate_until_exhausted(worker: int) -> None:
        n = 0
        while True:
            key = AttachmentKey("busy", f"busy{worker}x{n}", "eth0")
            n += 1

            def take(state):
                state, allocation, _ = allocate(state, key, subnet, subnet.network_address + 1, "ovlvbusy", "/x")
                return state, allocation
            try:
                handed_out.append(store.update(take).address)
            except PoolExhausted:
                return
    def add_through_the_plugin(i: int):
        try:
            result = lab.conflist("h1").add(Attachment(secrets.token_hex(32), f"/run/netns/{_netns(lab, f'h1b{i}')}",
                                                       "eth0", ""))
        except PluginFailed as exc:
            assert exc.code == 100, exc.error    # the busy threads took the rest of the pool first
            return None
        return IPv4Interface(result["ips"][0]["address"]).ip
    with ThreadPoolExecutor(max_workers=7) as pool:
        busy = [pool.submit(allocate_until_exhausted, worker) for worker in range(4)]
        added = [pool.submit(add_through_the_plugin, i) for i in range(3)]
        for future in busy:
            future.result()
        real = [future.result() for future in added if future.result() is not None]
    assert address not in handed_out and address not in real
    # Exhausted: every usable address of the /24 (253, the gateway's excluded) but the moved one.
    assert len(handed_out) + len(real) + 1 == 253 and len(set(handed_out + real)) == 252
    with pytest.raises(LabError, match="claimed by host"):
        lab.add_container("h1", name="back", ip=address)
    # Give the busy records back, then let the container go home: DEL on h2, ADD on h1.
    store.update(lambda state: (_release_all(state, "busy"), None))
    lab.remove_container("h1c1")
    home = lab.add_container("h1", name="home", ip=address)
    assert home.address == address
    wait_until(lambda: str(address) not in records(lab, "h1")["reserved"], time.monotonic() + 15,
               f"h1 to drop its reservation of {address}")


def _release_all(state, network: str):
    from cni.allocator import release_unlisted
    return release_unlisted(state, network, frozenset())[0]


def test_an_origin_that_is_down_fails_the_claim_with_11_and_decides_when_it_is_back(lab):
    lab.up(hosts=2, containers=1)
    lab.wait_converged(timeout=60)
    wanted = lab.subnet("h1").network_address + 77      # free on h1
    lab.stop_daemon("h1")                              # its lease lives on (TTL 24 h): h1 is the origin
    error = failed_claim(lab, "h2", claiming(_netns(lab, "h2c9"), wanted), wanted)
    assert error.code == 11, error.error
    assert (f"origin host {lab.host('h1').public_ip} (subnet {lab.subnet('h1')}) did not answer" in error.error["msg"]
            and "is overlayd running there?" in error.error["msg"]), error.error
    # A claim left pending while the origin was down (by a host that then went quiet: none of
    # the lab's, so no keeper withdraws it) is decided by the origin's first listing when it is back...
    stranger = {"PublicIP": "198.18.250.9", "VtepMAC": "c6:d2:00:00:fa:09", "Subnet": "10.244.250.0/24",
                "ContainerID": "stranger", "Grant": "Pending"}
    lab.etcdctl("put", CLAIMS + str(wanted), json.dumps(stranger))
    lab.start_daemon("h1")
    wait_until(lambda: claims(lab).get(str(wanted), {}).get("Grant") == "Granted", time.monotonic() + 30,
               f"h1 to grant the pending claim on {wanted} when it is back")
    assert str(wanted) in records(lab, "h1")["reserved"]
    assert claims(lab)[str(wanted)]["ContainerID"] == "stranger"
    # ...and when the claim goes (its claimant's lease expired, say), the reservation goes too.
    lab.etcdctl("del", CLAIMS + str(wanted))
    wait_until(lambda: str(wanted) not in records(lab, "h1")["reserved"], time.monotonic() + 15,
               f"h1 to drop its reservation of {wanted}")
    lab.wait_converged(timeout=60)
    assert lab.add_container("h1", name="there", ip=wanted).address == wanted


def test_a_move_racing_the_origins_allocator_never_gives_one_address_to_two_containers(lab):
    from cni.allocator import AllocationStore, AttachmentKey, allocate, store_dir
    from cni.errors import PoolExhausted

    lab.up(hosts=3, containers=1)
    lab.wait_converged(timeout=60)
    address = lab.container("h1c1").address
    subnet = lab.subnet("h1")
    store = AllocationStore(store_dir(lab.host("h1").run_dir))
    handed_out: list = []
    moved, full = threading.Event(), threading.Event()

    def allocate_until_moved() -> None:
        # Takes every free address of h1 and keeps trying while the move runs: the address the
        # DEL frees on h1 is taken the moment the allocator gets it, unless it is reserved first.
        n = 0
        while not moved.is_set():
            key = AttachmentKey("busy", f"busy{n}", "eth0")

            def take(state):
                state, allocation, _ = allocate(state, key, subnet, subnet.network_address + 1, "ovlvbusy", "/x")
                return state, allocation
            try:
                handed_out.append(store.update(take).address)
                n += 1
            except PoolExhausted:
                full.set()
                moved.wait(0.001)   # poll interval while the pool is full
    with ThreadPoolExecutor(max_workers=1) as pool:
        busy = pool.submit(allocate_until_moved)
        try:
            assert full.wait(60), "the busy allocator did not fill h1's pool"
            lab.move_container("h1c1", "h2")
            outcome = None
        except LabError as exc:
            outcome = str(exc)
        finally:
            moved.set()
        busy.result()
    print(f"move racing the origin's allocator: {outcome or 'granted'}; "
          f"{len(handed_out)} addresses handed out on h1")
    if outcome is None:
        # Granted: reserved before the grant, so the busy allocator never got it.
        assert address not in handed_out and claims(lab)[str(address)]["Grant"] == "Granted"
        reaches_all(lab, "h1c1")
    else:
        # The busy allocator got it first: the origin refused, and nothing of the move is left.
        assert f"in use on origin host {lab.host('h1').public_ip}" in outcome, outcome
        assert address in handed_out and str(address) not in claims(lab)
        assert str(address) not in {a["address"] for a in records(lab, "h2")["allocations"]}
