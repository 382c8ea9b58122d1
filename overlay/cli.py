"""overlayctl: the operator's command line.

    overlayctl config set FILE|-     validate a flannel network config and store it
    overlayctl config get            print the stored config
    overlayctl leases                every lease: subnet, public IP, VTEP MAC, TTL left, this host
    overlayctl lab ...               several simulated hosts on this machine
    overlayctl install-cni ...       install the CNI plugin and its conflist

etcd options have environment-variable twins (OVERLAY_ETCD_ENDPOINTS, ...), the same as overlayd's;
`--lab NAME` takes the endpoints of a running lab instead.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from ipaddress import IPv4Address
from pathlib import Path

import click

from .config import parse_config
from .errors import ConfigError, OverlayError
from .lease import DEFAULT_PREFIX


def _etcd_options(command):
    options = [
        click.option("--etcd-endpoints", envvar="OVERLAY_ETCD_ENDPOINTS", default="http://127.0.0.1:2379",
                     show_default=True, help="comma-separated etcd client URLs"),
        click.option("--etcd-prefix", envvar="OVERLAY_ETCD_PREFIX", default=DEFAULT_PREFIX, show_default=True),
        click.option("--etcd-cafile", envvar="OVERLAY_ETCD_CAFILE", type=click.Path(dir_okay=False)),
        click.option("--etcd-certfile", envvar="OVERLAY_ETCD_CERTFILE", type=click.Path(dir_okay=False)),
        click.option("--etcd-keyfile", envvar="OVERLAY_ETCD_KEYFILE", type=click.Path(dir_okay=False)),
        click.option("--lab", "lab_name", default=None, help="use the etcd of this running lab"),
    ]
    for option in reversed(options):
        command = option(command)
    return command


def _store(etcd_endpoints, etcd_prefix, etcd_cafile, etcd_certfile, etcd_keyfile, lab_name):
    from .etcd import EtcdSettings, EtcdStore
    if lab_name:
        from .lab import lab_etcd_settings
        return EtcdStore(lab_etcd_settings(lab_name))

    def path(value):
        return Path(value) if value else None
    return EtcdStore(EtcdSettings.from_flags(etcd_endpoints, etcd_prefix, path(etcd_cafile),
                                             path(etcd_certfile), path(etcd_keyfile)))


def _run(coroutine):
    try:
        return asyncio.run(coroutine)
    except OverlayError as exc:
        raise click.ClickException(str(exc)) from None


@click.group()
def main() -> None:
    """Operate a flannel-compatible VXLAN overlay."""


@main.group()
def config() -> None:
    """The network config in etcd (<prefix>/config)."""


@config.command("set")
@click.argument("source", type=click.File("r"))
@_etcd_options
def config_set(source, **etcd) -> None:
    """Validate the flannel JSON in SOURCE (a file, or - for stdin) and store it."""
    text = source.read()
    try:
        parsed = parse_config(text)
    except ConfigError as exc:
        raise click.ClickException(f"config refused, nothing stored: {exc}") from None

    async def store_it():
        store = _store(**etcd)
        try:
            await store.put_config(text.strip().encode())
        finally:
            await store.close()
    _run(store_it())
    click.echo(f"stored: Network {parsed.network}, /{parsed.subnet_len} subnets from {parsed.subnet_min} "
               f"to {parsed.subnet_max} ({parsed.subnet_count}), VXLAN VNI {parsed.backend.vni} "
               f"port {parsed.backend.port}")


@config.command("get")
@_etcd_options
def config_get(**etcd) -> None:
    """Print the stored config."""
    async def fetch():
        store = _store(**etcd)
        try:
            return await store.get_config()
        finally:
            await store.close()
    raw = _run(fetch())
    if raw is None:
        raise click.ClickException("no network config is stored")
    click.echo(raw.decode())


@main.command()
@click.option("--json", "as_json", is_flag=True, help="machine-readable output")
@_etcd_options
def leases(as_json: bool, **etcd) -> None:
    """Every lease: subnet, public IP, VTEP MAC, TTL left; `*` marks this host."""
    async def fetch():
        store = _store(**etcd)
        try:
            found, _ = await store.list_leases()
            ttls = await asyncio.gather(*(store.time_to_live(lease.lease_id) if lease.lease_id
                                          else _no_ttl() for lease in found))
            return found, ttls
        finally:
            await store.close()
    found, ttls = _run(fetch())
    local = _local_addresses()
    rows = [{
        "subnet": str(lease.subnet),
        "public_ip": str(lease.attrs.public_ip),
        "vtep_mac": lease.attrs.vtep_mac,
        "ttl_seconds": ttl,
        "this_host": lease.attrs.public_ip in local,
    } for lease, ttl in sorted(zip(found, ttls), key=lambda pair: pair[0].subnet)]
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    click.echo(format_lease_table(rows))


async def _no_ttl() -> int:
    return -1


def format_lease_table(rows: list[dict]) -> str:
    header = ("", "SUBNET", "PUBLIC IP", "VTEP MAC", "TTL LEFT")
    lines = [header] + [("*" if row["this_host"] else "", row["subnet"], row["public_ip"], row["vtep_mac"],
                         _format_ttl(row["ttl_seconds"])) for row in rows]
    widths = [max(len(line[column]) for line in lines) for column in range(len(header))]
    text = "\n".join("  ".join(cell.ljust(width) for cell, width in zip(line, widths)).rstrip() for line in lines)
    return f"{text}\n{len(rows)} lease(s)"


def _format_ttl(seconds: int) -> str:
    if seconds < 0:
        return "none"
    hours, rest = divmod(int(seconds), 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m{secs:02d}s" if hours else f"{minutes}m{secs:02d}s"


def _local_addresses() -> set[IPv4Address]:
    try:
        out = subprocess.run(["ip", "-j", "-4", "addr"], capture_output=True, text=True, check=True).stdout
        return {IPv4Address(info["local"]) for link in json.loads(out) for info in link.get("addr_info", [])}
    except (OSError, subprocess.CalledProcessError, ValueError, KeyError):
        return set()


def _register_optional_commands() -> None:
    """Sub-commands that live beside their code: the lab and the CNI installer."""
    try:
        from .lab_cli import lab
        main.add_command(lab)
    except ImportError:
        pass
    try:
        from cni.install import install_cni_command
        main.add_command(install_cni_command, name="install-cni")
    except ImportError:
        pass
    try:
        from bench.cli import bench_command
        main.add_command(bench_command, name="bench")
    except ImportError:
        pass


_register_optional_commands()

if __name__ == "__main__":
    sys.exit(main())
