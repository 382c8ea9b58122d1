"""Forwarding and masquerade rules for the overlay network, in iptables.

Design
------
Two chains of our own, each entered by one jump we keep at the top of a built-in chain:

    filter  FORWARD     -j OVERLAY-FWD      ACCEPT from the network, ACCEPT to the network
    nat     POSTROUTING -j OVERLAY-POSTRTG  (only with ip_masq) flannel's masquerade set:
            -s NET -d NET                RETURN      overlay to overlay keeps its addresses
            -s NET ! -d 224.0.0.0/4      MASQUERADE  containers leaving the overlay
            ! -s NET -d OWN              RETURN      from outside to this host's own containers (a
                                                     port mapping, a routed client): the container
                                                     sees the client, as with flannel
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

sync_vxlan_filter() is level-triggered like the rest: it reads the table, and when the set,
chain and rule are as this process last wrote them it adds and deletes only the set elements
that differ, in one transaction; anything else (no table, a rule changed by hand, a different
port, the first call in this process) rewrites the whole table in one transaction: `add table` +
`delete table` + the table, so there is never a moment without the filter. When the elements
already match nothing is written.

The read is one `list table` in nft's stateless text form (no counter values, no handles): the
text without the elements line is the signature compared with what this process last wrote, and
the elements are compared as integers (socket.inet_aton; IPv4Address() per element cost as much
as the kernel's dump at 5000 peers). Text rather than JSON: cheaper for nft to print and for us
to parse, and the signature is only compared within one process, so its format may change with
nft's version. `list set` or `list chain` would not be cheaper: nft fetches the table's sets
with their elements for any listing.

How nftables is reached: in the caller's own namespace (netns None, the daemon's case) through
libnftables in this process (ctypes: nft_ctx_new, output and errors buffered,
nft_run_cmd_from_buffer); in another namespace, and when the library cannot be loaded (logged
once), by running `nft` (`nft -f -`, `nft --stateless list ...`). Both take the same script text
and print the same listing. Why in-process: with 50 daemons on a 2-core lab box every peer join
made each host fork and exec nft (and iptables-save), and that CPU, not the kernel's work, is
what delayed convergence. Measured in a namespace on the 2-core box, CPU per sync (the nft
command, JSON read -> in-process, text read; the middle of 3 runs, each roughly +-15%):

    sources            50            1000           5000
    nothing changed    2.6 -> 0.2    7.0 -> 1.4     26 -> 7.7 ms
    one source added   4.9 -> 0.3    10  -> 1.8     29 -> 8.9 ms
    whole table        9.1 -> 0.7    20  -> 4.5     75 -> 27 ms

What remains at 5000 is the kernel's dump and nft's parsing, and even that is rarely paid:
every commit to nftables in a namespace moves its ruleset generation, which one netlink request
reads (NFT_MSG_GETGEN, see ruleset_generation()). The filter is remembered with the generation
it was last seen at, and while the generation stays, it is exactly that: a resync with nothing
changed lists nothing, and a lease event's update_vxlan_filter() writes the changed elements
alone (our own commit moves the generation by exactly one, which says nobody else's came in
between). Any other commit (nft by hand, iptables-nft, another tool) makes the next call list
the table again. rules_present() uses the same generation to skip iptables-save when iptables
is the nft backend (`iptables -V` says nf_tables), as here; with the legacy backend it forks as
before.

One libnftables context serves the process: it is not thread-safe, so a lock guards it (the
daemon calls from its netlink thread, tests from others), and ctypes releases the GIL while nft
works. Its netlink socket belongs to the namespace it was opened in, so a context is remade when
the calling thread is in another namespace (setns) or another process (fork): netns None always
means the caller's namespace. A failed command raises FirewallError with nft's own message.

Every function takes an optional netns (a name under /run/netns) for tests; the daemon runs
inside its host's namespace and passes none. The iptables half still runs iptables-save and
iptables-restore as commands.
"""

from __future__ import annotations

import ctypes
import logging
import os
import re
import socket
import struct
import subprocess
import threading
from ipaddress import IPv4Address, IPv4Network
from typing import Iterable

from cni.rtnl import NLMSGHDR, attributes, messages

from .errors import KernelError

