"""Strict parsing of a CNI invocation (environment + network config on stdin), shared by the
plugin executable and the service.

Design note
-----------
The plugin runs once per container while the runtime waits, under `python -I -S`. Importing
`json` costs about 7 ms here (it pulls in `re`, `enum`, `functools`), as much as a whole ADD by
the reference Go plugins. So this module imports only C accelerator modules that load in well
under a millisecond: `_json` for its scanner and string encoder. It reads JSON with
`_json.make_scanner` (the same C scanner `json.loads` uses) and writes the little JSON it
produces with `dumps` below. Values are plain immutable classes rather than dataclasses for the
same reason (`dataclasses` costs 14 ms to import).

Both sides run the same `parse_invocation`: the plugin so that every input error is answered
locally with the right code, even while the daemon is down; the service because it must never
trust its socket peer's parsing.

A requested address (the workload keeps its address: see overlay.moves) comes from the `ips`
capability (`runtimeConfig.ips`, a list of "A.B.C.D" or "A.B.C.D/len" strings; a conflist must
declare `"capabilities": {"ips": true}` for a runtime to send it) or from CNI_ARGS `IP=`, the
convention of the reference host-local IPAM. One IPv4 address per attachment; both sources may
be given only if they agree. Only its form is checked here (without `ipaddress`, ~3 ms to
import); the service decides whether the address is usable.

Order of checks, so that each failure gets the code the spec gives it:
CNI_COMMAND (4) -> stdin decodes (6) -> cniVersion present (7) and supported (1) ->
environment for the command (4) -> config fields (7, or 2 for a field we do not know) ->
command exists in that version (1).
"""

import _json

from cni.errors import (DecodingFailure, IncompatibleVersion, InvalidEnvironment, InvalidNetworkConfig,
                        UnsupportedField)

SUPPORTED_VERSIONS = ("0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0")
LATEST_VERSION = "1.1.0"
COMMANDS = ("ADD", "DEL", "CHECK", "GC", "STATUS", "VERSION")
# CHECK arrived with 0.4.0, GC and STATUS with 1.1.0; libcni never sends them to older configs.
_MIN_VERSION = {"CHECK": "0.4.0", "GC": "1.1.0", "STATUS": "1.1.0"}
# Environment each command requires (CNI 1.1.0, section 2): DEL tolerates a missing CNI_NETNS,
# and CNI_PATH is optional for all but GC (we run no delegate plugins).
_REQUIRED_ENV = {
    "ADD": ("CNI_CONTAINERID", "CNI_NETNS", "CNI_IFNAME"),
    "CHECK": ("CNI_CONTAINERID", "CNI_NETNS", "CNI_IFNAME"),
    "DEL": ("CNI_CONTAINERID", "CNI_IFNAME"),
    "GC": ("CNI_PATH",),
    "STATUS": (),
}

DEFAULT_RUN_DIR = "/run/overlay"
DEFAULT_BRIDGE = "ovl-cni0"
SOCKET_NAME = "cni.sock"
MAX_CONFIG_BYTES = 1 << 20

# Fields of a plugin's config that the spec or libcni define, plus our own (runDir, bridge).
# Anything else is refused with code 2 rather than silently ignored.
_KNOWN_FIELDS = frozenset((
    "cniVersion", "name", "type", "args", "dns", "capabilities", "runtimeConfig", "prevResult",
    "cni.dev/valid-attachments", "cni.dev/attachments", "disableCheck", "disableGC",
    "runDir", "bridge",
))
_DNS_LIST_FIELDS = ("nameservers", "search", "options")


def version_tuple(version: str) -> tuple:
    return tuple(int(part) for part in version.split("."))


# --------------------------------------------------------------------------- JSON, C-speed

class _ScannerContext:
    """What `_json.make_scanner` reads from a JSONDecoder; NaN and Infinity are refused."""
    strict = True
    object_hook = None
    object_pairs_hook = None
    parse_float = float
    parse_int = int
    memo = None

    @staticmethod
    def parse_constant(name):
        raise ValueError(f"{name} is not valid JSON")


def _strict_pairs(pairs):
    """Duplicate keys are ambiguous (which one wins differs between parsers): refuse them."""
    result = {}
    for key, value in pairs:
        if key in result:
            raise ValueError(f"duplicate key {key!r}")
        result[key] = value
    return result


_ScannerContext.object_pairs_hook = staticmethod(_strict_pairs)
_scan = _json.make_scanner(_ScannerContext())
_WHITESPACE = " \t\n\r"


