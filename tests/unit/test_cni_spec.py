"""Parsing of CNI invocations and the plugin client's answers without a service (no root)."""

import io
import json

import pytest

from cni import plugin, spec
from cni.allocator import AllocationStore, AttachmentKey, allocate, store_dir
from cni.errors import (DecodingFailure, IncompatibleVersion, InvalidEnvironment, InvalidNetworkConfig,
                        UnsupportedField, cni_code, CniFailure, PoolExhausted)
from ipaddress import IPv4Address, IPv4Network

ENV = {"CNI_COMMAND": "ADD", "CNI_CONTAINERID": "c0ffee", "CNI_NETNS": "/run/netns/x", "CNI_IFNAME": "eth0",
       "CNI_PATH": "/usr/lib/cni"}


def conf(version="1.1.0", **extra):
    return json.dumps({"cniVersion": version, "name": "net", "type": "overlay", **extra}).encode()


def env(**changes):
    result = dict(ENV)
    for key, value in changes.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = value
    return result


def test_valid_add_is_parsed_into_typed_fields():
    inv = spec.parse_invocation(env(CNI_ARGS="IgnoreUnknown=1;K8S_POD_NAME=web"), conf(runDir="/run/x", bridge="br9"))
    assert (inv.command, inv.version, inv.container_id, inv.netns, inv.ifname) == \
        ("ADD", "1.1.0", "c0ffee", "/run/netns/x", "eth0")
    assert inv.args == (("IgnoreUnknown", "1"), ("K8S_POD_NAME", "web"))
    assert inv.path == ("/usr/lib/cni",)
    assert (inv.name, inv.run_dir, inv.bridge, inv.socket_path) == ("net", "/run/x", "br9", "/run/x/cni.sock")
    with pytest.raises(AttributeError):
        inv.ifname = "eth1"


def test_defaults():
    inv = spec.parse_invocation(env(), conf())
    assert (inv.run_dir, inv.bridge) == (spec.DEFAULT_RUN_DIR, spec.DEFAULT_BRIDGE)


@pytest.mark.parametrize("stdin, error", [
    (b'{"cniVersion": "1.1.0", "name": ', DecodingFailure),
    (b'{"cniVersion": "1.1.0", "cniVersion": "1.0.0", "name": "n", "type": "t"}', DecodingFailure),
    (b'{"cniVersion": "1.1.0", "name": "n", "type": "t", "x": NaN}', DecodingFailure),
    (b'\xff\xfe', DecodingFailure),
    (b'{} trailing', DecodingFailure),
    (b'[1, 2]', InvalidNetworkConfig),
    (b'{"name": "n", "type": "t"}', InvalidNetworkConfig),
    (b'{"cniVersion": 1, "name": "n", "type": "t"}', InvalidNetworkConfig),
    (conf("0.2.0"), IncompatibleVersion),
    (conf("2.0.0"), IncompatibleVersion),
    (conf(ipam={"type": "host-local"}), UnsupportedField),
    (conf(mystery=1), UnsupportedField),
    (conf(dns={"nameservers": ["1.1.1.1"], "extra": 1}), UnsupportedField),
    (conf(runDir="relative"), InvalidNetworkConfig),
    (conf(bridge="a/b"), InvalidNetworkConfig),
    (conf(bridge="x" * 16), InvalidNetworkConfig),
    (conf(dns={"nameservers": "1.1.1.1"}), InvalidNetworkConfig),
    (conf(capabilities=[]), InvalidNetworkConfig),
    (conf(disableCheck="yes"), InvalidNetworkConfig),
    (json.dumps({"cniVersion": "1.1.0", "name": "-bad", "type": "t"}).encode(), InvalidNetworkConfig),
    (json.dumps({"cniVersion": "1.1.0", "type": "t"}).encode(), InvalidNetworkConfig),
    (json.dumps({"cniVersion": "1.1.0", "name": "n"}).encode(), InvalidNetworkConfig),
])
def test_bad_config(stdin, error):
    with pytest.raises(error):
        spec.parse_invocation(env(), stdin)


@pytest.mark.parametrize("changes", [
    {"CNI_COMMAND": None}, {"CNI_COMMAND": "ATTACH"}, {"CNI_CONTAINERID": None}, {"CNI_NETNS": None},
    {"CNI_IFNAME": None}, {"CNI_CONTAINERID": "-starts-with-dash"},
    {"CNI_CONTAINERID": "has space"}, {"CNI_IFNAME": "way-too-long-name"}, {"CNI_IFNAME": "a:b"},
    {"CNI_IFNAME": ".."}, {"CNI_NETNS": "relative/path"}, {"CNI_ARGS": "novalue"}, {"CNI_ARGS": "=v"},
])
def test_bad_environment(changes):
    with pytest.raises(InvalidEnvironment):
        spec.parse_invocation(env(**changes), conf())


