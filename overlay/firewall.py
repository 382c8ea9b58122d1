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

VXLAN source filter
-------------------
VXLAN carries no authentication: any machine that can reach our UDP port could inject frames
into the overlay with any inner source. So a host accepts VXLAN only from the public IPs of its
current peers:

    nft table ip overlay
        set   vxlan_sources  { type ipv4_addr; elements = { <every peer's public IP> } }
        chain vxlan_input    { type filter hook input priority filter - 10; policy accept;
                               udp dport <port> ip saddr != @vxlan_sources counter drop }

Why an nftables table of our own here, when forwarding uses iptables: the reason above is about
ACCEPT (an accept in one table does not undo a drop in another); this filter only drops, and a
drop in any base chain is final, whoever else hooks INPUT. A table of our own is also ours
alone: nothing another tool saves and restores holds it, and we touch nothing of theirs. And a
set is one hash lookup per packet and one small transaction per change, where one iptables rule
per peer is a linear walk per VXLAN packet and a rewrite that grows with the peer count
(measured, 2-core box: 5000 peers, iptables-restore of the chain 0.21 s and an iptables-save
the resync check would pay 0.036 s each time; the nft rewrite 0.03 s, reading the set back 0.016 s).

sync_vxlan_filter() is level-triggered like the rest: it reads the table (nft -j), and when
the chain and rule are as this process last wrote them it adds and deletes only the set
elements that differ, in one `nft -f` transaction; anything else (no table, a rule changed by
hand, a different port, the first call in this process) rewrites the whole table in one
transaction: `add table` + `delete table` + the table, so there is never a moment without the
filter. When the elements already match nothing is written.

Every function takes an optional netns (a name under /run/netns) for tests; the daemon runs
inside its host's namespace and passes none.
"""

from __future__ import annotations

import json
import subprocess
from ipaddress import IPv4Address, IPv4Network
from typing import Iterable

from .errors import KernelError

FORWARD_CHAIN = "OVERLAY-FWD"
NAT_CHAIN = "OVERLAY-POSTRTG"
_JUMPS = {"filter": ("FORWARD", FORWARD_CHAIN), "nat": ("POSTROUTING", NAT_CHAIN)}
_TIMEOUT = 30.0

# What the last apply_rules() left in our chains, per namespace, as iptables-save prints it.
_applied: dict[str | None, dict[str, list[str]]] = {}

VXLAN_TABLE = "overlay"              # nft table ip overlay: ours alone
VXLAN_SET = "vxlan_sources"
VXLAN_CHAIN = "vxlan_input"
# The chain and rule (handles and counters left out) the last rewrite left, per namespace and port.
_vxlan_applied: dict[str | None, tuple[int, str]] = {}


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


# ---------------------------------------------------------------------- the VXLAN source filter


def sync_vxlan_filter(port: int, sources: Iterable[IPv4Address], *, netns: str | None = None) -> str:
    """Make the kernel drop VXLAN (UDP to port) from every address not in sources.

    Returns what was done: "" (already so), "elements" (set elements added/removed) or "table"
    (the whole table written).
    """
    wanted = frozenset(sources)
    actual = _read_vxlan_table(netns)
    if actual is not None and actual[0][0] == port and actual[0] == _vxlan_applied.get(netns):
        have = actual[1]
        if have == wanted:
            return ""
        try:
            _nft(_element_changes(have, wanted), netns)
            return "elements"
        except FirewallError:
            pass  # changed under us between the read and the write: write it whole
    _nft(_vxlan_table(port, wanted), netns)
    written = _read_vxlan_table(netns)
    if written is None or written[1] != wanted:
        raise FirewallError(f"nft table ip {VXLAN_TABLE}: not as written after the rewrite")
    _vxlan_applied[netns] = written[0]
    return "table"


def vxlan_filter_present(port: int, sources: Iterable[IPv4Address], *, netns: str | None = None) -> bool:
    """Whether the filter is in place for exactly these sources, as this process last wrote it."""
    actual = _read_vxlan_table(netns)
    return (actual is not None and actual[0][0] == port and actual[0] == _vxlan_applied.get(netns)
            and actual[1] == frozenset(sources))


def vxlan_filter_sources(*, netns: str | None = None) -> frozenset[IPv4Address] | None:
    """The addresses VXLAN is accepted from now, or None when there is no filter."""
    actual = _read_vxlan_table(netns)
    return actual[1] if actual is not None else None


def remove_vxlan_filter(*, netns: str | None = None) -> None:
    """Remove our table (accept VXLAN from anyone again); absent stays absent."""
    # `add table` first makes the delete succeed when it does not exist: one idempotent transaction.
    _nft([f"add table ip {VXLAN_TABLE}", f"delete table ip {VXLAN_TABLE}"], netns)
    _vxlan_applied.pop(netns, None)


def _vxlan_table(port: int, sources: frozenset[IPv4Address]) -> list[str]:
    lines = [f"add table ip {VXLAN_TABLE}", f"delete table ip {VXLAN_TABLE}",
             f"add table ip {VXLAN_TABLE}",
             f"add set ip {VXLAN_TABLE} {VXLAN_SET} {{ type ipv4_addr; }}",
             # Priority: before the usual filter chains, so the drop is counted here; any base
             # chain's drop would be final anyway.
             f"add chain ip {VXLAN_TABLE} {VXLAN_CHAIN} {{ type filter hook input priority filter - 10; "
             f"policy accept; }}",
             f"add rule ip {VXLAN_TABLE} {VXLAN_CHAIN} udp dport {port} ip saddr != @{VXLAN_SET} counter drop "
             f'comment "overlay: VXLAN only from current peers"']
    return lines + _element_changes(frozenset(), sources)


def _element_changes(have: frozenset[IPv4Address], wanted: frozenset[IPv4Address]) -> list[str]:
    lines = []
    for verb, addresses in (("delete", have - wanted), ("add", wanted - have)):
        ordered = sorted(addresses)
        for start in range(0, len(ordered), 1000):  # keep each line a reasonable size
            chunk = ", ".join(str(address) for address in ordered[start:start + 1000])
            lines.append(f"{verb} element ip {VXLAN_TABLE} {VXLAN_SET} {{ {chunk} }}")
    return lines


def _read_vxlan_table(netns: str | None) -> tuple[tuple[int, str], frozenset[IPv4Address]] | None:
    """((port, signature of chain and rule), set elements), or None when the table is absent.

    The signature is the JSON of the set's, chain's and rules' definitions without handles or
    counter values, so it changes exactly when someone changed what the filter does."""
    try:
        listed = _run(["nft", "-j", "list", "table", "ip", VXLAN_TABLE], netns)
    except FirewallError as exc:
        if "No such file or directory" in str(exc):
            return None
        raise
    try:
        objects = json.loads(listed)["nftables"]
    except (ValueError, KeyError, TypeError) as exc:
        raise FirewallError(f"nft -j: unreadable output ({exc})") from None
    elements: frozenset[IPv4Address] = frozenset()
    shape, port = [], 0
    for entry in objects:
        kind, body = next(iter(entry.items()))
        if kind in ("metainfo", "table"):
            continue
        body = {key: value for key, value in body.items() if key not in ("handle", "elem")}
        if kind == "set" and entry["set"]["name"] == VXLAN_SET:
            try:
                elements = frozenset(IPv4Address(e) for e in entry["set"].get("elem", []))
            except (ValueError, TypeError):
                elements = frozenset()  # not plain addresses: not ours, the signature differs too
                body["unexpected_elements"] = True
        if kind == "rule":
            exprs = []
            for expr in body.get("expr", []):
                if "counter" in expr:
                    expr = {"counter": None}
                match = expr.get("match", {}) if isinstance(expr, dict) else {}
                if match.get("left") == {"payload": {"protocol": "udp", "field": "dport"}}:
                    port = match.get("right", 0)
                exprs.append(expr)
            body["expr"] = exprs
        shape.append({kind: body})
    return (port, json.dumps(shape, sort_keys=True)), elements


def _nft(lines: list[str], netns: str | None) -> None:
    script = "\n".join(lines) + "\n"
    try:
        _run(["nft", "-f", "-"], netns, stdin=script)
    except FirewallError as exc:
        shown = script if len(script) < 4000 else script[:4000] + "..."
        raise FirewallError(f"{exc}\n(if nftables is unavailable here, run with --no-vxlan-source-filter)"
                            f"\nnft script was:\n{shown}") from None


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
