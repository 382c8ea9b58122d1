"""Podman as the container runtime of one lab host, with a configuration of its own.

Debian's podman 4.3 runs containers with the CNI backend here only with runc (shared FACTS).
Everything it keeps goes under one private directory, so the machine's own configuration and
storage are neither read nor changed:

- CONTAINERS_CONF names our containers.conf (podman then reads no other): runc, cgroupfs, events
  to a file, its temporary and static dirs under ours, the CNI backend with the lab host's conf
  dir as network_config_dir and its bin dir (then the reference plugins) as cni_plugin_dirs;
- CONTAINERS_STORAGE_CONF names our storage.conf: the vfs driver (no overlay mounts to leak),
  graphroot and runroot under ours;
- every command runs through `nsenter --net=<host namespace>`, so the CNI plugins run inside
  the lab host as on a real host (`ip netns exec` would remount /sys and runc then finds no
  cgroup mount).

Two places podman writes to whatever the configuration says: libcni's result cache
/var/lib/cni (emptied by DEL) and containers/image's blob-info cache /var/lib/containers/cache.
`close()` removes them when they did not exist before, along with every container, image and the
private directory; a network namespace podman made (`netns-*`) and left behind goes too.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

MACHINE_PATHS = (Path("/var/lib/cni"), Path("/var/lib/containers"))
BUSYBOX = Path("/bin/busybox")
IMAGE = "localhost/ovl-test/busybox:latest"


def missing_tools() -> list[str]:
    """What this machine lacks to run the podman tests, in words for a skip message."""
    missing = [tool for tool in ("podman", "runc", "nsenter", "conmon") if shutil.which(tool) is None
               and not (tool == "conmon" and Path("/usr/bin/conmon").exists())]
    if not BUSYBOX.exists():
        missing.append(f"{BUSYBOX} (Debian busybox-static)")
    else:
        try:
            ldd = subprocess.run(["ldd", str(BUSYBOX)], capture_output=True, text=True)
            report = ldd.stdout + ldd.stderr
        except OSError:
            report = ""
        if "not a dynamic executable" not in report:
            missing.append(f"a static {BUSYBOX} (Debian busybox-static; this one is dynamically linked)")
    return missing


def _netns_names() -> set[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    return {line.split()[0] for line in out.splitlines() if line.strip()}


class Podman:
    def __init__(self, root: Path, netns: str, conf_dir: Path, bin_dirs: list[Path]):
        self.root = root
        self.netns = netns
        self._machine_paths_before = {path for path in MACHINE_PATHS if path.exists()}
        self.netns_before = _netns_names()
        for sub in ("tmp", "storage", "runroot"):
            (root / sub).mkdir(parents=True, exist_ok=True)
        plugin_dirs = ", ".join(f'"{d}"' for d in [*bin_dirs, Path("/usr/lib/cni")])
        (root / "containers.conf").write_text(f"""\
[containers]
default_ulimits = ["nofile=20000:20000", "nproc=4096:4096"]

[engine]
runtime = "runc"
cgroup_manager = "cgroupfs"
events_logger = "file"
events_logfile_path = "{root}/events.log"
tmp_dir = "{root}/tmp"
static_dir = "{root}/storage/libpod"
volume_path = "{root}/storage/volumes"

[network]
network_backend = "cni"
network_config_dir = "{conf_dir}"
cni_plugin_dirs = [{plugin_dirs}]
""")
        (root / "storage.conf").write_text(f"""\
[storage]
driver = "vfs"
graphroot = "{root}/storage"
runroot = "{root}/runroot"
""")
        self.env = {"PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"),
                    "HOME": str(root), "CONTAINERS_CONF": str(root / "containers.conf"),
                    "CONTAINERS_STORAGE_CONF": str(root / "storage.conf")}

    def run(self, *args: str, check: bool = True, timeout: float = 60.0) -> subprocess.CompletedProcess:
        done = subprocess.run(["nsenter", f"--net=/run/netns/{self.netns}", "--", "podman", *args],
                              env=self.env, capture_output=True, text=True, timeout=timeout,
                              stdin=subprocess.DEVNULL)
        if check and done.returncode != 0:
            raise AssertionError(f"podman {' '.join(args)} failed ({done.returncode}): {done.stderr.strip()}")
        return done

    def import_busybox(self) -> str:
        """An image holding the static busybox and a link per applet (no registry is reachable)."""
        rootfs = self.root / "rootfs" / "bin"
        rootfs.mkdir(parents=True)
        shutil.copy2(BUSYBOX, rootfs / "busybox")
        applets = subprocess.run([str(BUSYBOX), "--list"], capture_output=True, text=True, check=True).stdout
        for applet in applets.split():
            if applet != "busybox":
                (rootfs / applet).symlink_to("busybox")
        tarball = self.root / "rootfs.tar"
        subprocess.run(["tar", "-C", str(self.root / "rootfs"), "-cf", str(tarball), "."], check=True)
        self.run("import", str(tarball), IMAGE)
        return IMAGE

    def _own_namespaces(self) -> set[str]:
        """The network namespaces of this podman's containers (its store is ours alone)."""
        ids = self.run("ps", "--all", "--quiet", check=False).stdout.split()
        if not ids:
            return set()
        keys = self.run("inspect", "--format", "{{.NetworkSettings.SandboxKey}}", *ids, check=False).stdout
        return {Path(key).name for key in keys.split() if key.startswith("/")}

    def close(self) -> None:
        own: set[str] = set()
        try:
            own = self._own_namespaces()
            self.run("rm", "--all", "--force", "--time", "0", check=False)
            self.run("rmi", "--all", "--force", check=False)
        finally:
            for line in Path("/proc/mounts").read_text().splitlines():
                mountpoint = line.split()[1]
                if mountpoint.startswith(str(self.root) + "/"):
                    subprocess.run(["umount", "-l", mountpoint], capture_output=True)
            # Only our containers' namespaces that podman left: another podman's are not ours.
            for name in own & (_netns_names() - self.netns_before):
                subprocess.run(["ip", "netns", "del", name], capture_output=True)
            for path in MACHINE_PATHS:
                if path not in self._machine_paths_before:
                    shutil.rmtree(path, ignore_errors=True)
            shutil.rmtree(self.root, ignore_errors=True)