def test_del_does_not_need_netns_and_gc_status_need_only_path():
    assert spec.parse_invocation(env(CNI_COMMAND="DEL", CNI_NETNS=None), conf()).netns == ""
    bare = {"CNI_COMMAND": "STATUS", "CNI_PATH": "/opt/cni/bin"}
    assert spec.parse_invocation(bare, conf()).command == "STATUS"
    gc = spec.parse_invocation(dict(bare, CNI_COMMAND="GC"),
                               conf(**{"cni.dev/valid-attachments": [{"containerID": "a", "ifname": "eth0"}]}))
    assert gc.valid_attachments == frozenset({("a", "eth0")})
    with pytest.raises(InvalidEnvironment):
        spec.parse_invocation({"CNI_COMMAND": "GC"}, conf(**{"cni.dev/valid-attachments": []}))


@pytest.mark.parametrize("command", ["ADD", "CHECK", "DEL", "STATUS"])
def test_cni_path_is_optional_but_for_gc(command):
    assert spec.parse_invocation(env(CNI_COMMAND=command, CNI_PATH=None), conf()).path == ()


@pytest.mark.parametrize("changes", [{"CNI_ARGS": "IP=10.244.3"},
                                     {"CNI_ARGS": "IP=fd00::7"}])
def test_a_del_is_not_refused_for_the_requested_address_that_made_its_add_fail(changes):
    with pytest.raises((InvalidEnvironment, InvalidNetworkConfig)):
        spec.parse_invocation(env(**changes), conf())
    deleting = spec.parse_invocation(env(CNI_COMMAND="DEL", **changes), conf())
    assert deleting.command == "DEL" and deleting.requested_ip is None


def test_gc_accepts_the_early_attachments_spelling_and_refuses_no_list():
    base = {"CNI_COMMAND": "GC", "CNI_PATH": "/x"}
    gc = spec.parse_invocation(base, conf(**{"cni.dev/attachments": [{"containerID": "b", "ifname": "net1"}]}))
    assert gc.valid_attachments == frozenset({("b", "net1")})
    with pytest.raises(InvalidNetworkConfig):
        spec.parse_invocation(base, conf())
    with pytest.raises(InvalidNetworkConfig):
        spec.parse_invocation(base, conf(**{"cni.dev/valid-attachments": [{"containerID": "b"}]}))


@pytest.mark.parametrize("command, version", [("CHECK", "0.3.1"), ("CHECK", "0.3.0"), ("GC", "1.0.0"),
                                              ("STATUS", "0.4.0")])
def test_commands_that_the_version_does_not_define(command, version):
    environ = env(CNI_COMMAND=command)
    with pytest.raises(IncompatibleVersion):
        spec.parse_invocation(environ, conf(version, **{"cni.dev/valid-attachments": []}))


def test_version_answer_never_fails():
    for stdin, expected in [(b'{"cniVersion": "0.4.0"}', "0.4.0"), (b'{"cniVersion": "9.9.9"}', "1.1.0"),
                            (b'', "1.1.0"), (b'garbage', "1.1.0")]:
        answer = json.loads(spec.version_answer(stdin))
        assert answer == {"cniVersion": expected, "supportedVersions": ["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"]}


def test_dumps_matches_json():
    value = {"a": [1, True, False, None, "é\"\n"], "b": {"c": -3}, "d": ()}
    assert json.loads(spec.dumps(value)) == json.loads(json.dumps(value))
    with pytest.raises(TypeError):
        spec.dumps({"x": 1.5})


def test_error_codes_map_once():
    assert [cni_code(e("x")) for e in (IncompatibleVersion, UnsupportedField, InvalidEnvironment, DecodingFailure,
                                       InvalidNetworkConfig, PoolExhausted)] == [1, 2, 4, 6, 7, 100]
    assert cni_code(RuntimeError("bug")) == 999
    assert cni_code(CniFailure("x")) == 999


# ---------------------------------------------------------------- the client without a service

def run(environ, stdin):
    out = io.StringIO()
    status = plugin.main(environ=environ, stdin=stdin, stdout=out)
    text = out.getvalue()
    return status, (json.loads(text) if text.strip() else None)