log = logging.getLogger(__name__)

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
# Per namespace: (ruleset generation, port, set elements) when the filter was last seen to be
# as we wrote it, holding those elements. While the generation is unchanged it still is.
_vxlan_known: dict[str | None, tuple[int, int, set[int]] | None] = {}
# Per namespace: the ruleset generation at which rules_present() last found our iptables rules
# in place (iptables on its nft backend commits to nftables too, so the generation covers them).
_rules_verified: dict[str | None, int] = {}


class FirewallError(KernelError):
    """iptables or nftables refused our rules, or could not be run."""


def apply_rules(network: IPv4Network, own_subnet: IPv4Network, ip_masq: bool, *, netns: str | None = None) -> None:
    """Accept forwarding for the overlay network and, with ip_masq, masquerade traffic leaving
    it (own_subnet: this host's subnet, whose containers see who reached them from outside)."""
    tables = {"filter": _iptables_save("filter", netns), "nat": _iptables_save("nat", netns)}
    script = ["*filter", *_own_chain("filter", tables["filter"], _forward_rules(network)), "COMMIT"]
    if ip_masq:
        script += ["*nat", *_own_chain("nat", tables["nat"], _masquerade_rules(network, own_subnet)), "COMMIT"]
    else:
        script += ["*nat", *_removal("nat", tables["nat"]), "COMMIT"]
    _rules_verified.pop(netns, None)
    _iptables_restore(script, netns)
    _applied[netns] = {table: _chain_rules(_iptables_save(table, netns), _JUMPS[table][1])
                       for table in ("filter", "nat")}


def rules_present(*, netns: str | None = None) -> bool:
    """Whether our jumps and chains are in place (and unchanged since our last apply_rules()).

    With iptables on its nftables backend, a check is remembered with the ruleset generation
    it was made at: while no commit has happened since, the answer stands, and the two forks of
    iptables-save (7 ms, more with a big set in the ruleset) are saved."""
    generation = ruleset_generation(netns) if _iptables_on_nftables() else None
    if generation is not None and _rules_verified.get(netns) == generation:
        return True
    _rules_verified.pop(netns, None)
    present = _rules_present(netns)
    if present and generation is not None:
        _rules_verified[netns] = generation
    return present


def _rules_present(netns: str | None) -> bool:
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
    _rules_verified.pop(netns, None)
    _iptables_restore(script, netns)
    _applied.pop(netns, None)


# ---------------------------------------------------------------------- the VXLAN source filter


def sync_vxlan_filter(port: int, sources: Iterable[IPv4Address], *, netns: str | None = None) -> str:
    """Make the kernel drop VXLAN (UDP to port) from every address not in sources.

    Returns what was done: "" (already so), "elements" (set elements added/removed) or "table"
    (the whole table written).
    """
    wanted = frozenset(map(int, sources))
    generation = ruleset_generation(netns)
    known = _vxlan_known.get(netns)
    if known is not None and generation is not None and known[:2] == (generation, port):
        # Nothing was committed to any table here since we last wrote or read ours: it holds
        # exactly what we know, and needs no listing (30 ms at 5000 peers).
        have = known[2]
        if have == wanted:
            return ""
        if _write_elements(port, generation, have, wanted - have, have - wanted, netns):
            return "elements"
    actual = _read_vxlan_table(netns)
    if actual is not None and actual[0][0] == port and actual[0] == _vxlan_applied.get(netns):
        have = actual[1]
        if generation is None:
            if have == wanted:
                return ""
            try:
                _nft(_element_changes(have, wanted), netns)
                return "elements"
            except FirewallError:
                pass  # changed under us between the read and the write: write it whole
        else:
            # Known from here on, as of the generation read before the listing (a commit made
            # after that moves it, and the next call lists again).
            if have == wanted:
                _vxlan_known[netns] = (generation, port, set(have))
                return ""
            if _write_elements(port, generation, set(have), wanted - have, have - wanted, netns):
                return "elements"
            if _vxlan_listed_as_wanted(port, wanted, netns):
                return "elements"   # ours went in, beside somebody else's commit
    _vxlan_known.pop(netns, None)
    _nft(_vxlan_table(port, wanted), netns)
    generation = ruleset_generation(netns)
    written = _read_vxlan_table(netns)
    if written is None or written[1] != wanted:
        raise FirewallError(f"nft table ip {VXLAN_TABLE}: not as written after the rewrite")
    _vxlan_applied[netns] = written[0]
    if generation is not None:
        _vxlan_known[netns] = (generation, port, set(wanted))
    return "table"


