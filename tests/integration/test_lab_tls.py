"""The lab with etcd behind TLS and client certificates (issue 6, Security): real etcd, real daemons.

`Lab.up(etcd_tls=True)` / `overlayctl lab up --etcd-tls` makes a CA, a server certificate for the
members' underlay IPs and a client certificate; members serve https with client-cert-auth. What
is checked, on the end state:
- a TLS lab (one member, and three) converges and its hosts ping each other over the overlay;
  `overlayctl leases --lab` and `lab status --json` work and report the files; keys are 0600;
- a client without a certificate (etcdctl with only --cacert, our EtcdStore with only a CA) and
  a client with a certificate of another CA are refused, and the refusal is said clearly (the
  member's log for etcdctl, whose own message is a bare timeout; our store's error names TLS);
- a daemon missing the TLS flags never becomes ready: with none it stops at once naming
  --etcd-cafile; with the CA but no certificate (or with http:// URLs) it keeps running, not
  ready, /readyz saying etcd is unreachable, with the TLS hint where gRPC lets us see TLS failed.

Each lab is named `k` + 3 random characters and torn down in a finally, also on failure.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import secrets
import stat
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from click.testing import CliRunner

from overlay.errors import StoreUnavailable
from overlay.etcd import EtcdSettings, EtcdStore
from overlay.etcd_server import make_test_pki
from overlay.lab import Lab, LabHost, teardown, wait_until
from overlay.lab_cli import lab as lab_command

BIN = Path(sys.executable).parent
OVERLAYCTL = str(BIN / "overlayctl") if (BIN / "overlayctl").exists() else "overlayctl"
PREFIX = "/coreos.com/network"


@pytest.fixture
def lab_name():
    name = "k" + "".join(secrets.choice("abcdefghijklmnopqrstuvwxyz0123456789") for _ in range(3))
    try:
        yield name
    finally:
        teardown(name)


def overlayctl(*args: str, timeout: float = 90) -> subprocess.CompletedProcess:
    return subprocess.run([OVERLAYCTL, *args], capture_output=True, text=True, timeout=timeout)


def readyz(lab: Lab, host: LabHost) -> tuple[int, str] | None:
    """(status, body) of the host's /readyz, or None while nothing answers."""
    try:
        with urllib.request.urlopen(host.url("/readyz"), timeout=1) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()
    except (OSError, ValueError):
        return None


def store_refusal(settings: EtcdSettings) -> str:
    """The error our own client gets reading the config with these settings (it must fail)."""
    async def attempt() -> str:
        store = EtcdStore(dataclasses.replace(settings, request_timeout=1.5))
        try:
            with pytest.raises(StoreUnavailable) as caught:
                await store.get_config()
            return str(caught.value)
        finally:
            await store.close()
    return asyncio.run(asyncio.wait_for(attempt(), 20))


def assert_converged_and_pinging(lab: Lab) -> None:
    lab.wait_converged(timeout=30)
    matrix = lab.reachability()
    assert [pair for pair, rtt in matrix.items() if rtt is None] == []


def test_tls_lab_converges_and_reports_its_files(lab_name):
    with Lab(lab_name) as lab:
        started = time.monotonic()
        lab.up(hosts=2, etcd_tls=True)
        assert_converged_and_pinging(lab)
        print(f"TLS lab of 2 hosts converged {time.monotonic() - started:.1f} s after up began")

        tls = lab.etcd_tls
        assert tls is not None and all(url.startswith("https://") for url in lab.etcd_endpoints)
        pki = tls.ca_file.parent
        assert stat.S_IMODE(pki.stat().st_mode) == 0o700
        for key in (tls.key_file, tls.server_key_file, pki / "ca.key"):
            assert stat.S_IMODE(key.stat().st_mode) == 0o600, key
        # Every daemon was given the client certificate.
        for host in lab.hosts:
            argv = Path(f"/proc/{lab.daemon_pid(host)}/cmdline").read_bytes().decode().split("\0")
            assert argv[argv.index("--etcd-certfile") + 1] == str(tls.cert_file)

        result = CliRunner().invoke(lab_command, ["status", "--name", lab_name, "--json"])
        assert result.exit_code == 0, result.output
        etcd = json.loads(result.output)["etcd"]
        assert etcd["tls"] is True
        assert (etcd["ca_file"], etcd["cert_file"], etcd["key_file"]) == (str(tls.ca_file), str(tls.cert_file),
                                                                          str(tls.key_file))
        assert all(member["client_url"].startswith("https://") for member in etcd["members"])

        leases = overlayctl("leases", "--lab", lab_name)
        assert leases.returncode == 0, leases.stderr
        assert "2 lease(s)" in leases.stdout
        for host in lab.hosts:
            assert str(host.public_ip) in leases.stdout


