"""Start and stop real etcd server processes (Debian etcd 3.4), for the tests and the lab.

Design notes
- One `EtcdMember` describes a member (name, URLs, data dir, optional network namespace and TLS);
  one `EtcdProcess` runs it. `start_cluster` starts every member first and only then waits for
  health, because a member of a new multi-member cluster is not healthy until a quorum is up.
- Health is what a client sees: an HTTP(S) GET of `/health` on the client URL, which etcd answers
  with `{"health":"true"}` only when the member has a leader and can serve a quorum read. Inside a
  network namespace the URL is not reachable from here, so the probe runs `etcdctl endpoint
  health` through `ip netns exec` instead. Both are polled until a deadline, never slept on.
- Stopping is SIGTERM, then SIGKILL after a timeout: a 3.4 member may sit on SIGTERM for over
  7 s while it tries to hand over leadership (shared FACTS). `kill()` is the SIGKILL of fault tests.
- Timing is tuned for loopback and namespaces on one machine: 50 ms heartbeats and a 500 ms
  election timeout make a new leader appear within about a second after the old one dies.
- Client TLS only (server cert, client-cert-auth against one CA); peers talk plain HTTP. The lab
  and the tests share `make_test_pki`, which drives the openssl CLI (no Python crypto dependency).
- Ports: `free_port()` binds port 0 and returns what the kernel picked. etcd has to be told a
  port, so there is a small window in which another process may take it; `start_cluster`
  surfaces that as an `EtcdStartError` carrying the member's log tail, which names the port.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import time
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Sequence
from urllib.parse import urlsplit

from .errors import OverlayError

ETCD_BINARY = "etcd"
ETCDCTL_BINARY = "etcdctl"
HEARTBEAT_MS = 50
ELECTION_MS = 500


class EtcdStartError(OverlayError):
    """An etcd member did not start or did not become healthy; the message has its log tail."""


@dataclass(frozen=True)
class EtcdTLS:
    """Client-facing TLS of a member: its certificate and key, and the CA its clients must have."""
    cert_file: Path
    key_file: Path
    ca_file: Path


@dataclass(frozen=True)
class PKI:
    """A throw-away CA with one server and one client certificate, made by `make_test_pki`."""
    directory: Path
    ca_cert: Path
    ca_key: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path

    def server_tls(self) -> EtcdTLS:
        return EtcdTLS(self.server_cert, self.server_key, self.ca_cert)


@dataclass(frozen=True)
class EtcdMember:
    name: str
    client_url: str   # e.g. "http://198.18.5.2:2379" or "https://127.0.0.1:41234"
    peer_url: str     # e.g. "http://198.18.5.2:2380"
    data_dir: Path
    netns: str | None = None      # run inside this network namespace when set
    tls: EtcdTLS | None = None    # client TLS with client-cert-auth when set

    def __post_init__(self) -> None:
        want = "https" if self.tls else "http"
        if urlsplit(self.client_url).scheme != want:
            raise ValueError(f"member {self.name}: client_url {self.client_url!r} must be {want}://"
                             f" ({'with' if self.tls else 'without'} TLS)")
        if urlsplit(self.peer_url).scheme != "http":
            raise ValueError(f"member {self.name}: peer_url {self.peer_url!r} must be http://")


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port the kernel reports free on host right now (bind port 0, read it, close)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def loopback_members(count: int, base_dir: Path, tls: EtcdTLS | None = None,
                     name_prefix: str = "m") -> list[EtcdMember]:
    """`count` members on 127.0.0.1 with ports free at this moment, data dirs under base_dir."""
    scheme = "https" if tls else "http"
    return [EtcdMember(name=f"{name_prefix}{index}",
                       client_url=f"{scheme}://127.0.0.1:{free_port()}",
                       peer_url=f"http://127.0.0.1:{free_port()}",
                       data_dir=base_dir / f"{name_prefix}{index}.etcd",
                       tls=tls)
            for index in range(count)]


def initial_cluster(members: Sequence[EtcdMember]) -> str:
    return ",".join(f"{member.name}={member.peer_url}" for member in members)


class EtcdProcess:
    """One running etcd member. Not thread-safe; one owner starts and stops it."""

    def __init__(self, member: EtcdMember, log_path: Path):
        self.member = member
        self.log_path = log_path
        self._proc: subprocess.Popen | None = None
        self._log: IO[bytes] | None = None

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def command(self, cluster: Sequence[EtcdMember], initial_state: str = "new",
                cluster_token: str = "overlay") -> list[str]:
        member = self.member
        argv = [
            ETCD_BINARY,
            "--name", member.name,
            "--data-dir", str(member.data_dir),
            "--listen-client-urls", member.client_url,
            "--advertise-client-urls", member.client_url,
            "--listen-peer-urls", member.peer_url,
            "--initial-advertise-peer-urls", member.peer_url,
            "--initial-cluster", initial_cluster(cluster),
            "--initial-cluster-state", initial_state,
            "--initial-cluster-token", cluster_token,
            "--heartbeat-interval", str(HEARTBEAT_MS),
            "--election-timeout", str(ELECTION_MS),
            "--logger", "zap", "--log-level", "warn",
            # Clients ping every few seconds to notice a dead member; etcd's default minimum
            # (5 s) would answer faster pings with GOAWAY "too many pings".
            "--grpc-keepalive-min-time", "1s",
        ]
        if member.tls:
            argv += ["--cert-file", str(member.tls.cert_file),
                     "--key-file", str(member.tls.key_file),
                     "--trusted-ca-file", str(member.tls.ca_file),
                     "--client-cert-auth"]
        if member.netns:
            argv = ["ip", "netns", "exec", member.netns] + argv
        return argv

    def start(self, cluster: Sequence[EtcdMember], initial_state: str = "new",
              cluster_token: str = "overlay") -> None:
        """Start the member (returns at once; see wait_healthy). Output goes to log_path."""
        if self.running:
            raise EtcdStartError(f"etcd member {self.member.name} is already running")
        if shutil.which(ETCD_BINARY) is None:
            raise EtcdStartError(f"{ETCD_BINARY} not found on PATH (Debian package etcd-server)")
        self.member.data_dir.parent.mkdir(parents=True, exist_ok=True)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = open(self.log_path, "ab")
        self._proc = subprocess.Popen(
            self.command(cluster, initial_state, cluster_token),
            stdin=subprocess.DEVNULL, stdout=self._log, stderr=subprocess.STDOUT,
            # Own process group: a Ctrl-C in the terminal reaches us, not the member, and we
            # decide how it stops.
            start_new_session=True)

    def healthy(self, timeout: float = 1.0) -> bool:
        """One probe of the member's health as a client sees it."""
        if self.member.netns:
            return self._healthy_by_etcdctl(timeout)
        return self._healthy_by_http(timeout)

    def wait_healthy(self, deadline: float) -> None:
        """Poll until healthy or until time.monotonic() passes deadline (then EtcdStartError)."""
        while True:
            if self._proc is not None and self._proc.poll() is not None:
                raise EtcdStartError(f"etcd member {self.member.name} exited with status "
                                     f"{self._proc.returncode}:\n{self.log_tail()}")
            if self.healthy(timeout=max(0.2, min(1.0, deadline - time.monotonic()))):
                return
            if time.monotonic() > deadline:
                raise EtcdStartError(f"etcd member {self.member.name} not healthy in time:\n"
                                     f"{self.log_tail()}")
            time.sleep(0.05)  # poll interval, not a wait for a condition

    def stop(self, timeout: float = 5.0) -> None:
        """SIGTERM, then SIGKILL if it is still running after timeout. Idempotent."""
        if self._proc is not None and self._proc.poll() is None:
            self._signal(signal.SIGTERM)
            try:
                self._proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self._signal(signal.SIGKILL)
                self._proc.wait()
        self._close_log()

    def kill(self) -> None:
        """SIGKILL at once, as a crash would. Idempotent."""
        if self._proc is not None and self._proc.poll() is None:
            self._signal(signal.SIGKILL)
            self._proc.wait()
        self._close_log()

    def log_tail(self, lines: int = 20) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])

    def _signal(self, signum: int) -> None:
        assert self._proc is not None
        # The whole group: with `ip netns exec` the child is etcd itself (exec), but a group
        # signal is right in both cases and reaches nothing else (start_new_session).
        try:
            os.killpg(self._proc.pid, signum)
        except ProcessLookupError:
            pass

    def _close_log(self) -> None:
        if self._log is not None:
            self._log.close()
            self._log = None

    def _ssl_context(self) -> ssl.SSLContext | None:
        tls = self.member.tls
        if tls is None:
            return None
        context = ssl.create_default_context(cafile=str(tls.ca_file))
        # The member's own certificate doubles as a client certificate: make_test_pki gives it
        # both usages, and a lab's PKI must too for this probe to pass client-cert-auth.
        context.load_cert_chain(str(tls.cert_file), str(tls.key_file))
        context.check_hostname = False  # SANs are IPs; the CA check is what matters here
        return context

    def _healthy_by_http(self, timeout: float) -> bool:
        try:
            with urllib.request.urlopen(f"{self.member.client_url}/health", timeout=timeout,
                                        context=self._ssl_context()) as response:
                body = json.loads(response.read())
        except (OSError, ValueError, urllib.error.URLError):
            return False
        return body.get("health") == "true"

    def _healthy_by_etcdctl(self, timeout: float) -> bool:
        argv = ["ip", "netns", "exec", str(self.member.netns), ETCDCTL_BINARY,
                "--endpoints", self.member.client_url,
                "--dial-timeout", f"{timeout:.1f}s", "--command-timeout", f"{timeout:.1f}s"]
        if self.member.tls:
            argv += ["--cacert", str(self.member.tls.ca_file),
                     "--cert", str(self.member.tls.cert_file),
                     "--key", str(self.member.tls.key_file)]
        argv += ["endpoint", "health"]
        try:
            result = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True,
                                    timeout=timeout + 2, env={**os.environ, "ETCDCTL_API": "3"})
        except subprocess.TimeoutExpired:
            return False
        return result.returncode == 0


