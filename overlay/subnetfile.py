"""The subnet file: the small, stable contract between the daemon and the CNI plugin.

`<run-dir>/subnet.env` holds flannel's variable names, so tools written for flannel read it too:

    FLANNEL_NETWORK=10.244.0.0/16
    FLANNEL_SUBNET=10.244.3.1/24     (first usable address / subnet length: the bridge gateway)
    FLANNEL_MTU=1450
    FLANNEL_IPMASQ=true

It is written atomically (temporary file, fsync, rename) once the data plane is ready, so a reader
sees either the old file or the new one, never half of one. Standard library only: the CNI plugin
imports this on its hot path.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from ipaddress import IPv4Interface, IPv4Network
from pathlib import Path

SUBNET_FILE_NAME = "subnet.env"


class SubnetFileError(ValueError):
    """The subnet file is missing a variable or holds a value that does not parse."""


@dataclass(frozen=True)
class SubnetFile:
    network: IPv4Network
    subnet: IPv4Interface   # gateway address with the subnet's length, e.g. 10.244.3.1/24
    mtu: int
    ip_masq: bool

    def render(self) -> str:
        return (f"FLANNEL_NETWORK={self.network}\n"
                f"FLANNEL_SUBNET={self.subnet}\n"
                f"FLANNEL_MTU={self.mtu}\n"
                f"FLANNEL_IPMASQ={'true' if self.ip_masq else 'false'}\n")


def for_subnet(network: IPv4Network, subnet: IPv4Network, mtu: int, ip_masq: bool) -> SubnetFile:
    return SubnetFile(network, IPv4Interface((subnet.network_address + 1, subnet.prefixlen)), mtu, ip_masq)


def write_subnet_file(run_dir: Path, contents: SubnetFile) -> Path:
    run_dir.mkdir(parents=True, exist_ok=True, mode=0o755)
    path = run_dir / SUBNET_FILE_NAME
    tmp = run_dir / f".{SUBNET_FILE_NAME}.{os.getpid()}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.write(fd, contents.render().encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    return path


def parse_subnet_file(text: str) -> SubnetFile:
    values = {}
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#") and "=" in line:
            name, _, value = line.partition("=")
            values[name.strip()] = value.strip()
    try:
        return SubnetFile(
            network=IPv4Network(values["FLANNEL_NETWORK"]),
            subnet=IPv4Interface(values["FLANNEL_SUBNET"]),
            mtu=int(values["FLANNEL_MTU"]),
            ip_masq=values.get("FLANNEL_IPMASQ", "false").lower() == "true",
        )
    except KeyError as exc:
        raise SubnetFileError(f"subnet file lacks {exc.args[0]}") from None
    except ValueError as exc:
        raise SubnetFileError(f"subnet file holds a bad value: {exc}") from None


def read_subnet_file(run_dir: Path) -> SubnetFile:
    """Raises FileNotFoundError when the daemon has not (yet) written it."""
    return parse_subnet_file((run_dir / SUBNET_FILE_NAME).read_text())