def test_plugin_version_is_local():
    status, answer = run({"CNI_COMMAND": "VERSION"}, b'{"cniVersion": "1.0.0"}')
    assert status == 0 and answer["supportedVersions"][-1] == "1.1.0"


@pytest.mark.parametrize("environ, stdin, code", [
    (env(), b"{not json", 6),
    (env(), conf("0.1.0"), 1),
    (env(CNI_IFNAME=None), conf(), 4),
    (env(), conf(bridge=7), 7),
    (env(), conf(ipam={}), 2),
])
def test_plugin_errors_are_spec_json(environ, stdin, code):
    status, error = run(environ, stdin)
    assert status != 0
    assert error["code"] == code and error["msg"] and error["cniVersion"] in spec.SUPPORTED_VERSIONS


def test_plugin_without_service(tmp_path):
    config = conf(runDir=str(tmp_path))
    assert run(env(), config)[1]["code"] == 11
    assert run(env(CNI_COMMAND="CHECK"), config)[1]["code"] == 11
    assert run({"CNI_COMMAND": "STATUS", "CNI_PATH": "/x"}, config)[1]["code"] == 50
    # DEL with nothing recorded succeeds: nothing of the attachment can exist
    assert run(env(CNI_COMMAND="DEL"), config) == (0, None)
    # ... but with an allocation recorded, it must be retried once the daemon is back
    store = AllocationStore(store_dir(tmp_path))
    with store.transaction() as txn:
        state, _, _ = allocate(txn.state, AttachmentKey("net", "c0ffee", "eth0"), IPv4Network("10.1.0.0/24"),
                               IPv4Address("10.1.0.1"), "ovlvx", "/run/netns/x")
        txn.commit(state)
    assert run(env(CNI_COMMAND="DEL"), config)[1]["code"] == 11
    assert run(env(CNI_COMMAND="DEL", CNI_CONTAINERID="other"), config) == (0, None)


# --- a requested address (the workload keeps its address) ------------------------------------

def test_requested_address_from_the_ips_capability_or_cni_args():
    assert spec.parse_invocation(env(), conf()).requested_ip is None
    assert spec.parse_invocation(env(), conf(runtimeConfig={"ips": ["10.244.3.7/24"]})).requested_ip == "10.244.3.7"
    assert spec.parse_invocation(env(), conf(runtimeConfig={"ips": ["10.244.3.7"]})).requested_ip == "10.244.3.7"
    assert spec.parse_invocation(env(CNI_ARGS="IgnoreUnknown=1;IP=10.244.3.8"), conf()).requested_ip == "10.244.3.8"
    both = spec.parse_invocation(env(CNI_ARGS="IP=10.244.3.7"), conf(runtimeConfig={"ips": ["10.244.3.7/24"]}))
    assert both.requested_ip == "10.244.3.7"


@pytest.mark.parametrize("runtime_ips, args, error, words", [
    (["10.244.3.7", "10.244.3.8"], "", InvalidNetworkConfig, "exactly one"),
    (["fd00::1/64"], "", InvalidNetworkConfig, "IPv6"),
    (["10.244.3.07"], "", InvalidNetworkConfig, "not an IPv4 address"),
    (["10.244.3.7/33"], "", InvalidNetworkConfig, "not an IPv4 address"),
    ("10.244.3.7", "", InvalidNetworkConfig, "array of strings"),
    (None, "IP=10.244.3", InvalidEnvironment, "not an IPv4 address"),
    (None, "IP=256.1.1.1", InvalidEnvironment, "not an IPv4 address"),
    (["10.244.3.7"], "IP=10.244.3.9", InvalidNetworkConfig, "disagree"),
])
def test_bad_requested_address(runtime_ips, args, error, words):
    config = conf(runtimeConfig={"ips": runtime_ips}) if runtime_ips is not None else conf()
    with pytest.raises(error, match=words):
        spec.parse_invocation(env(CNI_ARGS=args), config)


def test_dotted_quad_agrees_with_ipaddress():
    from ipaddress import IPv4Address
    for text in ["0.0.0.0", "10.244.3.7", "255.255.255.255", "1.2.3", "1.2.3.4.5", "01.2.3.4", "1.2.3.256",
                 "a.b.c.d", "1..3.4", " 1.2.3.4", "١.2.3.4"]:
        try:
            IPv4Address(text)
            valid = True
        except ValueError:
            valid = False
        assert spec.is_dotted_quad(text) == valid, text