def start_cluster(members: Sequence[EtcdMember], log_dir: Path, timeout: float = 30.0,
                  cluster_token: str | None = None) -> list[EtcdProcess]:
    """Start every member as one new cluster and wait until each is healthy.

    On any failure every member already started is killed before the error propagates.
    """
    names = [member.name for member in members]
    if len(set(names)) != len(names):
        raise ValueError(f"member names must be unique: {names}")
    # A unique token keeps members of two clusters that happen to reuse a port from joining.
    token = cluster_token or f"overlay-{uuid.uuid4().hex[:12]}"
    processes = [EtcdProcess(member, log_dir / f"{member.name}.log") for member in members]
    try:
        for process in processes:
            process.start(members, "new", token)
        deadline = time.monotonic() + timeout
        for process in processes:
            process.wait_healthy(deadline)
    except BaseException:
        for process in processes:
            process.kill()
        raise
    return processes


def stop_cluster(processes: Sequence[EtcdProcess], timeout: float = 1.0) -> None:
    """Stop every member: SIGTERM to all at once, SIGKILL to those left after timeout.

    When the whole cluster goes down the leader spends about 6 s trying to hand leadership to
    members that are already gone; waiting for that buys nothing, and SIGKILL loses nothing a
    client was told is committed (etcd fsyncs its WAL before it acknowledges).
    """
    for process in processes:
        if process.running:
            process._signal(signal.SIGTERM)
    for process in processes:
        process.stop(timeout)


