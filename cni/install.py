"""`overlayctl install-cni`: put the `overlay` plugin executable and a conflist where a runtime looks.

The executable is a short launcher, not a copy of the client:

    #!<this venv's python> -IS
    import sys
    sys.path.insert(0, "<directory holding the cni package>")
    from cni.plugin import main
    status = main(socket_hint="<run dir>/cni.sock")
    import posix
    posix._exit(status)

- An absolute interpreter path, because a `python3` found through PATH may be a pyenv shim
  (80 ms) and a runtime's PATH is not ours to trust. `-IS` as one word: the kernel passes at most
  one argument from a shebang line. `-I` ignores PYTHON* variables and the user's site; `-S`
  skips `site` (the venv's site-packages are not needed: the client is stdlib-only).
- Importing `cni.plugin` rather than copying its text keeps one source of truth, and lets Python
  use the cached bytecode; a copied script would be recompiled on every call.
- `socket_hint`: the service socket of the run dir this launcher is installed for, which the
  conflist written next to it names, so the client forwards without reading the config (see
  cni.plugin; a config naming another runDir is still served by that run dir's service).
- `posix._exit` once main() has returned skips the interpreter's finalization (tearing down
  modules, a last garbage collection): 0.9 ms of the 7 ms of CPU a call costs here, and a runtime
  starting many containers pays it for each. main() has flushed stdout and closed its socket by
  then, and the process holds nothing else; an exception from main() still takes the normal
  exit, traceback and all.

The conflist declares `cniVersion` 1.0.0, the newest version libcni 1.1 (podman 4.3) and the
reference plugins understand, and `cniVersions` [1.0.0, 1.1.0] so a runtime with CNI 1.1 support
picks 1.1.0 and gets GC and STATUS. Both files are written atomically (temporary file, rename),
so a runtime running the plugin during an install sees the old file or the new, never half.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import click

from cni import spec
from cni.allocator import write_all

PLUGIN_TYPE = "overlay"
CONF_FILE_NAME = "10-overlay.conflist"


def launcher_text(interpreter: str, package_root: str, run_dir: str | None = None) -> str:
    if any(ch.isspace() for ch in interpreter):
        # A shebang line splits on nothing and cannot quote: such a path would not run.
        raise click.ClickException(f"the interpreter path {interpreter!r} contains whitespace; "
                                   "a shebang line cannot hold it")
    hint = run_dir.rstrip("/") + "/" + spec.SOCKET_NAME if run_dir else None
    return (f"#!{interpreter} -IS\n"
            "import sys\n"
            f"sys.path.insert(0, {package_root!r})\n"
            "from cni.plugin import main\n"
            f"status = main(socket_hint={hint!r})\n"
            "import posix\n"
            "posix._exit(status)\n")


def conflist(network_name: str, run_dir: str, bridge: str, portmap: bool) -> dict:
    # The `ips` capability: a runtime that wants a container to keep its address (a migrated
    # workload) passes it in runtimeConfig.ips, which libcni sends only to plugins declaring it.
    plugin = {"type": PLUGIN_TYPE, "runDir": run_dir, "bridge": bridge, "capabilities": {"ips": True}}
    plugins = [plugin]
    if portmap:
        plugins.append({"type": "portmap", "capabilities": {"portMappings": True}, "snat": True})
    # A runtime picks the highest of cniVersions it supports and sends it to every plugin of the
    # list; the reference portmap here stops at 1.0.0, so with it 1.1.0 must not be offered.
    versions = ["1.0.0"] if portmap else ["1.0.0", "1.1.0"]
    return {"cniVersion": "1.0.0", "cniVersions": versions, "name": network_name, "plugins": plugins}


def _write_atomically(path: Path, text: str, mode: int) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        write_all(fd, text.encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    os.chmod(tmp, mode)     # the umask may have narrowed it
    os.replace(tmp, path)


def install(bin_dir: Path, conf_dir: Path, run_dir: str, network_name: str = "overlay",
            bridge: str = spec.DEFAULT_BRIDGE, portmap: bool = False,
            interpreter: str | None = None) -> tuple[Path, Path]:
    """Write the plugin executable and the conflist; returns their paths."""
    interpreter = interpreter or sys.executable
    package_root = str(Path(__file__).resolve().parent.parent)
    bin_dir.mkdir(parents=True, exist_ok=True)
    conf_dir.mkdir(parents=True, exist_ok=True)
    executable = bin_dir / PLUGIN_TYPE
    _write_atomically(executable, launcher_text(interpreter, package_root, run_dir), 0o755)
    conf = conf_dir / CONF_FILE_NAME
    _write_atomically(conf, json.dumps(conflist(network_name, run_dir, bridge, portmap), indent=2) + "\n", 0o644)
    return executable, conf


@click.command("install-cni")
@click.option("--bin-dir", type=click.Path(file_okay=False, path_type=Path), default="/opt/cni/bin",
              show_default=True, help="where the runtime looks for plugin executables")
@click.option("--conf-dir", type=click.Path(file_okay=False, path_type=Path), default="/etc/cni/net.d",
              show_default=True, help="where the runtime looks for network configs")
@click.option("--run-dir", default=spec.DEFAULT_RUN_DIR, show_default=True,
              help="this host's overlayd run dir (subnet.env, cni.sock)")
@click.option("--network-name", default="overlay", show_default=True)
@click.option("--bridge", default=spec.DEFAULT_BRIDGE, show_default=True)
@click.option("--portmap/--no-portmap", default=False, help="chain the reference portmap plugin")
def install_cni_command(bin_dir, conf_dir, run_dir, network_name, bridge, portmap):
    """Install the `overlay` CNI plugin and its conflist."""
    if not run_dir.startswith("/"):
        raise click.BadParameter("must be an absolute path", param_hint="--run-dir")
    if not spec.is_valid_container_id(network_name):
        raise click.BadParameter("must match ^[a-zA-Z0-9][a-zA-Z0-9_.-]*$", param_hint="--network-name")
    if not spec.is_valid_ifname(bridge):
        raise click.BadParameter("not a valid interface name", param_hint="--bridge")
    executable, conf = install(bin_dir, conf_dir, run_dir, network_name, bridge, portmap)
    click.echo(f"installed {executable} and {conf}")
