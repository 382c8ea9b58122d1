"""`overlayctl lab`: several simulated hosts on this machine (see overlay/lab.py for the design).

    overlayctl lab up --hosts 3 [--containers M] [--etcd-members 1|3] [--etcd-tls] [--name lab]
                      [--network 10.244.0.0/16] [--subnet-lease-ttl S] [--no-wait]
    overlayctl lab status [--name lab] [--json]
    overlayctl lab restart HOST [--name lab]
    overlayctl lab move CONTAINER HOST [--name lab]   (keeps the container's namespace and address)
    overlayctl lab down [--name lab | --all]
    overlayctl lab demo [--name lab] [--hosts 3] [--containers 2] [--etcd-tls]   (what `make demo` runs)

The commands are thin: every step is a `Lab` method, so tests and benchmarks drive the same code.
A lab outlives the command that made it; `lab down` removes it from whatever state it is in.
"""

from __future__ import annotations

import json
import sys
import time

import click

from .errors import OverlayError
from .lab import (DEFAULT_LAB_NAME, DEFAULT_NETWORK, Lab, LabNotFound, lab_names, teardown,
                  teardown_all, underlay_warnings)

_name_option = click.option("--name", default=DEFAULT_LAB_NAME, show_default=True,
                            help="lab name, 1-4 lowercase letters or digits")


def _fail(exc: Exception) -> None:
    raise click.ClickException(str(exc))


