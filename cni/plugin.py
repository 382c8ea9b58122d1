"""The `overlay` CNI plugin executable: a thin, stdlib-only client of the daemon's warm service.

Design note
-----------
A runtime execs the plugin once per container and waits. Doing the netlink work here would mean
`import pyroute2` on every call (125-145 ms), twenty times the whole reference ADD. So the work
lives in `cni.service`, hosted by `overlayd` with pyroute2 already loaded; this client only:

1. answers VERSION itself, without touching stdin's content beyond cniVersion;
2. validates the environment and stdin with `cni.spec` (the same code the service runs), so
   every input error gets its spec code (1, 2, 4, 6, 7) even while the daemon is down;
3. forwards the call over `<runDir>/cni.sock` and relays the answer: the first line of the
   answer is the exit status, the rest is stdout, already rendered for the requested version.

When the service cannot be reached (daemon restarting, not yet started): ADD, CHECK and GC fail
with code 11 "try again later"; STATUS fails with 50 (not available); DEL succeeds when no
allocation is recorded for the attachment (then nothing of it exists: ADD records the allocation
before it makes anything, and DEL releases it last), and otherwise asks for a retry with 11.

It is started as `#!<venv python> -IS` (see `cni.install`): isolated, without `site`, importing
only `_json`, `_socket` and our own small modules; the start-up is the cost a runtime sees.
"""

import _socket
import sys

from cni import spec
from cni.errors import CniFailure, ServiceUnavailable, NotReady, cni_code

# Long enough for an ADD queued behind others on a busy host; the runtime has its own timeout.
SERVICE_TIMEOUT_S = 60.0
_READ_CHUNK = 65536
CONNECT_RETRY_S = 5.0


def main(environ=None, stdin=None, stdout=None) -> int:
    """Run one CNI call; returns the exit status. Arguments exist for tests; a runtime uses none."""
    if environ is None:
        import posix    # already loaded by the interpreter; `os` would cost an import here
        environ = {k.decode("utf-8", "surrogateescape"): v.decode("utf-8", "surrogateescape")
                   for k, v in posix.environ.items() if k.startswith(b"CNI_")}
    if stdin is None:
        stdin = sys.stdin.buffer.read()
    out = stdout if stdout is not None else sys.stdout
    status, text = run(environ, stdin)
    if text:
        out.write(text if text.endswith("\n") else text + "\n")
    out.flush()
    return status


def run(environ, stdin) -> tuple:
    """(exit status, stdout text) for one call; never raises."""
    try:
        command = spec.parse_command(environ)
        if command == "VERSION":
            return 0, spec.version_answer(stdin)
        invocation = spec.parse_invocation(environ, stdin)
    except CniFailure as exc:
        return 1, spec.error_json(spec.version_for_errors(stdin), cni_code(exc), exc.msg, exc.details)
    try:
        return forward(invocation, environ, stdin)
    except ServiceUnavailable as exc:
        return _without_service(invocation, exc)
    except CniFailure as exc:
        return 1, spec.error_json(invocation.version, cni_code(exc), exc.msg, exc.details)


def forward(invocation, environ, stdin) -> tuple:
    """Send the call to the service and return its (exit status, stdout)."""
    if isinstance(stdin, (bytes, bytearray)):
        stdin = stdin.decode("utf-8")
    request = spec.dumps({"env": {k: v for k, v in environ.items() if k.startswith("CNI_")},
                          "stdin": stdin}).encode()
    path = invocation.socket_path
    sock = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
    try:
        sock.settimeout(SERVICE_TIMEOUT_S)
        _connect(sock, path)
        try:
            sock.sendall(request)
            sock.shutdown(_socket.SHUT_WR)
            chunks = []
            while True:
                chunk = sock.recv(_READ_CHUNK)
                if not chunk:
                    break
                chunks.append(chunk)
        except OSError as exc:
            raise ServiceUnavailable(f"the overlay daemon dropped the request ({exc}); try again later") from None
    finally:
        sock.close()
    answer = b"".join(chunks).decode("utf-8")
    status, newline, text = answer.partition("\n")
    if not newline or not status.isdigit():
        # The service went away mid-answer (daemon restart): nothing half-made stays, since it
        # rolls back what it cannot finish; the runtime may simply retry.
        raise ServiceUnavailable("the overlay daemon closed the connection without an answer; try again later")
    return int(status), text


def _connect(sock, path: str) -> None:
    """Connect, riding out a full listen backlog (EAGAIN: a burst of containers starting) for a
    few seconds; a missing socket or a refused connection means the daemon is down."""
    import time
    deadline = None
    delay = 0.002
    while True:
        try:
            sock.connect(path)
            return
        except BlockingIOError:
            now = time.monotonic()
            deadline = deadline or now + CONNECT_RETRY_S
            if now < deadline:
                time.sleep(delay)
                delay = min(delay * 2, 0.1)
                continue
            raise ServiceUnavailable(f"the overlay daemon on {path} is overloaded; try again later") from None
        except OSError as exc:
            raise ServiceUnavailable(f"the overlay daemon is not reachable on {path} ({exc.strerror}); "
                                     "try again later") from None


def _without_service(invocation, unavailable: ServiceUnavailable) -> tuple:
    if invocation.command == "STATUS":
        exc = NotReady(f"the overlay daemon is not running or not ready: {unavailable.msg}")
        return 1, spec.error_json(invocation.version, cni_code(exc), exc.msg)
    if invocation.command == "DEL":
        try:
            from cni.allocator import AllocationStore, AttachmentKey, store_dir
            key = AttachmentKey(invocation.name, invocation.container_id, invocation.ifname)
            if AllocationStore(store_dir(invocation.run_dir)).lookup(key) is None:
                return 0, ""
        except CniFailure:
            pass    # records unreadable: be conservative and ask for a retry
    return 1, spec.error_json(invocation.version, cni_code(unavailable), unavailable.msg)


if __name__ == "__main__":
    sys.exit(main())