def _vxlan_listed_as_wanted(port: int, wanted: frozenset[int], netns: str | None) -> bool:
    """After a write that somebody else's commit may have joined: list the table once more, and
    know it again if it is ours and holds what we want."""
    generation = ruleset_generation(netns)
    actual = _read_vxlan_table(netns)
    if actual is None or actual[0] != _vxlan_applied.get(netns) or actual[0][0] != port or actual[1] != wanted:
        return False
    if generation is not None:
        _vxlan_known[netns] = (generation, port, set(wanted))
    return True


def update_vxlan_filter(port: int, added: Iterable[IPv4Address], removed: Iterable[IPv4Address], *,
                        netns: str | None = None) -> bool:
    """Add and remove sources, when the filter is known to be exactly as this process last
    left it (nothing committed to nftables here since): the cost of the change alone, whatever
    the number of peers. False when it is not known so: then call sync_vxlan_filter() with
    every source."""
    generation = ruleset_generation(netns)
    known = _vxlan_known.get(netns)
    if known is None or generation is None or known[:2] != (generation, port):
        return False
    have = known[2]
    add = {int(address) for address in added} - have
    remove = {int(address) for address in removed} & have
    if not add and not remove:
        return True
    return _write_elements(port, generation, have, add, remove, netns)


def _write_elements(port: int, generation: int, have: set[int], add: set[int] | frozenset[int],
                    remove: set[int] | frozenset[int], netns: str | None) -> bool:
    """Add and remove set elements of a table known to hold `have` at `generation`; whether the
    table is known afterwards (our commit was the only one: the generation moved by one)."""
    _vxlan_known.pop(netns, None)
    try:
        _nft(_element_changes(frozenset(remove), frozenset(add)), netns)
    except FirewallError:
        return False
    after = ruleset_generation(netns)
    if after != (generation + 1) & 0xFFFFFFFF:
        return False   # someone else committed too: what the table holds is read next time
    have -= remove
    have |= add
    _vxlan_known[netns] = (after, port, have)
    _advance_rules_verified(netns, generation, after)
    return True


def vxlan_filter_present(port: int, sources: Iterable[IPv4Address], *, netns: str | None = None) -> bool:
    """Whether the filter is in place for exactly these sources, as this process last wrote it."""
    actual = _read_vxlan_table(netns)
    return (actual is not None and actual[0][0] == port and actual[0] == _vxlan_applied.get(netns)
            and actual[1] == frozenset(map(int, sources)))


def vxlan_filter_sources(*, netns: str | None = None) -> frozenset[IPv4Address] | None:
    """The addresses VXLAN is accepted from now, or None when there is no filter."""
    actual = _read_vxlan_table(netns)
    return frozenset(map(IPv4Address, actual[1])) if actual is not None else None


def remove_vxlan_filter(*, netns: str | None = None) -> None:
    """Remove our table (accept VXLAN from anyone again); absent stays absent."""
    # `add table` first makes the delete succeed when it does not exist: one idempotent transaction.
    _nft([f"add table ip {VXLAN_TABLE}", f"delete table ip {VXLAN_TABLE}"], netns)
    _vxlan_applied.pop(netns, None)
    _vxlan_known.pop(netns, None)


def _vxlan_table(port: int, sources: frozenset[int]) -> list[str]:
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


def _element_changes(have: frozenset[int], wanted: frozenset[int]) -> list[str]:
    """nft lines that turn the set's elements (addresses as integers) from have into wanted."""
    lines = []
    for verb, addresses in (("delete", have - wanted), ("add", wanted - have)):
        ordered = sorted(addresses)
        for start in range(0, len(ordered), 1000):  # keep each line a reasonable size
            chunk = ", ".join(_inet_ntoa(address.to_bytes(4, "big")) for address in ordered[start:start + 1000])
            lines.append(f"{verb} element ip {VXLAN_TABLE} {VXLAN_SET} {{ {chunk} }}")
    return lines


