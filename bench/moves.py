"""Moves: a container keeps its address when it moves to another host (issue 7). With 10 lab
hosts and one container each, one container moves from host to host; per move we measure

- reach: from the moment the ADD on the new host returned (the attach) until every other
  container (9, one per host, the origin's included) has had a ping answered by the moved
  address; the slowest of them is the move's figure. Negative means everyone was answered
  before the ADD call returned to the runtime (ADD returns once the origin has granted the
  claim, and peers route on that grant while the plugin's answer is still on its way back);
- TCP pause: the longest gap between consecutive round trips of a TCP echo stream (8 bytes
  every 10 ms, TCP_NODELAY) from a container on a third host to the moving one, across the move;
  the connection must survive (it is never re-opened).

Probing: each other container runs `ping -D -i 0.005` at the moved address from before the move
until it is answered after it; iputils stamps each reply with the wall clock (gettimeofday), so
no polling of ours sits between the event and its time. The attach stamp is the same wall
clock, taken when `Lab.move_container` saw ADD return. Target from the issue: under 1 s for both,
judged on the slowest move, at 10 hosts (a smaller lab, as in the smoke run, says "not tested").

    python -m bench.moves [--hosts 10] [--moves 5] [--results-dir DIR]
    overlayctl bench moves [--hosts 10] [--moves 5]    # the same, and the table (bench.report)
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

from .common import RESULTS_DIR, Progress, bench_lab, machine, now_iso, summary, write_result

_STAMP = re.compile(r"^\[(\d+\.\d+)\] \d+ bytes from")
TARGET_MS = 1000.0
TARGET_HOSTS = 10
SMOKE = {"hosts": 3, "moves": 1}

SERVER = r"""
import socket
listener = socket.socket()
listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
listener.bind(("0.0.0.0", 5555)); listener.listen(1)
print("listening", flush=True)
conn, _ = listener.accept()
while True:
    data = conn.recv(65536)
    if not data:
        break
    conn.sendall(data)