def loads(data) -> object:
    """Decode one JSON document from bytes or str; DecodingFailure names where it went wrong."""
    if isinstance(data, (bytes, bytearray)):
        try:
            data = data.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise DecodingFailure(f"stdin is not UTF-8: {exc}") from None
    text = data.strip(_WHITESPACE)
    try:
        value, end = _scan(text, 0)
    except ValueError as exc:
        if "duplicate key" in str(exc) or "not valid JSON" in str(exc):
            raise DecodingFailure(f"invalid JSON: {exc}") from None
        value, end = None, -1
    except Exception:   # StopIteration, or the C scanner failing to build its error lazily
        value, end = None, -1
    if end != len(text):
        raise DecodingFailure(f"invalid JSON: {_explain_json_error(text)}")
    return value


def _explain_json_error(text: str) -> str:
    """Only on the error path: let the full json module say where the document breaks."""
    import json
    try:
        json.loads(text)
    except ValueError as exc:
        return str(exc)
    return "trailing data"


_encode_string = _json.encode_basestring_ascii


def dumps(value) -> str:
    """Compact JSON for the plain values we emit (dict, list, tuple, str, int, bool, None)."""
    if isinstance(value, str):
        return _encode_string(value)
    if value is None:
        return "null"
    if value is True:
        return "true"
    if value is False:
        return "false"
    if isinstance(value, int):
        return str(int(value))
    if isinstance(value, dict):
        return "{" + ",".join(_encode_string(str(k)) + ":" + dumps(v) for k, v in value.items()) + "}"
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(dumps(v) for v in value) + "]"
    raise TypeError(f"cannot encode {type(value).__name__} as JSON")


# --------------------------------------------------------------------------- values

class _Value:
    """An immutable record with named fields (a dataclass without the import cost)."""
    __slots__ = ()

    def __init__(self, **fields):
        for name in self.__slots__:
            object.__setattr__(self, name, fields.pop(name))
        if fields:
            raise TypeError(f"unexpected fields {sorted(fields)}")

    def __setattr__(self, name, value):
        raise AttributeError(f"{type(self).__name__} is immutable")

    def __eq__(self, other):
        return type(self) is type(other) and all(getattr(self, n) == getattr(other, n) for n in self.__slots__)

    def __hash__(self):
        return hash(tuple(repr(getattr(self, n)) for n in self.__slots__))

    def __repr__(self):
        inner = ", ".join(f"{n}={getattr(self, n)!r}" for n in self.__slots__)
        return f"{type(self).__name__}({inner})"


class Invocation(_Value):
    """One validated call of the plugin: what the runtime asked, in typed form."""
    __slots__ = ("command", "version", "container_id", "netns", "ifname", "args", "path",
                 "name", "type", "run_dir", "bridge", "dns", "prev_result", "valid_attachments",
                 "requested_ip")

    @property
    def socket_path(self) -> str:
        return self.run_dir.rstrip("/") + "/" + SOCKET_NAME


# --------------------------------------------------------------------------- validation

_ID_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_.-")


def is_valid_container_id(value: str) -> bool:
    """^[A-Za-z0-9][A-Za-z0-9_.-]*$ (the spec's rule), written without `re` to keep start-up low."""
    return bool(value) and value[0].isascii() and value[0].isalnum() and _ID_CHARS.issuperset(value)


def is_valid_ifname(value: str) -> bool:
    """Linux's rules: 1..15 bytes, not '.' or '..', no '/', ':' or whitespace."""
    if not value or value in (".", "..") or len(value.encode()) > 15:
        return False
    return not any(ch in "/:" or ch.isspace() or ch == "\0" for ch in value)


def version_for_errors(stdin) -> str:
    """The cniVersion to put in an error object: the config's, if we can read and support it."""
    try:
        config = loads(stdin)
    except DecodingFailure:
        return LATEST_VERSION
    version = config.get("cniVersion") if isinstance(config, dict) else None
    return version if version in SUPPORTED_VERSIONS else LATEST_VERSION


def parse_command(environ) -> str:
    command = environ.get("CNI_COMMAND")
    if not command:
        raise InvalidEnvironment("CNI_COMMAND is not set")
    if command not in COMMANDS:
        raise InvalidEnvironment(f"CNI_COMMAND={command!r} is not one of {', '.join(COMMANDS)}")
    return command


def version_answer(stdin) -> str:
    """VERSION's output. It never fails: a runtime asks it precisely to learn what we speak."""
    try:
        config = loads(stdin) if stdin and stdin.strip() else {}
    except DecodingFailure:
        config = {}
    asked = config.get("cniVersion") if isinstance(config, dict) else None
    version = asked if asked in SUPPORTED_VERSIONS else LATEST_VERSION
    return dumps({"cniVersion": version, "supportedVersions": list(SUPPORTED_VERSIONS)})


