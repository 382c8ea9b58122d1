"""Forwarding and masquerade rules for the overlay network, in iptables.

Design
------
Two chains of our own, each entered by one jump we keep at the top of a built-in chain:

    filter  FORWARD     -j OVERLAY-FWD      ACCEPT from the network, ACCEPT to the network
    nat     POSTROUTING -j OVERLAY-POSTRTG  (only with ip_masq) flannel's masquerade set:
            -s NET -d NET                RETURN      overlay to overlay keeps its addresses
            -s NET ! -d 224.0.0.0/4      MASQUERADE  containers leaving the overlay
            ! -s NET -d NET              MASQUERADE  the host (or anything else) into the overlay

Why iptables and not a table of our own in nftables: in nftables every table's hook sees the
packet, and an accept in our table does not undo a drop in another (Docker's, firewalld's), so
our FORWARD accept must live in the same filter/FORWARD chain the others use. That is the
iptables API, also on its nft backend, and it is why flannel uses it too.

How the rules are written: the current tables are read with iptables-save, the whole change is
computed, and one `iptables-restore --noflush` applies it in one transaction (the way Felix's
IptablesUpdater does). Declaring a chain (`:OVERLAY-FWD - [0:0]`) in a --noflush restore
creates it or empties it, so our chains are rewritten whole and cannot collect duplicates; the
jumps are inserted only where missing and extra copies are deleted. Nothing outside our two
chains and their jumps is touched.

rules_present() is the cheap check the daemon makes on every resync: our jumps are there once,
and our chains hold exactly what the last apply_rules() in this process left there (or, before
any apply in this process, are at least present and non-empty).

Every function takes an optional netns (a name under /run/netns) for tests; the daemon runs
inside its host's namespace and passes none.
"""

from __future__ import annotations

import subprocess
from ipaddress import IPv4Network

from .errors import KernelError

FORWARD_CHAIN = "OVERLAY-FWD"
NAT_CHAIN = "OVERLAY-POSTRTG"
_JUMPS = {"filter": ("FORWARD", FORWARD_CHAIN), "nat": ("POSTROUTING", NAT_CHAIN)}
_TIMEOUT = 30.0

# What the last apply_rules() left in our chains, per namespace, as iptables-save prints it.
_applied: dict[str | None, dict[str, list[str]]] = {}


class FirewallError(KernelError):
    """iptables refused our rules, or could not be run."""


def apply_rules(network: IPv4Network, ip_masq: bool, *, netns: str | None = None) -> None:
    """Accept forwarding for the overlay network and, with ip_masq, masquerade traffic leaving it."""
    tables = {"filter": _iptables_save("filter", netns), "nat": _iptables_save("nat", netns)}
    script = ["*filter", *_own_chain("filter", tables["filter"], _forward_rules(network)), "COMMIT"]
    if ip_masq:
        script += ["*nat", *_own_chain("nat", tables["nat"], _masquerade_rules(network)), "COMMIT"]
    else:
        script += ["*nat", *_removal("nat", tables["nat"]), "COMMIT"]
    _iptables_restore(script, netns)
    _applied[netns] = {table: _chain_rules(_iptables_save(table, netns), _JUMPS[table][1])
                       for table in ("filter", "nat")}


def rules_present(*, netns: str | None = None) -> bool:
    """Whether our jumps and chains are in place (and unchanged since our last apply_rules())."""
    expected = _applied.get(netns)
    for table, (builtin, chain) in _JUMPS.items():
        saved = _iptables_save(table, netns)
        exists = f":{chain} " in saved
        if expected is not None:
            wanted = expected[table]
            if not wanted:
                if exists or _jumps(saved, builtin, chain):
                    return False  # masquerading was switched off, yet our chain is back
                continue
            if _chain_rules(saved, chain) != wanted:
                return False
        elif table == "filter":
            if not _chain_rules(saved, chain):
                return False
        elif not exists:
            continue  # never applied here and no masquerade chain: nothing to check
        if len(_jumps(saved, builtin, chain)) != 1:
            return False
    return True