"""

CLIENT = r"""
import socket, sys, time
sock = socket.create_connection((sys.argv[1], 5555), timeout=30)
sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
print("connected", flush=True)
longest, last, sent = 0.0, time.monotonic(), 0
stop = float(sys.argv[2])
while time.time() < stop:
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
print(f"{sent} {longest:.4f}", flush=True)
"""


class Pinger:
    """`ping -D` from one container; records the wall-clock stamp of every reply."""

    def __init__(self, netns: str, address: str):
        self.replies: list[float] = []
        self.process = subprocess.Popen(["ip", "netns", "exec", netns, "ping", "-n", "-D", "-i", "0.005", "-W", "1",
                                         address], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self) -> None:
        for line in self.process.stdout:
            match = _STAMP.match(line)
            if match:
                self.replies.append(float(match.group(1)))

    def first_after(self, stamp: float) -> float | None:
        return next((t for t in list(self.replies) if t > stamp), None)

    def stop(self) -> None:
        self.process.kill()
        self.process.wait()


def one_move(lab, mover: str, to_host: str, tcp_from: str, progress) -> dict:
    moving = lab.container(mover)
    address = str(moving.address)
    server = subprocess.Popen(["ip", "netns", "exec", moving.netns, sys.executable, "-c", SERVER],
                              stdout=subprocess.PIPE, text=True)
    pingers: dict[str, Pinger] = {}
    client = None
    try:
        assert server.stdout.readline().strip() == "listening"
        others = [c for c in lab.containers if c.name != mover]
        pingers = {c.name: Pinger(c.netns, address) for c in others}
        # Everyone reaches the address before the move (so what is measured is the move).
        deadline = time.monotonic() + 20
        while not all(p.replies for p in pingers.values()):
            if time.monotonic() > deadline:
                raise RuntimeError(f"before the move, not every container reaches {address}")
            time.sleep(0.02)   # poll interval
        stop_at = time.time() + 4.0
        client = subprocess.Popen(["ip", "netns", "exec", lab.container(tcp_from).netns, sys.executable, "-c", CLIENT,
                                   address, str(stop_at)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        assert client.stdout.readline().strip() == "connected"
        time.sleep(1.0)    # one second of stream before the move: part of the measurement window
        timings: dict = {}
        lab.move_container(mover, to_host, timings=timings)
        now_wall, now_mono = time.time(), time.monotonic()
        attached = now_wall - (now_mono - timings["add_done"])
        detached = now_wall - (now_mono - timings["del_done"])
        deadline = time.monotonic() + 30
        while True:
            firsts = {name: p.first_after(detached) for name, p in pingers.items()}
            if all(t is not None for t in firsts.values()):
                break
            if time.monotonic() > deadline:
                missing = [name for name, t in firsts.items() if t is None]
                raise RuntimeError(f"after the move, {', '.join(missing)} never reached {address}")
            time.sleep(0.02)   # poll interval
        out, err = client.communicate(timeout=60)
        if client.returncode != 0:
            raise RuntimeError(f"the TCP stream broke across the move: {err.strip() or out.strip()}")
        round_trips, longest = out.split()
        reach = {name: t - attached for name, t in firsts.items()}
        result = {"mover": mover, "from": moving.host, "to": to_host, "address": address,
                  "del_ms": 1000 * (timings["del_done"] - timings["del_started"]),
                  "add_ms": 1000 * (timings["add_done"] - timings["del_done"]),
                  "reach_all_ms": 1000 * max(reach.values()),
                  "reach_median_ms": 1000 * sorted(reach.values())[len(reach) // 2],
                  "tcp_longest_pause_ms": 1000 * float(longest), "tcp_round_trips": int(round_trips)}
        progress(f"{mover} {moving.host} -> {to_host}: DEL {result['del_ms']:.0f} ms, ADD {result['add_ms']:.0f} ms, "
                 f"every other container reaches it {result['reach_all_ms']:.0f} ms after the attach "
                 f"(median {result['reach_median_ms']:.0f} ms); TCP longest pause "
                 f"{result['tcp_longest_pause_ms']:.0f} ms over {result['tcp_round_trips']} round trips")
        return result
    finally:
        for pinger in pingers.values():
            pinger.stop()
        if client is not None and client.poll() is None:
            client.kill()
            client.wait()
        server.kill()
        server.wait()


def run(results_dir: Path = RESULTS_DIR, hosts: int = 10, moves: int = 5, progress=None) -> dict:
    progress = progress or Progress("moves")
    if hosts < 3:
        raise ValueError("moves needs at least 3 hosts (the TCP client sits on neither end of a move)")
    started, where = now_iso(), machine()
    with bench_lab() as lab:
        lab_name = lab.name
        progress(f"lab {lab.name}: {hosts} hosts, one container each")
        lab.up(hosts=hosts, containers=1)
        lab.wait_converged(timeout=120)
        names = [h.name for h in lab.hosts]
        mover = "h1c1"
        rounds = []
        for index in range(moves):
            current = lab.container(mover).host
            target = names[(names.index(current) + 1) % len(names)]
            # The TCP client sits on a host that is neither end of this move.
            tcp_from = next(c.name for c in lab.containers if c.name != mover and c.host not in (current, target))
            rounds.append(one_move(lab, mover, target, tcp_from, progress))
    payload = {"benchmark": "moves", "started": started, "machine": where, "lab": lab_name,
               "options": {"hosts": hosts, "moves": moves}, "hosts": hosts, "moves": rounds,
               "reach_all_ms": summary([r["reach_all_ms"] for r in rounds], tail=True, digits=1),
               "reach_median_ms": summary([r["reach_median_ms"] for r in rounds], digits=1),
               "tcp_longest_pause_ms": summary([r["tcp_longest_pause_ms"] for r in rounds], tail=True, digits=1),
               "add_ms": summary([r["add_ms"] for r in rounds], digits=1),
               "del_ms": summary([r["del_ms"] for r in rounds], digits=1)}
    tested = hosts >= TARGET_HOSTS
    payload["target"] = {
        "what": f"every other container answers and the TCP pause ends under {TARGET_MS:.0f} ms, slowest move, "
                f"at {TARGET_HOSTS} hosts",
        "ms": TARGET_MS, "hosts": TARGET_HOSTS,
        "met": {"reach": (max(r["reach_all_ms"] for r in rounds) < TARGET_MS) if tested and rounds else None,
                "tcp_pause": (max(r["tcp_longest_pause_ms"] for r in rounds) < TARGET_MS) if tested and rounds else None}}
    payload["finished"] = now_iso()
    path = write_result(results_dir, "moves", payload)
    progress(f"every other container reaches the moved address: median {payload['reach_all_ms']['median']} ms, "
             f"max {payload['reach_all_ms']['max']} ms after the attach; TCP longest pause: median "
             f"{payload['tcp_longest_pause_ms']['median']} ms, max {payload['tcp_longest_pause_ms']['max']} ms "
             f"(target < 1000 ms for both); {path}")
    return payload


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.moves", description=__doc__.splitlines()[0])
    parser.add_argument("--hosts", type=int, default=10)
    parser.add_argument("--moves", type=int, default=5)
    parser.add_argument("--results-dir", type=Path, default=RESULTS_DIR)
    args = parser.parse_args(argv)
    run(args.results_dir, args.hosts, args.moves)
    return 0


if __name__ == "__main__":
    sys.exit(main())
