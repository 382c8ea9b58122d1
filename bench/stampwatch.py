"""A watch on an etcd prefix that stamps each event with the wall clock the moment it arrives.

Design notes
- The convergence and scale benchmarks need "when did this lease appear in etcd" on the same
  clock as the kernel notifications `ip -ts monitor` stamps. An `etcdctl watch` read by a thread
  of the benchmark process was stamped late on a loaded machine (by tens of ms, once by 14 s after
  a stalled stream), because the stamp was taken by a process busy with other work. So the stamp
  is taken here, in a process that does nothing else: one gRPC watch stream (the stubs aetcd
  ships, not overlay.etcd: the measuring side must not share code with what it measures),
  time.time() on each response before anything else, one line per event on stdout:
      CREATED                                   once the watch is registered with etcd
      <unix time>\t<PUT|DELETE>\t<key>\t<value>   per event (flannel's values hold no tabs)
- Run as `python -m bench.stampwatch ENDPOINT PREFIX`; it runs until killed, or until the
  benchmark that started it is gone (it lives in the root namespace, where no lab teardown
  would find it: a benchmark killed outright must not leave it behind).
"""

from __future__ import annotations

import os
import sys
import threading
import time
from urllib.parse import urlparse

import grpc
from aetcd.rpc import rpc_pb2, rpc_pb2_grpc


def prefix_end(prefix: bytes) -> bytes:
    """The first key after every key starting with prefix (etcd's range_end for a prefix). Kept
    here rather than imported from overlay.etcd: see the design note (and importing it would load
    the daemon's whole etcd client into this process)."""
    end = bytearray(prefix)
    while end:
        if end[-1] < 0xFF:
            end[-1] += 1
            return bytes(end)
        end.pop()
    return b"\0"


def main(argv: list[str]) -> int:
    endpoint, prefix = argv[0], argv[1].encode()
    url = urlparse(endpoint)
    channel = grpc.insecure_channel(f"{url.hostname}:{url.port or 2379}")
    stub = rpc_pb2_grpc.WatchStub(channel)
    forever = threading.Event()

    def requests():
        yield rpc_pb2.WatchRequest(create_request=rpc_pb2.WatchCreateRequest(key=prefix, range_end=prefix_end(prefix)))
        forever.wait()   # keep the stream open; the process is killed to stop

    parent = os.getppid()

    def exit_with_parent() -> None:
        while os.getppid() == parent:
            time.sleep(1.0)
        os._exit(0)

    threading.Thread(target=exit_with_parent, daemon=True).start()
    out = sys.stdout
    for response in stub.Watch(requests()):
        now = time.time()
        if response.created:
            out.write("CREATED\n")
        for event in response.events:
            kind = "DELETE" if event.type == 1 else "PUT"
            out.write(f"{now:.6f}\t{kind}\t{event.kv.key.decode()}\t{event.kv.value.decode()}\n")
        out.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