def _read_vxlan_table(netns: str | None) -> tuple[tuple[int, str], frozenset[int]] | None:
    """((port, signature of set, chain and rule), set elements as integers), or None when the
    table is absent.

    One `list table` in nft's text form, stateless (no counter values; handles are not shown
    without -a): the signature is that text with the elements left out, so it changes exactly
    when someone changed what the filter does. Text rather than JSON: the same listing costs nft
    less to format and us less to parse, and the signature is only ever compared within this
    process, never across nft versions."""
    try:
        listed = _nft_read(f"list table ip {VXLAN_TABLE}", netns)
    except FirewallError as exc:
        if "No such file or directory" in str(exc):
            return None
        raise
    head, elements, tail = _split_elements(listed)
    try:
        # inet_aton: a fifth of the cost of IPv4Address() per element, which at 5000 peers is
        # as much as the kernel's dump itself.
        addresses = frozenset(_from_bytes(_inet_aton(element), "big") for element in elements)
    except OSError:
        addresses = frozenset()   # not plain addresses (ranges, counters): not ours, rewrite
        head += "unexpected elements\n"
    port = _DPORT.search(tail) or _DPORT.search(head)   # an empty set has no elements line: all is head
    return (int(port.group(1)) if port else 0, head + tail), addresses


_DPORT = re.compile(r"\budp dport (\d+) ")
_ELEMENTS = re.compile(r"^\t+elements = \{ ([^}]*)\}\n", re.MULTILINE)
_from_bytes = int.from_bytes
_inet_aton = socket.inet_aton
_inet_ntoa = socket.inet_ntoa


def _split_elements(listed: str) -> tuple[str, list[str], str]:
    """(text before our set's `elements = { ... }` line, the elements, text after it); nft wraps
    long element lists over several lines, with a comma and whitespace between elements."""
    start = listed.find(f"\n\tset {VXLAN_SET} {{\n")
    end = listed.find("\n\t}\n", start)   # the set's closing brace (the elements line's \n first)
    found = _ELEMENTS.search(listed, start, end + 1) if start >= 0 and end >= 0 else None
    if found is None:
        return listed, [], ""
    elements = found.group(1).replace(",", " ").split()
    return listed[:found.start()], elements, listed[found.end():]


def _nft(lines: list[str], netns: str | None) -> None:
    script = "\n".join(lines) + "\n"
    try:
        _nft_write(script, netns)
    except FirewallError as exc:
        shown = script if len(script) < 4000 else script[:4000] + "..."
        raise FirewallError(f"{exc}\n(if nftables is unavailable here, run with --no-vxlan-source-filter)"
                            f"\nnft script was:\n{shown}") from None


# ---------------------------------------------------------------------- talking to nftables
#
# In the caller's own namespace (netns None: the daemon, inside its host's namespace) through
# libnftables, in this process; in another namespace, or when the library cannot be loaded, by
# running the nft command. Both take the same script text and give the same listing text.


def _nft_read(command: str, netns: str | None) -> str:
    library = _library() if netns is None else None
    if library is not None:
        return library.run(command, _NFT_OUTPUT_STATELESS)
    return _run(["nft", "--stateless", *command.split()], netns)


def _nft_write(script: str, netns: str | None) -> None:
    library = _library() if netns is None else None
    if library is not None:
        library.run(script, 0)
    else:
        _run(["nft", "-f", "-"], netns, stdin=script)


# From <nftables/libnftables.h>; a stable ABI (libnftables.so.1).
_NFT_CTX_DEFAULT = 0
_NFT_OUTPUT_STATELESS = 1 << 2