def test_three_member_tls_lab_from_the_cli(lab_name):
    up = overlayctl("lab", "up", "--name", lab_name, "--hosts", "2", "--etcd-members", "3", "--etcd-tls",
                    "--timeout", "40")
    assert up.returncode == 0, up.stdout + up.stderr
    assert "TLS with client certificates" in up.stdout
    lab = Lab.load(lab_name)
    assert len(lab.etcd_endpoints) == 3 and all(url.startswith("https://") for url in lab.etcd_endpoints)
    health = lab.etcdctl("endpoint", "health", check=False)
    assert health.returncode == 0 and (health.stdout + health.stderr).count("is healthy") == 3
    assert_converged_and_pinging(lab)
    leases = overlayctl("leases", "--lab", lab_name)
    assert leases.returncode == 0 and "2 lease(s)" in leases.stdout, leases.stdout + leases.stderr
    down = overlayctl("lab", "down", "--name", lab_name)
    assert down.returncode == 0, down.stderr


def test_clients_without_the_labs_certificate_are_refused(lab_name, tmp_path):
    with Lab(lab_name) as lab:
        lab.up(hosts=1, etcd_tls=True)
        tls = lab.etcd_tls
        endpoints = ",".join(lab.etcd_endpoints)
        # Three hosts whose daemons lack the certificate, started at once: they fail side by side.
        bare, ca_only, plain = (lab.add_host(start_daemon=False) for _ in range(3))
        lab.start_daemon(bare, etcd_tls_flags=False)
        lab.start_daemon(ca_only, ["--etcd-cafile", str(tls.ca_file)], etcd_tls_flags=False)
        lab.start_daemon(plain, ["--etcd-endpoints", endpoints.replace("https://", "http://")],
                         etcd_tls_flags=False)
        lab.wait_converged(["h1"], timeout=30)          # the lab's own client certificate works

        # etcdctl with the CA but no certificate: etcd 3.4's etcdctl reports only a timeout, the
        # member's log says what happened.
        anonymous = subprocess.run(["etcdctl", "--endpoints", endpoints, "--dial-timeout", "1s",
                                    "--command-timeout", "2s", "--cacert", str(tls.ca_file),
                                    "get", f"{PREFIX}/config"], capture_output=True, text=True, timeout=15)
        assert anonymous.returncode != 0 and "Network" not in anonymous.stdout
        wait_until(lambda: "client didn't provide a certificate" in lab.etcd_log("e1", 200),
                   time.monotonic() + 10, "etcd to log the refused anonymous client")

        # A certificate of another CA (valid for the same IPs, even): refused too.
        other = make_test_pki(tmp_path / "other-ca", [str(member.ip) for member in lab.etcd_members])
        foreign = subprocess.run(["etcdctl", "--endpoints", endpoints, "--dial-timeout", "1s",
                                  "--command-timeout", "2s", "--cacert", str(tls.ca_file),
                                  "--cert", str(other.client_cert), "--key", str(other.client_key),
                                  "get", f"{PREFIX}/config"], capture_output=True, text=True, timeout=15)
        assert foreign.returncode != 0 and "Network" not in foreign.stdout
        wait_until(lambda: "certificate signed by unknown authority" in lab.etcd_log("e1", 200),
                   time.monotonic() + 10, "etcd to log the refused foreign certificate")

        # Our own client: a clear error naming TLS and the flags, with only a CA and with a foreign pair.
        for settings in (EtcdSettings.from_flags(endpoints, PREFIX, tls.ca_file),
                         EtcdSettings.from_flags(endpoints, PREFIX, tls.ca_file, other.client_cert,
                                                 other.client_key)):
            message = store_refusal(settings)
            assert "TLS refused" in message and "--etcd-certfile" in message, message

        # No TLS flags at all: the daemon refuses https:// URLs without a CA and stops at once.
        wait_until(lambda: lab.daemon_pid(bare) is None, time.monotonic() + 15, "the bare daemon to stop")
        assert "--etcd-cafile" in lab.daemon_log(bare)
        # The CA but no certificate: running, never ready, /readyz says etcd is unreachable over TLS.
        answer = wait_until(lambda: (r := readyz(lab, ca_only)) and "etcd unreachable" in r[1] and r,
                            time.monotonic() + 20, "the CA-only daemon to report etcd unreachable")
        assert answer[0] == 503 and "TLS refused" in answer[1] and "--etcd-certfile" in answer[1], answer
        # http:// URLs at an https member: never ready either (gRPC sees only a closed socket here).
        answer = wait_until(lambda: (r := readyz(lab, plain)) and "etcd unreachable" in r[1] and r,
                            time.monotonic() + 20, "the plain-http daemon to report etcd unreachable")
        assert answer[0] == 503, answer
        assert lab.daemon_pid(ca_only) and lab.daemon_pid(plain)
        # None of them got a lease: etcd holds only h1's.
        keys = lab.etcdctl("get", f"{PREFIX}/subnets/", "--prefix", "--keys-only").stdout.split()
        assert len(keys) == 1 and lab.subnet(ca_only) is None and lab.subnet(plain) is None


def test_demo_with_tls(lab_name):
    demo = overlayctl("lab", "demo", "--name", lab_name, "--hosts", "2", "--containers", "1", "--etcd-tls",
                      timeout=120)
    assert demo.returncode == 0, demo.stdout + demo.stderr
    assert "TLS with client certificates" in demo.stdout
    assert "2 lease(s)" in demo.stdout and "4/4 pairs reachable" in demo.stdout
    assert "2/2 container pairs reachable" in demo.stdout
