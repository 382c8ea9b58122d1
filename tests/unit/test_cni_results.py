"""Result shapes per CNI version, prevResult checks, host veth names, the installer (no root)."""

import json
import os
import subprocess
from ipaddress import IPv4Address, IPv4Interface

import pytest

from cni.errors import AttachmentDrift
from cni.install import install, launcher_text
from cni.results import Attachment, add_result, expected_in_prev_result

ATTACHMENT = Attachment(host_ifname="ovlv0123456789a", host_mac="aa:bb:cc:dd:ee:ff", ifname="eth0",
                        mac="0a:58:0a:f4:03:05", sandbox="/run/netns/c1", mtu=1450,
                        address=IPv4Interface("10.244.3.5/24"), gateway=IPv4Address("10.244.3.1"))


@pytest.mark.parametrize("version", ["0.3.0", "0.3.1", "0.4.0"])
def test_pre_1_0_results_carry_ip_version(version):
    result = add_result(version, ATTACHMENT, None)
    assert result == {
        "cniVersion": version,
        "interfaces": [{"name": "ovlv0123456789a", "mac": "aa:bb:cc:dd:ee:ff"},
                       {"name": "eth0", "mac": "0a:58:0a:f4:03:05", "sandbox": "/run/netns/c1"}],
        "ips": [{"version": "4", "address": "10.244.3.5/24", "gateway": "10.244.3.1", "interface": 1}],
        "routes": [{"dst": "0.0.0.0/0", "gw": "10.244.3.1"}],
        "dns": {},
    }


def test_1_0_drops_ip_version_and_1_1_adds_mtu():
    one = add_result("1.0.0", ATTACHMENT, {"nameservers": ["10.0.0.10"]})
    assert one["ips"] == [{"address": "10.244.3.5/24", "gateway": "10.244.3.1", "interface": 1}]
    assert "mtu" not in one["interfaces"][1] and one["dns"] == {"nameservers": ["10.0.0.10"]}
    eleven = add_result("1.1.0", ATTACHMENT, None)
    assert [i["mtu"] for i in eleven["interfaces"]] == [1450, 1450]


def test_add_behind_another_plugin_passes_its_result_on_with_ours_appended():
    earlier = {"cniVersion": "1.1.0", "interfaces": [{"name": "net0", "sandbox": "/run/netns/c1"}],
               "ips": [{"address": "192.0.2.7/24", "interface": 0}],
               "routes": [{"dst": "192.0.2.0/24"}], "dns": {"nameservers": ["192.0.2.53"]}}
    result = add_result("1.1.0", ATTACHMENT, None, earlier)
    assert [i["name"] for i in result["interfaces"]] == ["net0", "ovlv0123456789a", "eth0"]
    assert result["ips"] == [{"address": "192.0.2.7/24", "interface": 0},
                             {"address": "10.244.3.5/24", "gateway": "10.244.3.1", "interface": 2}]
    assert result["routes"] == [{"dst": "192.0.2.0/24"}, {"dst": "0.0.0.0/0", "gw": "10.244.3.1"}]
    assert result["dns"] == {"nameservers": ["192.0.2.53"]}    # ours when we have one
    assert add_result("1.1.0", ATTACHMENT, {"nameservers": ["10.0.0.10"]}, earlier)["dns"] == {
        "nameservers": ["10.0.0.10"]}
    assert earlier["interfaces"] == [{"name": "net0", "sandbox": "/run/netns/c1"}]   # not modified in place
    # Fields that are not lists are left out, not trusted.
    odd = add_result("1.1.0", ATTACHMENT, None, {"interfaces": "net0", "ips": None, "dns": "x"})
    assert odd == add_result("1.1.0", ATTACHMENT, None)
    expected_in_prev_result(result, "eth0", "/run/netns/c1", ATTACHMENT.address)   # CHECK accepts it