class _Libnftables:
    """One libnftables context (nft_ctx) for the process, output and errors into buffers.

    A context holds a netlink socket and a ruleset cache and is not thread-safe, so every use
    holds the lock (the daemon calls from its one netlink thread; tests from others). ctypes
    drops the GIL around each call, so other threads run meanwhile. The socket lives in the
    namespace of the thread that made it, so the context is remade when the calling thread is in
    another namespace (setns) or in a forked child: netns None always means "where the caller is".
    """

    def __init__(self, library: ctypes.CDLL):
        self._lib = library
        self._lock = threading.Lock()
        self._ctx: int | None = None
        self._made_for: tuple[int, int] | None = None    # (pid, inode of the network namespace)

    @classmethod
    def load(cls) -> "_Libnftables":
        lib = ctypes.CDLL("libnftables.so.1", use_errno=True)
        lib.nft_ctx_new.argtypes = [ctypes.c_uint32]
        lib.nft_ctx_new.restype = ctypes.c_void_p
        lib.nft_ctx_free.argtypes = [ctypes.c_void_p]
        lib.nft_ctx_free.restype = None
        for name in ("nft_ctx_buffer_output", "nft_ctx_buffer_error"):
            getattr(lib, name).argtypes = [ctypes.c_void_p]
            getattr(lib, name).restype = ctypes.c_int
        lib.nft_ctx_output_set_flags.argtypes = [ctypes.c_void_p, ctypes.c_uint]
        lib.nft_ctx_output_set_flags.restype = None
        lib.nft_run_cmd_from_buffer.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
        lib.nft_run_cmd_from_buffer.restype = ctypes.c_int
        for name in ("nft_ctx_get_output_buffer", "nft_ctx_get_error_buffer"):
            getattr(lib, name).argtypes = [ctypes.c_void_p]
            getattr(lib, name).restype = ctypes.c_char_p   # copied into bytes, under the lock
        return cls(lib)

    def run(self, commands: str, output_flags: int) -> str:
        """Run nft commands (the syntax of `nft -f`); their output, or FirewallError with nft's
        own message."""
        where = (os.getpid(), os.stat("/proc/thread-self/ns/net").st_ino)
        with self._lock:
            if self._made_for != where:
                self._ctx = self._new_context(free_old=self._made_for is not None and
                                              self._made_for[0] == where[0])
                self._made_for = where
            lib, ctx = self._lib, self._ctx
            lib.nft_ctx_output_set_flags(ctx, output_flags)
            failed = lib.nft_run_cmd_from_buffer(ctx, commands.encode())
            # Reading a buffer also empties it for the next command: read both every time.
            output = lib.nft_ctx_get_output_buffer(ctx) or b""
            error = lib.nft_ctx_get_error_buffer(ctx) or b""
        if failed:
            raise FirewallError(f"nft failed: {error.decode(errors='replace').strip()}")
        return output.decode()

    def _new_context(self, free_old: bool) -> int:
        if free_old and self._ctx:
            self._lib.nft_ctx_free(self._ctx)   # a forked child's copy belongs to the parent
        ctx = self._lib.nft_ctx_new(_NFT_CTX_DEFAULT)
        if not ctx:
            raise FirewallError("libnftables: nft_ctx_new failed")
        if self._lib.nft_ctx_buffer_output(ctx) or self._lib.nft_ctx_buffer_error(ctx):
            self._lib.nft_ctx_free(ctx)
            raise FirewallError("libnftables: cannot buffer output")
        return ctx


_libnftables: _Libnftables | None = None
_libnftables_tried = False
_libnftables_lock = threading.Lock()


def _library() -> _Libnftables | None:
    """The process's libnftables, loaded on first use; None (logged once) when it cannot be."""
    global _libnftables, _libnftables_tried
    if not _libnftables_tried:
        with _libnftables_lock:
            if not _libnftables_tried:
                try:
                    _libnftables = _Libnftables.load()
                except (OSError, AttributeError) as exc:
                    log.warning("libnftables not usable (%s): running the nft command instead", exc)
                _libnftables_tried = True
    return _libnftables


# ---------------------------------------------------------------------- the ruleset generation
#
# nftables counts commits: every transaction that changes any table of a namespace (nft,
# libnftables, iptables-nft, firewalld, ...) moves that namespace's ruleset generation on by
# one, and NFT_MSG_GETGEN reads it in one small netlink round trip, without listing anything.
# So a check made at generation g still holds while the generation is g; and when our own
# commit moves it from g to g + 1, nobody else committed in between. Read in the caller's own
# namespace only (netns None, the daemon's case); for another namespace it is not known (None)
# and everything is read as before.

