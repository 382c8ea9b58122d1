"""Run a CNI conflist the way a runtime (libcni) does: for the lab, tests and benchmarks.

Not used by the plugin. It does what libcni does with a network configuration list, so our plugin
is exercised exactly as podman or containerd exercise it:

- each plugin's config gets the list's `name` and `cniVersion` injected;
- `runtimeConfig` carries only the capabilities a plugin declares (e.g. portMappings);
- ADD runs the plugins in order, each later one getting the previous result as `prevResult`, and
  the last result is the attachment's result; CHECK and DEL pass that final result to every
  plugin, DEL in reverse order;
- plugins run in the runtime's network namespace, which is the host's: `host_netns` names a
  namespace file to run them in (through nsenter, which, unlike `ip netns exec`, leaves /sys
  alone), as a lab host's runtime would; chained plugins such as portmap program the namespace
  they run in, so this must be the host's, never the caller's by accident;
- a plugin is exec'd from the bin dirs with CNI_COMMAND, CNI_CONTAINERID, CNI_NETNS, CNI_IFNAME,
  CNI_ARGS and CNI_PATH set, the config on stdin; a non-zero exit raises `PluginFailed` carrying
  the spec error object.
"""

from __future__ import annotations

import json
import os
import subprocess
from dataclasses import dataclass, field
from pathlib import Path


class PluginFailed(Exception):
    def __init__(self, plugin: str, command: str, error: dict):
        super().__init__(f"{plugin} {command} failed with code {error.get('code')}: {error.get('msg')}")
        self.plugin = plugin
        self.command = command
        self.error = error

    @property
    def code(self) -> int | None:
        return self.error.get("code")


@dataclass(frozen=True)
class Attachment:
    container_id: str
    netns: str
    ifname: str = "eth0"
    args: str = ""


@dataclass
class ConfList:
    conf: dict
    bin_dirs: tuple[str, ...]
    timeout_s: float = 60.0
    runtime_config: dict = field(default_factory=dict)
    host_netns: str | None = None

    @classmethod
    def load(cls, path, bin_dirs, host_netns: str | None = None) -> "ConfList":
        return cls(json.loads(Path(path).read_text()), tuple(str(d) for d in bin_dirs), host_netns=host_netns)

    @property
    def version(self) -> str:
        return self.conf["cniVersion"]

    def _plugin_conf(self, plugin: dict, prev_result: dict | None) -> dict:
        conf = {**plugin, "name": self.conf["name"], "cniVersion": self.version}
        capabilities = plugin.get("capabilities") or {}
        wanted = {k: v for k, v in self.runtime_config.items() if capabilities.get(k)}
        if wanted:
            conf["runtimeConfig"] = wanted
        if prev_result is not None:
            conf["prevResult"] = prev_result
        return conf

    def _exec(self, plugin_type: str, command: str, conf: dict, attachment: Attachment | None) -> dict | None:
        executable = next((Path(d) / plugin_type for d in self.bin_dirs
                           if os.access(Path(d) / plugin_type, os.X_OK)), None)
        if executable is None:
            raise FileNotFoundError(f"CNI plugin {plugin_type!r} not found in {':'.join(self.bin_dirs)}")
        env = {"CNI_COMMAND": command, "CNI_PATH": ":".join(self.bin_dirs),
               "PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")}
        if attachment is not None:
            env.update(CNI_CONTAINERID=attachment.container_id, CNI_NETNS=attachment.netns,
                       CNI_IFNAME=attachment.ifname, CNI_ARGS=attachment.args)
        argv = [str(executable)]
        if self.host_netns:
            argv = ["nsenter", f"--net={self.host_netns}", "--"] + argv
        done = subprocess.run(argv, input=json.dumps(conf).encode(), env=env, capture_output=True,
                              timeout=self.timeout_s)
        out = done.stdout.decode().strip()
        if done.returncode != 0:
            try:
                error = json.loads(out)
            except ValueError:
                error = {"code": None, "msg": out or done.stderr.decode().strip()}
            raise PluginFailed(plugin_type, command, error)
        return json.loads(out) if out else None

    def add(self, attachment: Attachment) -> dict:
        result = None
        for plugin in self.conf["plugins"]:
            result = self._exec(plugin["type"], "ADD", self._plugin_conf(plugin, result), attachment)
        return result

    def check(self, attachment: Attachment, result: dict) -> None:
        for plugin in self.conf["plugins"]:
            self._exec(plugin["type"], "CHECK", self._plugin_conf(plugin, result), attachment)

    def delete(self, attachment: Attachment, result: dict | None = None) -> None:
        for plugin in reversed(self.conf["plugins"]):
            self._exec(plugin["type"], "DEL", self._plugin_conf(plugin, result), attachment)