def _table(rows: list[list[str]]) -> str:
    widths = [max(len(row[column]) for row in rows) for column in range(len(rows[0]))]
    return "\n".join("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in rows)


_etcd_tls_option = click.option(
    "--etcd-tls", is_flag=True,
    help="etcd serves clients over TLS and refuses any without a certificate: the lab makes a CA, a "
         "server and a client certificate (in its state dir) and gives every client the latter")


def _etcd_summary(handle: Lab) -> str:
    """The endpoints, and with TLS the client files an operator passes to overlayd or etcdctl."""
    endpoints = ",".join(handle.etcd_endpoints)
    tls = handle.etcd_tls
    if tls is None:
        return endpoints
    return (f"{endpoints} (TLS with client certificates: CA {tls.ca_file}, client certificate "
            f"{tls.cert_file}, key {tls.key_file})")


def _warn() -> None:
    for warning in underlay_warnings():
        click.echo(f"warning: {warning}", err=True)


def _load(name: str) -> Lab:
    try:
        return Lab.load(name)
    except LabNotFound as exc:
        others = [other for other in lab_names() if other != name]
        hint = f" (labs on this machine: {', '.join(others)})" if others else ""
        raise click.ClickException(f"{exc}{hint}") from None
    except OverlayError as exc:   # LabError, and what the lab passes on (etcd would not start, ...)
        _fail(exc)


@click.group()
def lab() -> None:
    """Simulated hosts (network namespaces) on a bridge, a real etcd, one overlayd per host."""


@lab.command()
@click.option("--hosts", default=3, show_default=True, type=click.IntRange(0, 243), help="simulated hosts")
@click.option("--containers", default=0, show_default=True, type=click.IntRange(0, 200),
              help="containers per host, attached through the CNI plugin as a runtime does")
@click.option("--etcd-members", default="1", show_default=True, type=click.Choice(["1", "3"]),
              help="etcd cluster size")
@_etcd_tls_option
@_name_option
@click.option("--network", default=DEFAULT_NETWORK, show_default=True, help="the overlay network (flannel Network)")
@click.option("--subnet-lease-ttl", type=click.IntRange(2), default=None,
              help="seconds a subnet lease lives unless renewed (daemon default: 24 h)")
@click.option("--wait/--no-wait", default=True, show_default=True, help="wait until every daemon is ready")
@click.option("--timeout", default=90.0, show_default=True, help="seconds to wait for readiness")
def up(hosts: int, containers: int, etcd_members: str, etcd_tls: bool, name: str, network: str,
       subnet_lease_ttl: int | None, wait: bool, timeout: float) -> None:
    """Make the lab: underlay bridge, etcd, hosts, one overlayd each, and M containers per host."""
    started = time.monotonic()
    _warn()
    try:
        handle = Lab(name)
        handle.up(hosts=hosts, etcd_members=int(etcd_members), network=network,
                  subnet_lease_ttl=subnet_lease_ttl, containers=containers, timeout=timeout,
                  etcd_tls=etcd_tls)
    except OverlayError as exc:
        _fail(exc)
    click.echo(f"lab {name}: underlay {handle.underlay} on {handle.bridge}, etcd {_etcd_summary(handle)}, "
               f"{hosts} host(s) started in {time.monotonic() - started:.1f} s")
    if containers and hosts:
        click.echo(f"{len(handle.containers)} container(s) attached through the CNI plugin: "
                   + ", ".join(f"{c.name} {c.address}" for c in handle.containers))
    if wait and hosts:
        try:
            handle.wait_converged(timeout=timeout)
        except OverlayError as exc:
            raise click.ClickException(f"{exc}\nThe lab is left up for inspection (logs in "
                                       f"{handle.state_dir / 'logs'}); remove it with: overlayctl lab down "
                                       f"--name {name}") from None
        click.echo(f"all {hosts} daemons ready and routing to each other "
                   f"{time.monotonic() - started:.1f} s after `lab up` began")
    click.echo(f"see: overlayctl lab status --name {name}; remove: overlayctl lab down --name {name}")


@lab.command()
@_name_option
@click.option("--json", "as_json", is_flag=True, help="machine-readable output")
def status(name: str, as_json: bool) -> None:
    """Hosts, subnets, daemons and etcd of a lab."""
    handle = _load(name)
    report = handle.status()
    if as_json:
        click.echo(json.dumps(report, indent=2))
        return
    etcd = report["etcd"]
    click.echo(f"lab {name} ({report['phase']}): underlay {report['underlay']['cidr']} on "
               f"{report['underlay']['bridge']}; etcd {_etcd_summary(handle)} prefix {etcd['prefix']}")
    rows = [["HOST", "NETNS", "PUBLIC IP", "SUBNET", "DEVICE", "DAEMON PID", "READY"]]
    for host in report["hosts"]:
        rows.append([host["name"], host["netns"], host["public_ip"], host["subnet"] or "-", host["vxlan_device"],
                     str(host["daemon_pid"] or "not running"), "yes" if host["ready"] else "no"])
    click.echo(_table(rows))
    containers = [(host["name"], container) for host in report["hosts"] for container in host["containers"]]
    if containers:
        rows = [["CONTAINER", "HOST", "NETNS", "IP", "CONTAINER ID"]]
        rows += [[c["name"], host, c["netns"], c["ip"] or "-", c["container_id"][:12]] for host, c in containers]
        click.echo("\n" + _table(rows))


@lab.command()
@click.argument("host")
@_name_option
@click.option("--wait/--no-wait", default=True, show_default=True, help="wait until the daemon is ready again")
@click.option("--timeout", default=60.0, show_default=True)
def restart(host: str, name: str, wait: bool, timeout: float) -> None:
    """Restart HOST's daemon (SIGTERM leaves its data plane in place), e.g. `lab restart h2`."""
    handle = _load(name)
    try:
        started = time.monotonic()
        pid = handle.restart(host)
        click.echo(f"{handle.host(host).name}: overlayd restarted, pid {pid}")
        if wait:
            handle.wait_ready([host], timeout=timeout)
            click.echo(f"{handle.host(host).name}: ready {time.monotonic() - started:.1f} s after the restart began")
    except OverlayError as exc:
        _fail(exc)


@lab.command()
@click.argument("container")
@click.argument("host")
@_name_option
@click.option("--timeout", default=60.0, show_default=True)
def move(container: str, host: str, name: str, timeout: float) -> None:
    """Move CONTAINER to HOST keeping its address, e.g. `lab move h1c1 h3`: DEL on its host, ADD
    with the same address on HOST, the container's namespace (and its sockets) kept."""
    handle = _load(name)
    try:
        before = handle.container(container)
        timings: dict = {}
        moved = handle.move_container(container, host, timeout=timeout, timings=timings)
    except OverlayError as exc:
        _fail(exc)
    click.echo(f"{moved.name}: moved from {before.host} to {moved.host} keeping {moved.address} "
               f"(DEL {1000 * (timings['del_done'] - timings['del_started']):.0f} ms, "
               f"ADD {1000 * (timings['add_done'] - timings['del_done']):.0f} ms)")


@lab.command()
@_name_option
@click.option("--all", "every", is_flag=True, help="remove every lab and every lab leftover on this machine")
def down(name: str, every: bool) -> None:
    """Remove a lab: processes, namespaces, links, state. Works after a crash too."""
    try:
        removed = teardown_all() if every else {name: teardown(name)}
    except OverlayError as exc:
        _fail(exc)
    for lab_name, objects in removed.items():
        click.echo(f"lab {lab_name}: removed {', '.join(objects)}" if objects else
                   f"lab {lab_name}: nothing left to remove")
    if not removed:
        click.echo("no lab found")


@lab.command()
@_name_option
@click.option("--hosts", default=3, show_default=True, type=click.IntRange(2, 20))
@click.option("--containers", default=2, show_default=True, type=click.IntRange(0, 10),
              help="containers per host, attached through the CNI plugin")
@click.option("--timeout", default=120.0, show_default=True, help="seconds to wait for the overlay to converge")
@_etcd_tls_option
@click.pass_context
def demo(ctx: click.Context, name: str, hosts: int, containers: int, timeout: float, etcd_tls: bool) -> None:
    """Bring up a fresh lab with containers, show its leases, host-to-host and container-to-container
    reachability over the overlay, and a container reaching the underlay through masquerade."""
    started = time.monotonic()
    try:
        removed = teardown(name)
        if removed:
            click.echo(f"removed a leftover lab {name} ({len(removed)} namespaces/links)")
        _warn()
        click.echo(f"starting lab {name}: etcd{' with TLS and client certificates' if etcd_tls else ''} "
                   f"and {hosts} hosts, each running overlayd"
                   + (f", with {containers} containers each attached through the CNI plugin" if containers else "")
                   + " ...")
        handle = Lab(name).up(hosts=hosts, containers=containers, timeout=timeout, etcd_tls=etcd_tls)
        click.echo(f"  underlay {handle.underlay} on bridge {handle.bridge}; etcd at {_etcd_summary(handle)}")
        for host in handle.hosts:
            attached = ", ".join(f"{c.name} {c.address}" for c in handle.containers if c.host == host.name)
            click.echo(f"  {host.name}: namespace {host.netns}, eth0 {host.public_ip}"
                       + (f"; containers {attached}" if attached else "") + f"; log {host.log_path}")
        handle.wait_converged(timeout=timeout)
    except OverlayError as exc:
        raise click.ClickException(f"{exc}\nInspect with `overlayctl lab status --name {name}`; "
                                   f"remove with `overlayctl lab down --name {name}`") from None
    click.echo(f"all {hosts} hosts ready and routing to each other after {time.monotonic() - started:.1f} s\n")

    click.echo(f"leases in etcd (overlayctl leases --lab {name}):")
    from .cli import leases
    ctx.invoke(leases, lab_name=name)

    matrix = handle.reachability()
    click.echo("\nreachability over the overlay: ping from the row host's namespace to the column "
               "host's VXLAN address")
    names = [host.name for host in handle.hosts]
    rows = [["FROM \\ TO"] + [f"{host} {handle.overlay_address(host)}" for host in names]]
    for source in names:
        rows.append([source] + [f"{rtt:.2f} ms" if (rtt := matrix[(source, destination)]) is not None else "FAIL"
                                for destination in names])
    click.echo(_table(rows))
    failures = [pair for pair, rtt in matrix.items() if rtt is None]
    click.echo(f"\n{len(matrix) - len(failures)}/{len(matrix)} pairs reachable.")
    masqueraded = True
    if handle.containers:
        failures += _demo_containers(handle)
        probe = handle.masquerade_probe(handle.containers[0])
        masqueraded = probe.masqueraded
        click.echo(f"\nmasquerade: ping from container {probe.container} ({probe.container_ip}) to {probe.target}, "
                   f"the lab bridge in the root namespace (the lab's outside world):\n"
                   f"  reply: {f'{probe.rtt_ms:.2f} ms' if probe.rtt_ms is not None else 'NONE'}; the echo request "
                   f"left host {handle.container(probe.container).host} with source "
                   f"{probe.underlay_source or 'not seen'} (the host's public IP is {probe.host_public_ip})\n"
                   f"  the root namespace has no route into the overlay: `ip route get {probe.container_ip}` "
                   f"gives \"{probe.route_back}\"; only NAT brings the reply back")
    first = handle.containers[0] if handle.containers else None
    click.echo("\nThe lab is still up; try:\n"
               f"  overlayctl lab status --name {name}\n"
               f"  ip netns exec {handle.hosts[0].netns} ip route show dev {handle.vxlan_device}\n"
               + (f"  ip netns exec {first.netns} ip addr show eth0\n" if first else "")
               + f"  overlayctl lab restart h2 --name {name}\n"
               f"take it down with: overlayctl lab down --name {name}"
               + ("   (or: make lab-down)" if name == DEFAULT_LAB_NAME else ""))
    if failures:
        click.echo(f"unreachable: {', '.join(f'{a}->{b}' for a, b in failures)}", err=True)
    if not masqueraded:
        click.echo("a container could not reach the underlay through masquerade", err=True)
    if failures or not masqueraded:
        sys.exit(1)


def _demo_containers(handle: Lab) -> list[tuple[str, str]]:
    """Print the container-to-container matrix; returns the unreachable pairs."""
    matrix = handle.container_reachability()
    containers = handle.containers
    click.echo("\ncontainers, attached through the CNI plugin: ping from the row container to the column "
               "container (- = itself)")
    rows = [["FROM \\ TO"] + [f"{c.name} {c.address}" for c in containers]]
    for source in containers:
        rows.append([f"{source.name} on {source.host}"] + [
            "-" if source.name == destination.name
            else f"{rtt:.2f} ms" if (rtt := matrix[(source.name, destination.name)]) is not None else "FAIL"
            for destination in containers])
    click.echo(_table(rows))
    failures = [pair for pair, rtt in matrix.items() if rtt is None]
    hosts_of = {c.name: c.host for c in containers}
    across = [pair for pair in matrix if hosts_of[pair[0]] != hosts_of[pair[1]]]
    click.echo(f"\n{len(matrix) - len(failures)}/{len(matrix)} container pairs reachable "
               f"({len([p for p in across if matrix[p] is not None])}/{len(across)} across hosts).")
    return failures