NETLINK_NETFILTER = 12
_NFNL_SUBSYS_NFTABLES = 10
_NFT_MSG_NEWGEN, _NFT_MSG_GETGEN = 15, 16
_NFTA_GEN_ID = 1
_generation_socket: tuple[tuple[int, int], socket.socket] | None = None
_generation_lock = threading.Lock()
_generation_sequence = 0


def ruleset_generation(netns: str | None = None) -> int | None:
    """The nftables ruleset generation of the caller's namespace; None when it cannot be read
    (or netns names another namespace)."""
    global _generation_socket, _generation_sequence
    if netns is not None:
        return None
    try:
        where = (os.getpid(), os.stat("/proc/thread-self/ns/net").st_ino)
        with _generation_lock:
            if _generation_socket is None or _generation_socket[0] != where:
                if _generation_socket is not None and _generation_socket[0][0] == where[0]:
                    _generation_socket[1].close()
                sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER)
                sock.settimeout(5.0)
                sock.bind((0, 0))
                _generation_socket = (where, sock)
            sock = _generation_socket[1]
            _generation_sequence = (_generation_sequence + 1) & 0xFFFFFFFF or 1
            sequence = _generation_sequence
            # nlmsghdr + nfgenmsg (family AF_UNSPEC, version NFNETLINK_V0, res_id 0)
            sock.send(NLMSGHDR.pack(NLMSGHDR.size + 4, (_NFNL_SUBSYS_NFTABLES << 8) | _NFT_MSG_GETGEN,
                                     1, sequence, 0) + bytes(4))   # NLM_F_REQUEST
            while True:
                data = sock.recv(65536)
                for offset, length, kind, _, reply_sequence in messages(data):
                    if reply_sequence != sequence:
                        continue
                    if kind != (_NFNL_SUBSYS_NFTABLES << 8) | _NFT_MSG_NEWGEN:
                        return None   # NLMSG_ERROR: refused
                    # after the nfgenmsg (4 bytes), big-endian NFTA_GEN_ID
                    gen_id = attributes(data[offset + NLMSGHDR.size:offset + length], 4).get(_NFTA_GEN_ID)
                    return struct.unpack("!I", gen_id)[0] if gen_id is not None and len(gen_id) == 4 else None
    except OSError as exc:
        with _generation_lock:
            if _generation_socket is not None:
                _generation_socket[1].close()
                _generation_socket = None
        log.debug("nftables generation not readable: %s", exc)
        return None


def _advance_rules_verified(netns: str | None, before: int, after: int) -> None:
    """Our own commit moved the generation from before to after (and touched only our table):
    a rules check valid at before is valid at after."""
    if _rules_verified.get(netns) == before:
        _rules_verified[netns] = after


_iptables_backend: dict[str, bool] = {}


def _iptables_on_nftables() -> bool:
    """Whether `iptables` is iptables-nft (its rules live in nftables, so commits to them move the
    ruleset generation); asked once per process (`iptables -V`: "... (nf_tables)")."""
    if "nft" not in _iptables_backend:
        try:
            version = subprocess.run(["iptables", "-V"], capture_output=True, text=True, timeout=_TIMEOUT).stdout
        except (OSError, subprocess.SubprocessError):
            version = ""
        _iptables_backend["nft"] = "(nf_tables)" in version
    return _iptables_backend["nft"]


# ---------------------------------------------------------------------- the rules


def _forward_rules(network: IPv4Network) -> list[str]:
    return [
        f'-s {network} -m comment --comment "overlay: forward from the overlay network" -j ACCEPT',
        f'-d {network} -m comment --comment "overlay: forward to the overlay network" -j ACCEPT',
    ]


def _masquerade_rules(network: IPv4Network, own_subnet: IPv4Network) -> list[str]:
    return [
        f'-s {network} -d {network} -m comment --comment "overlay: no NAT inside the overlay" -j RETURN',
        f'-s {network} ! -d 224.0.0.0/4 -m comment --comment "overlay: NAT traffic leaving the overlay"'
        " -j MASQUERADE --random-fully",
        f'! -s {network} -d {own_subnet} -m comment --comment "overlay: no NAT to this host\'s containers"'
        " -j RETURN",
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
