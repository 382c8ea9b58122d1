"""The `overlay` CNI plugin executable: a thin, stdlib-only client of the daemon's warm service.

Design note
-----------
A runtime execs the plugin once per container and waits. Doing the netlink work here would mean
`import pyroute2` on every call (125-145 ms), twenty times the whole reference ADD. So the work
lives in `cni.service`, hosted by `overlayd` with pyroute2 already loaded; this client only:

1. forwards the call over `<runDir>/cni.sock`, relaying the answer: the first line of the
   answer is the exit status, the rest is stdout, already rendered for the requested version.
   The service parses and validates the whole call with `cni.spec` (it trusts no client), so an
   input error gets its spec code (1, 2, 4, 6, 7) from there. The launcher `cni.install` writes
   passes the socket of the run dir it was installed for (`socket_hint`), and the client sends
   there without reading the config at all; a service whose run dir is not the config's
   `runDir` answers "elsewhere" instead of acting, and the client then reads `runDir` and
   forwards to that. Without a hint (a launcher of an older version) it reads `runDir` first;
2. answers VERSION itself, and validates the call itself with the same `cni.spec` whenever it
   does not reach the service: a config it cannot read, the daemon down or restarting. So every
   input error still gets its spec code while the daemon is down.

Start-up is what a runtime pays on every call, and under a burst of containers it is most of the
machine's work: the interpreter alone takes about 6.3 ms of CPU here. The forwarding path
therefore imports nothing but `_socket` (built in): not `cni.spec` and `cni.errors` (0.3 ms),
and with a socket hint not even `_json` (a shared library, 0.4 ms); strings are escaped for the
request with str.translate. The rest is loaded only for VERSION and on the local path above.

When the service cannot be reached: ADD, CHECK and GC fail with code 11 "try again later"; STATUS
fails with 50 (not available); DEL succeeds when no allocation is recorded for the attachment
(then nothing of it exists: ADD records the allocation before it makes anything, and DEL
releases it last), and otherwise asks for a retry with 11.

It is started as `#!<venv python> -IS` (see `cni.install`): isolated, without `site`.
"""

import _socket
import sys

# Long enough for an ADD queued behind others on a busy host; the runtime has its own timeout.
SERVICE_TIMEOUT_S = 60.0
_READ_CHUNK = 65536
CONNECT_RETRY_S = 5.0
# Larger configs are refused locally (spec.MAX_CONFIG_BYTES, code 7), never forwarded.
_MAX_FORWARD_BYTES = 1 << 20
_DEFAULT_RUN_DIR = "/run/overlay"       # spec.DEFAULT_RUN_DIR
_SOCKET_NAME = "cni.sock"               # spec.SOCKET_NAME
_FORWARDED = ("ADD", "DEL", "CHECK", "GC", "STATUS")
# The status line of a service whose run dir is not the config's (cni.service.ELSEWHERE).
_ELSEWHERE = "elsewhere"
# JSON string escapes: the control characters, the quote and the backslash.
_ESCAPES = {code: f"\\u{code:04x}" for code in range(32)}
_ESCAPES.update({ord('"'): '\\"', ord("\\"): "\\\\", ord("\n"): "\\n", ord("\t"): "\\t"})


class _Unreachable(Exception):
    """The service did not take or did not answer the call; the message says why."""


class _Elsewhere(Exception):
    """The service reached serves another run dir than the config's."""


def main(environ=None, stdin=None, stdout=None, socket_hint=None) -> int:
    """Run one CNI call; returns the exit status. `socket_hint`: the service socket of the run dir
    the launcher was installed for. The other arguments exist for tests; a runtime uses none."""
    if environ is None:
        import posix    # already loaded by the interpreter; `os` would cost an import here
        environ = {k.decode("utf-8", "surrogateescape"): v.decode("utf-8", "surrogateescape")
                   for k, v in posix.environ.items() if k.startswith(b"CNI_")}
    if stdin is None:
        stdin = sys.stdin.buffer.read()
    out = stdout if stdout is not None else sys.stdout
    status, text = run(environ, stdin, socket_hint)
    if text:
        out.write(text if text.endswith("\n") else text + "\n")
    out.flush()
    return status


def run(environ, stdin, socket_hint=None) -> tuple:
    """(exit status, stdout text) for one call; never raises."""
    if isinstance(stdin, str):
        stdin = stdin.encode("utf-8", "surrogateescape")
    tried = unreachable = None
    if environ.get("CNI_COMMAND") in _FORWARDED and len(stdin) <= _MAX_FORWARD_BYTES:
        path = socket_hint or _socket_path(stdin)
        if path is not None:
            try:
                return _forward(path, environ, stdin)
            except _Elsewhere:
                pass    # read runDir below, and forward there
            except _Unreachable as exc:
                tried, unreachable = path, str(exc)
            except UnicodeDecodeError:
                pass    # the local parse names it (code 6)
    return _locally(environ, stdin, tried, unreachable)