def parse_invocation(environ, stdin) -> Invocation:
    """Validate everything a non-VERSION call brings; raises the matching CniFailure."""
    command = parse_command(environ)
    if command == "VERSION":
        raise InvalidEnvironment("VERSION is answered by version_answer, not parsed as an invocation")
    if len(stdin) > MAX_CONFIG_BYTES:
        raise InvalidNetworkConfig(f"network config is larger than {MAX_CONFIG_BYTES} bytes")
    config = loads(stdin)
    if not isinstance(config, dict):
        raise InvalidNetworkConfig("network config must be a JSON object")
    version = _parse_version(config)
    env = _parse_environment(environ, command)
    fields = _parse_config(config, command)
    minimum = _MIN_VERSION.get(command)
    if minimum and version_tuple(version) < version_tuple(minimum):
        raise IncompatibleVersion(f"{command} needs cniVersion {minimum} or later, the config says {version}")
    # Only ADD uses it; a DEL must not fail on what made the ADD fail (the runtime cleans up
    # after a failed ADD with a DEL of the same config and arguments).
    requested = _requested_ip(config, env["args"]) if command == "ADD" else None
    return Invocation(command=command, version=version, requested_ip=requested, **env, **fields)


def is_dotted_quad(text: str) -> bool:
    """A.B.C.D with each part 0..255 and no leading zeros (what `ipaddress` accepts)."""
    parts = text.split(".")
    return len(parts) == 4 and all(
        part.isascii() and part.isdigit() and len(part) <= 3 and int(part) <= 255 and (part == "0" or part[0] != "0")
        for part in parts)


def _requested_ip(config: dict, args: tuple):
    """The one address the runtime asks for, as "A.B.C.D", or None."""
    wanted = []
    runtime = config.get("runtimeConfig") or {}
    ips = runtime.get("ips")
    if ips is not None:
        if not isinstance(ips, list) or not all(isinstance(item, str) for item in ips):
            raise InvalidNetworkConfig("runtimeConfig.ips must be an array of strings")
        for item in ips:
            address, _, length = item.partition("/")
            if ":" in item:
                raise InvalidNetworkConfig(f"runtimeConfig.ips: {item!r} is IPv6; this network is IPv4 only")
            if not is_dotted_quad(address) or (length and not (length.isdigit() and int(length) <= 32)):
                raise InvalidNetworkConfig(f"runtimeConfig.ips: {item!r} is not an IPv4 address")
            wanted.append(address)
        if len(wanted) > 1:
            raise InvalidNetworkConfig(f"runtimeConfig.ips asks for {len(wanted)} addresses; "
                                       "an attachment has exactly one")
    for key, value in args:
        if key == "IP":
            address = value.partition("/")[0]
            if not is_dotted_quad(address):
                raise InvalidEnvironment(f"CNI_ARGS IP={value!r} is not an IPv4 address")
            if wanted and wanted[0] != address:
                raise InvalidNetworkConfig(f"CNI_ARGS IP={value} and runtimeConfig.ips {wanted[0]} disagree")
            wanted = [address]
    return wanted[0] if wanted else None


def _parse_version(config: dict) -> str:
    version = config.get("cniVersion")
    if version is None:
        raise InvalidNetworkConfig("cniVersion is missing from the network config")
    if not isinstance(version, str):
        raise InvalidNetworkConfig(f"cniVersion must be a string, not {_json_type(version)}")
    if version not in SUPPORTED_VERSIONS:
        raise IncompatibleVersion(f"cniVersion {version!r} is not supported; this plugin supports "
                                  f"{', '.join(SUPPORTED_VERSIONS)}")
    return version