def remove_rules(*, netns: str | None = None) -> None:
    """Remove our chains and the jumps to them; what is already gone stays gone."""
    script = []
    for table in _JUMPS:
        script += [f"*{table}", *_removal(table, _iptables_save(table, netns)), "COMMIT"]
    _iptables_restore(script, netns)
    _applied.pop(netns, None)


# ---------------------------------------------------------------------- the rules


def _forward_rules(network: IPv4Network) -> list[str]:
    return [
        f'-s {network} -m comment --comment "overlay: forward from the overlay network" -j ACCEPT',
        f'-d {network} -m comment --comment "overlay: forward to the overlay network" -j ACCEPT',
    ]


def _masquerade_rules(network: IPv4Network) -> list[str]:
    return [
        f'-s {network} -d {network} -m comment --comment "overlay: no NAT inside the overlay" -j RETURN',
        f'-s {network} ! -d 224.0.0.0/4 -m comment --comment "overlay: NAT traffic leaving the overlay"'
        " -j MASQUERADE --random-fully",
        f'! -s {network} -d {network} -m comment --comment "overlay: NAT traffic entering the overlay"'
        " -j MASQUERADE --random-fully",
    ]


def _own_chain(table: str, saved: str, rules: list[str]) -> list[str]:
    """Restore lines that (re)write our chain of this table and leave exactly one jump to it."""
    builtin, chain = _JUMPS[table]
    # In a --noflush restore, declaring a chain creates it, or empties it if it exists.
    lines = [f":{chain} - [0:0]", *(f"-A {chain} {rule}" for rule in rules)]
    jumps = _jumps(saved, builtin, chain)
    if not jumps:
        # At the top: a DROP or REJECT that another tool appended must not come first.
        lines.append(f'-I {builtin} 1 -m comment --comment "overlay" -j {chain}')
    for extra in jumps[1:]:
        lines.append(f"-D {builtin} {extra}")
    return lines


def _removal(table: str, saved: str) -> list[str]:
    builtin, chain = _JUMPS[table]
    lines = [f"-D {builtin} {jump}" for jump in _jumps(saved, builtin, chain)]
    if f":{chain} " in saved:
        lines += [f":{chain} - [0:0]", f"-X {chain}"]
    return lines


def _jumps(saved: str, builtin: str, chain: str) -> list[str]:
    """The rule specs (after `-A BUILTIN `) of every rule in builtin that jumps to chain."""
    head = f"-A {builtin} "
    return [line[len(head):] for line in saved.splitlines()
            if line.startswith(head) and line.endswith(f" -j {chain}")]


def _chain_rules(saved: str, chain: str) -> list[str]:
    head = f"-A {chain} "
    return [line for line in saved.splitlines() if line.startswith(head)]


# ---------------------------------------------------------------------- running iptables


def _command(argv: list[str], netns: str | None) -> list[str]:
    return ["nsenter", f"--net=/run/netns/{netns}", *argv] if netns else argv


def _run(argv: list[str], netns: str | None, stdin: str | None = None) -> str:
    command = _command(argv, netns)
    try:
        done = subprocess.run(command, input=stdin, capture_output=True, text=True, timeout=_TIMEOUT)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise FirewallError(f"{argv[0]}: cannot run: {exc}") from None
    if done.returncode != 0:
        raise FirewallError(f"{argv[0]} failed (exit {done.returncode}): {done.stderr.strip()}")
    return done.stdout


def _iptables_save(table: str, netns: str | None) -> str:
    return _run(["iptables-save", "-t", table], netns)


def _iptables_restore(lines: list[str], netns: str | None) -> None:
    script = "\n".join(lines) + "\n"
    try:
        _run(["iptables-restore", "--noflush"], netns, stdin=script)
    except FirewallError as exc:
        raise FirewallError(f"{exc}\nrules were:\n{script}") from None