def make_test_pki(directory: Path, server_ips: Sequence[str], days: int = 30) -> PKI:
    """A CA, a server certificate for server_ips + 127.0.0.1, and a client certificate.

    EC P-256 keys: openssl makes them in milliseconds, where RSA 2048 takes a noticeable moment
    on a busy 2-core machine. The server certificate allows client auth too, so the member's own
    pair can be used to probe its health.
    """
    if shutil.which("openssl") is None:
        raise EtcdStartError("openssl not found on PATH (Debian package openssl)")
    directory.mkdir(parents=True, exist_ok=True)
    pki = PKI(directory=directory,
              ca_cert=directory / "ca.crt", ca_key=directory / "ca.key",
              server_cert=directory / "server.crt", server_key=directory / "server.key",
              client_cert=directory / "client.crt", client_key=directory / "client.key")
    ips = list(dict.fromkeys([*server_ips, "127.0.0.1"]))
    san = ",".join(f"IP:{ip}" for ip in ips)

    def openssl(*args: str) -> None:
        result = subprocess.run(["openssl", *args], stdin=subprocess.DEVNULL,
                                capture_output=True, text=True)
        if result.returncode != 0:
            raise EtcdStartError(f"openssl {args[0]} failed: {result.stderr.strip()}")

    def keypair(key: Path) -> None:
        openssl("genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256",
                "-out", str(key))
        key.chmod(0o600)

    keypair(pki.ca_key)
    openssl("req", "-x509", "-new", "-key", str(pki.ca_key), "-out", str(pki.ca_cert),
            "-days", str(days), "-subj", "/CN=overlay test CA",
            "-addext", "basicConstraints=critical,CA:TRUE",
            "-addext", "keyUsage=critical,keyCertSign,cRLSign")
    for cert, key, cn, usage, extra_san in (
            (pki.server_cert, pki.server_key, "etcd-server", "serverAuth,clientAuth", san),
            (pki.client_cert, pki.client_key, "overlay-client", "clientAuth", None)):
        keypair(key)
        csr = cert.with_suffix(".csr")
        openssl("req", "-new", "-key", str(key), "-out", str(csr), "-subj", f"/CN={cn}")
        ext = cert.with_suffix(".ext")
        lines = ["basicConstraints=critical,CA:FALSE",
                 "keyUsage=critical,digitalSignature,keyEncipherment",
                 f"extendedKeyUsage={usage}"]
        if extra_san:
            lines.append(f"subjectAltName={extra_san}")
        ext.write_text("\n".join(lines) + "\n")
        openssl("x509", "-req", "-in", str(csr), "-CA", str(pki.ca_cert), "-CAkey", str(pki.ca_key),
                "-CAcreateserial", "-out", str(cert), "-days", str(days), "-extfile", str(ext))
        csr.unlink()
        ext.unlink()
    return pki