def _parse_environment(environ, command: str) -> dict:
    for name in _REQUIRED_ENV[command]:
        if not environ.get(name):
            raise InvalidEnvironment(f"{name} is required for {command} but is not set")
    container_id = environ.get("CNI_CONTAINERID", "")
    if container_id and not is_valid_container_id(container_id):
        raise InvalidEnvironment(f"CNI_CONTAINERID={container_id!r} must match ^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    ifname = environ.get("CNI_IFNAME", "")
    if ifname and not is_valid_ifname(ifname):
        raise InvalidEnvironment(f"CNI_IFNAME={ifname!r} is not a valid interface name "
                                 "(1-15 bytes, not '.' or '..', no '/', ':' or whitespace)")
    netns = environ.get("CNI_NETNS", "")
    if netns and not netns.startswith("/"):
        raise InvalidEnvironment(f"CNI_NETNS={netns!r} must be an absolute path")
    return {
        "container_id": container_id,
        "netns": netns,
        "ifname": ifname,
        "args": _parse_args(environ.get("CNI_ARGS", "")),
        "path": tuple(p for p in environ.get("CNI_PATH", "").split(":") if p),
    }


def _parse_args(text: str) -> tuple:
    """CNI_ARGS is K=V;K2=V2. We use `IP` (a requested address); the rest (K8S_POD_NAME and
    friends, IgnoreUnknown=1) are only checked for form."""
    pairs = []
    for item in text.split(";"):
        if not item:
            continue
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise InvalidEnvironment(f"CNI_ARGS item {item!r} is not KEY=VALUE")
        pairs.append((key, value))
    return tuple(pairs)


def _json_type(value) -> str:
    names = {dict: "an object", list: "an array", str: "a string", bool: "a boolean",
             int: "a number", float: "a number", type(None): "null"}
    return names.get(type(value), type(value).__name__)


def _expect(config: dict, field: str, kind, what: str):
    value = config.get(field)
    if value is not None and (not isinstance(value, kind) or (kind is not bool and isinstance(value, bool))):
        raise InvalidNetworkConfig(f"{field} must be {what}, not {_json_type(value)}")
    return value


def _parse_config(config: dict, command: str) -> dict:
    if "ipam" in config:
        raise UnsupportedField("ipam: this plugin allocates addresses from the host's subnet itself; "
                               "remove the ipam section")
    unknown = sorted(set(config) - _KNOWN_FIELDS)
    if unknown:
        raise UnsupportedField(f"unsupported field {unknown[0]!r} in the network config")
    name = _expect(config, "name", str, "a string")
    if not name or not is_valid_container_id(name):
        raise InvalidNetworkConfig("name is required and must match ^[a-zA-Z0-9][a-zA-Z0-9_.-]*$")
    plugin_type = _expect(config, "type", str, "a string")
    if not plugin_type:
        raise InvalidNetworkConfig("type is required")
    run_dir = _expect(config, "runDir", str, "a string")
    if run_dir is None:
        run_dir = DEFAULT_RUN_DIR
    if not run_dir.startswith("/") or "\0" in run_dir:
        raise InvalidNetworkConfig(f"runDir must be an absolute path, not {run_dir!r}")
    bridge = _expect(config, "bridge", str, "a string")
    if bridge is None:
        bridge = DEFAULT_BRIDGE
    if not is_valid_ifname(bridge):
        raise InvalidNetworkConfig(f"bridge {bridge!r} is not a valid interface name")
    for field in ("args", "capabilities", "runtimeConfig", "prevResult"):
        _expect(config, field, dict, "an object")
    for field in ("disableCheck", "disableGC"):
        _expect(config, field, bool, "a boolean")
    return {
        "name": name,
        "type": plugin_type,
        "run_dir": run_dir,
        "bridge": bridge,
        "dns": _parse_dns(config.get("dns")),
        "prev_result": config.get("prevResult"),
        "valid_attachments": _parse_attachments(config, command),
    }


def _parse_dns(dns):
    if dns is None:
        return None
    if not isinstance(dns, dict):
        raise InvalidNetworkConfig(f"dns must be an object, not {_json_type(dns)}")
    unknown = sorted(set(dns) - {"nameservers", "domain", "search", "options"})
    if unknown:
        raise UnsupportedField(f"unsupported field 'dns.{unknown[0]}'")
    if "domain" in dns and not isinstance(dns["domain"], str):
        raise InvalidNetworkConfig("dns.domain must be a string")
    for field in _DNS_LIST_FIELDS:
        value = dns.get(field)
        if value is not None and not (isinstance(value, list) and all(isinstance(v, str) for v in value)):
            raise InvalidNetworkConfig(f"dns.{field} must be an array of strings")
    return dns


def _parse_attachments(config: dict, command: str):
    """GC's list of attachments to keep. libcni sends the spec's `cni.dev/valid-attachments` and,
    for an early spelling, `cni.dev/attachments` with the same value: accept either."""
    field = "cni.dev/valid-attachments" if "cni.dev/valid-attachments" in config else "cni.dev/attachments"
    raw = config.get(field)
    if raw is None:
        if command == "GC":
            # Without the list, GC would release every attachment: refuse instead of guessing.
            raise InvalidNetworkConfig("GC needs cni.dev/valid-attachments")
        return None
    if not isinstance(raw, list):
        raise InvalidNetworkConfig(f"{field} must be an array")
    keep = set()
    for index, item in enumerate(raw):
        if not isinstance(item, dict):
            raise InvalidNetworkConfig(f"{field}[{index}] must be an object")
        container_id, ifname = item.get("containerID"), item.get("ifname")
        if not isinstance(container_id, str) or not is_valid_container_id(container_id):
            raise InvalidNetworkConfig(f"{field}[{index}].containerID is missing or malformed")
        if not isinstance(ifname, str) or not is_valid_ifname(ifname):
            raise InvalidNetworkConfig(f"{field}[{index}].ifname is missing or malformed")
        keep.add((container_id, ifname))
    return frozenset(keep)


def error_json(version: str, code: int, msg: str, details: str = "") -> str:
    error = {"cniVersion": version, "code": code, "msg": msg}
    if details:
        error["details"] = details
    return dumps(error)