def _socket_path(stdin: bytes):
    """<runDir>/cni.sock from the config, or None when the config is not a JSON object with a
    usable runDir (then the local parse names the problem)."""
    import _json

    class Context:      # what the C scanner reads from a JSONDecoder
        strict = True
        object_hook = object_pairs_hook = memo = None
        parse_float, parse_int = float, int

        @staticmethod
        def parse_constant(name):
            raise ValueError(name)
    try:
        text = stdin.decode("utf-8").strip(" \t\n\r")
        config, end = _json.make_scanner(Context())(text, 0)
    except Exception:   # not UTF-8, not JSON (ValueError, StopIteration, ...)
        return None
    if end != len(text) or not isinstance(config, dict):
        return None
    run_dir = config.get("runDir", _DEFAULT_RUN_DIR)
    if not isinstance(run_dir, str) or not run_dir.startswith("/") or "\0" in run_dir:
        return None
    return run_dir.rstrip("/") + "/" + _SOCKET_NAME


def _string(text: str) -> str:
    """A JSON string. Runtimes send ASCII; anything else goes through _json's encoder."""
    if text.isascii():
        return '"' + text.translate(_ESCAPES) + '"'
    from _json import encode_basestring_ascii
    return encode_basestring_ascii(text)


def _forward(path: str, environ, stdin: bytes) -> tuple:
    """Send the call to the service and return its (exit status, stdout)."""
    env = ",".join(_string(k) + ":" + _string(v) for k, v in environ.items() if k.startswith("CNI_"))
    request = ('{"env":{' + env + '},"stdin":' + _string(stdin.decode("utf-8")) + "}").encode()
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
            raise _Unreachable(f"the overlay daemon dropped the request ({exc}); try again later") from None
    finally:
        sock.close()
    answer = b"".join(chunks).decode("utf-8")
    status, newline, text = answer.partition("\n")
    if status == _ELSEWHERE:
        raise _Elsewhere(path)
    if not newline or not status.isdigit():
        # The service went away mid-answer (daemon restart): nothing half-made stays, since it
        # rolls back what it cannot finish; the runtime may simply retry.
        raise _Unreachable("the overlay daemon closed the connection without an answer; try again later")
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
            raise _Unreachable(f"the overlay daemon on {path} is overloaded; try again later") from None
        except OSError as exc:
            raise _Unreachable(f"the overlay daemon is not reachable on {path} ({exc.strerror}); "
                               "try again later") from None


def _locally(environ, stdin: bytes, tried, unreachable) -> tuple:
    """VERSION, input errors, and what to answer without the service (see the design note).
    `tried`: the socket that did not answer, `unreachable`: why."""
    from cni import spec
    from cni.errors import CniFailure, NotReady, ServiceUnavailable, cni_code
    try:
        command = spec.parse_command(environ)
        if command == "VERSION":
            return 0, spec.version_answer(stdin)
        invocation = spec.parse_invocation(environ, stdin)
    except CniFailure as exc:
        return 1, spec.error_json(spec.version_for_errors(stdin), cni_code(exc), exc.msg, exc.details)
    if invocation.socket_path != tried:
        # The hinted service serves another run dir, or the socket was not tried at all.
        try:
            return _forward(invocation.socket_path, environ, stdin)
        except _Unreachable as exc:
            unreachable = str(exc)
        except _Elsewhere:
            unreachable = (f"the service on {invocation.socket_path} serves another run dir than "
                           f"{invocation.run_dir}; try again later")
    if invocation.command == "STATUS":
        exc = NotReady(f"the overlay daemon is not running or not ready: {unreachable}")
        return 1, spec.error_json(invocation.version, cni_code(exc), exc.msg)
    if invocation.command == "DEL":
        try:
            from cni.allocator import AllocationStore, AttachmentKey, store_dir
            key = AttachmentKey(invocation.name, invocation.container_id, invocation.ifname)
            if AllocationStore(store_dir(invocation.run_dir)).lookup(key) is None:
                return 0, ""
        except CniFailure:
            pass    # records unreadable: be conservative and ask for a retry
    exc = ServiceUnavailable(unreachable)
    return 1, spec.error_json(invocation.version, cni_code(exc), exc.msg)


if __name__ == "__main__":
    sys.exit(main())