def test_prev_result_must_list_our_interface_and_address():
    prev = add_result("1.1.0", ATTACHMENT, None)
    expected_in_prev_result(prev, "eth0", "/run/netns/c1", ATTACHMENT.address)
    with pytest.raises(AttachmentDrift):
        expected_in_prev_result(None, "eth0", "/run/netns/c1", ATTACHMENT.address)
    with pytest.raises(AttachmentDrift):
        expected_in_prev_result(prev, "eth0", "/run/netns/other", ATTACHMENT.address)
    with pytest.raises(AttachmentDrift):
        expected_in_prev_result(prev, "eth0", "/run/netns/c1", IPv4Interface("10.244.3.6/24"))
    with pytest.raises(AttachmentDrift):
        expected_in_prev_result({**prev, "ips": [{"address": "junk"}]}, "eth0", "/run/netns/c1", ATTACHMENT.address)


def test_host_ifname_is_deterministic_short_and_recognised():
    pytest.importorskip("pyroute2")
    from cni.service import host_ifname, is_host_ifname
    name = host_ifname("abc", "eth0")
    assert name == host_ifname("abc", "eth0") != host_ifname("abc", "eth1") != host_ifname("abd", "eth0")
    assert len(name) == 15 and is_host_ifname(name)
    assert not is_host_ifname("ovl-cni0") and not is_host_ifname("ovlvXYZ") and not is_host_ifname("eth0")


def test_launcher_refuses_a_path_a_shebang_cannot_hold():
    import click
    with pytest.raises(click.ClickException):
        launcher_text("/opt/my venv/bin/python", "/src")


def test_install_writes_a_runnable_plugin_and_a_conflist(tmp_path):
    executable, conf = install(tmp_path / "bin", tmp_path / "net.d", "/run/ovl-test", portmap=True)
    assert os.access(executable, os.X_OK) and executable.name == "overlay"
    first_line = executable.read_text().splitlines()[0]
    assert first_line.startswith("#!/") and first_line.endswith(" -IS")
    conflist = json.loads(conf.read_text())
    assert conflist["cniVersion"] == "1.0.0" and conflist["cniVersions"] == ["1.0.0"]    # portmap stops at 1.0.0
    assert [p["type"] for p in conflist["plugins"]] == ["overlay", "portmap"]
    assert conflist["plugins"][0]["runDir"] == "/run/ovl-test"
    _, alone = install(tmp_path / "bin", tmp_path / "net.d", "/run/ovl-test")
    assert json.loads(alone.read_text())["cniVersions"] == ["1.0.0", "1.1.0"]
    # Exactly as a runtime does it: exec with the environment, config on stdin.
    done = subprocess.run([str(executable)], input=json.dumps({"cniVersion": "1.0.0"}).encode(),
                          env={"CNI_COMMAND": "VERSION"}, capture_output=True, timeout=10)
    assert done.returncode == 0, done.stderr
    assert "1.0.0" in json.loads(done.stdout)["supportedVersions"]


def test_the_launcher_flushes_its_answer_and_exit_status_before_it_skips_finalization(tmp_path):
    """The launcher ends with posix._exit (no interpreter finalization): stdout must still be
    complete, and the status main() returned must be the process's."""
    import subprocess
    executable, _ = install(tmp_path / "bin", tmp_path / "net.d", str(tmp_path / "run"))
    done = subprocess.run([str(executable)], input=b'{"cniVersion": "0.4.0"}', capture_output=True,
                          env={"CNI_COMMAND": "VERSION"})
    assert done.returncode == 0 and json.loads(done.stdout)["cniVersion"] == "0.4.0"
    config = json.dumps({"cniVersion": "1.0.0", "name": "n", "type": "overlay", "runDir": str(tmp_path / "run")})
    done = subprocess.run([str(executable)], input=config.encode(), capture_output=True,
                          env={"CNI_COMMAND": "ADD", "CNI_PATH": "/x"})
    error = json.loads(done.stdout)
    assert done.returncode == 1 and error["code"] == 4 and "CNI_CONTAINERID" in error["msg"]
    assert done.stdout.endswith(b"}\n") and not done.stderr
