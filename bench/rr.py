"""A tiny TCP request/response pair: one byte out, one byte back, as fast as it goes.

Design notes
- What netperf's TCP_RR measures, without netperf: a client sends 1 byte, waits for the 1-byte
  answer, and repeats for a fixed time on one connection (TCP_NODELAY on both ends, so Nagle
  never holds a byte back). Transactions per second is the inverse of the round trip through
  both kernels' stacks and the path between them; the per-transaction times give p50/p99.
- Run inside the lab's namespaces as `python -m bench.rr serve ADDRESS PORT` and
  `python -m bench.rr client ADDRESS PORT SECONDS [--bind ADDRESS]`; the client prints one JSON
  line. The server answers any number of sequential or concurrent connections until killed, and
  prints "listening" once its socket is bound, so a caller can wait for that instead of sleeping.
- Measured time is time.perf_counter_ns around each send/recv pair; the first 5% of
  transactions (at least 10) are left out as warm-up.
"""

from __future__ import annotations

import argparse
import json
import socket
import sys
import threading
import time


def serve(address: str, port: int) -> None:
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind((address, port))
    listener.listen(16)
    print("listening", flush=True)

    def answer(conn: socket.socket) -> None:
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        with conn:
            while True:
                data = conn.recv(1)
                if not data:
                    return
                conn.sendall(data)

    while True:
        conn, _ = listener.accept()
        threading.Thread(target=answer, args=(conn,), daemon=True).start()


def client(address: str, port: int, seconds: float, bind: str | None = None) -> dict:
    conn = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    if bind:
        conn.bind((bind, 0))
    conn.settimeout(5.0)
    conn.connect((address, port))
    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    times: list[int] = []
    byte = b"x"
    clock = time.perf_counter_ns
    deadline = clock() + int(seconds * 1e9)
    with conn:
        now = clock()
        while now < deadline:
            conn.sendall(byte)
            if not conn.recv(1):
                raise ConnectionError("server closed the connection")
            done = clock()
            times.append(done - now)
            now = done
    warmup = max(10, len(times) // 20)
    kept = sorted(times[warmup:]) or sorted(times)
    total_s = sum(kept) / 1e9

    def pick(q: float) -> float:
        return kept[min(len(kept) - 1, int(round((len(kept) - 1) * q)))] / 1000.0

    return {"transactions": len(kept), "seconds": round(total_s, 6),
            "rate_per_s": round(len(kept) / total_s, 1) if total_s else 0.0,
            "p50_us": round(pick(0.50), 2), "p99_us": round(pick(0.99), 2)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.rr")
    sub = parser.add_subparsers(dest="role", required=True)
    server_args = sub.add_parser("serve")
    server_args.add_argument("address")
    server_args.add_argument("port", type=int)
    client_args = sub.add_parser("client")
    client_args.add_argument("address")
    client_args.add_argument("port", type=int)
    client_args.add_argument("seconds", type=float)
    client_args.add_argument("--bind")
    args = parser.parse_args(argv)
    if args.role == "serve":
        serve(args.address, args.port)
        return 0
    print(json.dumps(client(args.address, args.port, args.seconds, args.bind)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
