"""Helpers for the CNI integration tests: namespaces, a standalone service, the plugin run as a
runtime runs it. Everything made here carries the prefix `ovl-ct-` and is removed afterwards."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from ipaddress import IPv4Interface, IPv4Network
from pathlib import Path

from cni.install import install
from overlay.subnetfile import SubnetFile, write_subnet_file

ROOT = Path(__file__).resolve().parents[2]
PREFIX = "ovl-ct-"


def wait_for(condition, timeout: float, what: str, interval: float = 0.02):
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)


def ip(*args, netns: str | None = None, check: bool = True) -> subprocess.CompletedProcess:
    command = ["ip"] + (["-n", netns] if netns else []) + list(args)
    return subprocess.run(command, capture_output=True, text=True, check=check)


def ip_json(*args, netns: str | None = None):
    out = ip("-j", *args, netns=netns).stdout
    return json.loads(out) if out.strip() else []


def add_netns(name: str) -> str:
    assert name.startswith(PREFIX)
    ip("netns", "add", name)
    return f"/run/netns/{name}"


def del_netns(name: str) -> None:
    assert name.startswith(PREFIX)
    ip("netns", "del", name, check=False)


@contextmanager
def netns(name: str):
    path = add_netns(name)
    try:
        yield path
    finally:
        del_netns(name)


class Service:
    """`python -m cni.service` inside a host namespace, with its own run dir."""

    def __init__(self, host_netns: str, run_dir: Path, subnet: str, mtu: int = 1450):
        self.host_netns = host_netns
        self.run_dir = run_dir
        self.subnet = IPv4Interface(subnet)
        write_subnet_file(run_dir, SubnetFile(IPv4Network("10.244.0.0/16"), self.subnet, mtu, True))
        self.log = open(run_dir / "service.log", "wb")
        self.process = subprocess.Popen(
            ["ip", "netns", "exec", host_netns, sys.executable, "-m", "cni.service", "--run-dir", str(run_dir)],
            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=self.log, start_new_session=True)
        try:
            socket_path = run_dir / "cni.sock"
            wait_for(lambda: socket_path.exists() or self.process.poll() is not None, 20, "the CNI service socket")
            if self.process.poll() is not None:
                raise RuntimeError(f"CNI service died: {(run_dir / 'service.log').read_text()}")
        except BaseException:
            self.stop()   # the caller never gets this object to stop: a slow start or Ctrl-C must not leak it
            raise

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)
        self.log.close()


class Plugin:
    """The installed `overlay` executable, run exactly as a runtime runs it."""

    def __init__(self, bin_dir: Path, conf_dir: Path, run_dir: Path):
        self.executable, _ = install(bin_dir, conf_dir, str(run_dir))
        self.run_dir = run_dir

    def config(self, version: str = "1.1.0", name: str = "ovl-ct-net", **extra) -> dict:
        return {"cniVersion": version, "name": name, "type": "overlay", "runDir": str(self.run_dir), **extra}

    def run(self, command: str, config, container_id: str | None = None, netns: str | None = None,
            ifname: str | None = "eth0", env: dict | None = None) -> tuple[int, dict | None]:
        environ = {"CNI_COMMAND": command, "CNI_PATH": "/usr/lib/cni"}
        if container_id is not None:
            environ.update(CNI_CONTAINERID=container_id, CNI_IFNAME=ifname)
        if netns is not None:
            environ["CNI_NETNS"] = netns
        environ.update(env or {})
        environ = {k: v for k, v in environ.items() if v is not None}
        stdin = config if isinstance(config, (bytes, str)) else json.dumps(config)
        done = subprocess.run([str(self.executable)], input=stdin.encode() if isinstance(stdin, str) else stdin,
                              env=environ, capture_output=True, timeout=60)
        assert not done.stderr, done.stderr.decode()
        out = done.stdout.decode()
        return done.returncode, (json.loads(out) if out.strip() else None)


def allocations(run_dir: Path) -> list[dict]:
    path = run_dir / "cni-ipam" / "allocations.json"
    return json.loads(path.read_text())["allocations"] if path.exists() else []


def host_veths(host_netns: str) -> set[str]:
    return {link["ifname"] for link in ip_json("link", "show", netns=host_netns)
            if link["ifname"].startswith("ovlv")}
