"""The CNI service as the daemon hosts it: socket permissions, readiness, close (no root needed:
STATUS and VERSION touch no netlink)."""

import io
import json
import os
import socket
import stat
import time

import pytest

pytest.importorskip("pyroute2")

from cni import plugin  # noqa: E402
from cni.service import CniService  # noqa: E402
from overlay.subnetfile import SUBNET_FILE_NAME  # noqa: E402

SUBNET_ENV = "FLANNEL_NETWORK=10.244.0.0/16\nFLANNEL_SUBNET=10.244.3.1/24\nFLANNEL_MTU=1450\nFLANNEL_IPMASQ=true\n"


def status(run_dir, version="1.1.0"):
    out = io.StringIO()
    config = json.dumps({"cniVersion": version, "name": "n", "type": "overlay", "runDir": str(run_dir)})
    code = plugin.main(environ={"CNI_COMMAND": "STATUS", "CNI_PATH": "/x"}, stdin=config.encode(), stdout=out)
    return code, (json.loads(out.getvalue()) if out.getvalue().strip() else None)


@pytest.fixture
def service(tmp_path):
    (tmp_path / SUBNET_FILE_NAME).write_text(SUBNET_ENV)
    service = CniService(tmp_path)
    service.start()
    try:
        yield service
    finally:
        service.close()


def test_socket_is_root_only(service):
    assert stat.S_IMODE(os.stat(service.socket_path).st_mode) == 0o600
    assert stat.S_ISSOCK(os.stat(service.socket_path).st_mode)
    assert not [p for p in service.run_dir.iterdir() if p.name.endswith(".tmp")]


def test_status_follows_readiness_and_subnet_file(service, tmp_path):
    assert status(tmp_path)[1]["code"] == 50           # started, not yet ready
    service.set_ready(True)
    assert status(tmp_path) == (0, None)
    (tmp_path / SUBNET_FILE_NAME).unlink()
    code, error = status(tmp_path)
    assert code != 0 and error["code"] == 50 and "subnet" in error["msg"]


def test_close_removes_the_socket_and_the_client_says_try_later(tmp_path):
    (tmp_path / SUBNET_FILE_NAME).write_text(SUBNET_ENV)
    service = CniService(tmp_path)
    service.start()
    service.set_ready(True)
    assert status(tmp_path) == (0, None)
    service.close()
    service.close()     # idempotent
    assert not service.socket_path.exists()
    assert status(tmp_path)[1]["code"] == 50


def test_a_stale_socket_is_replaced_and_a_newer_one_is_left_alone(tmp_path):
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(str(tmp_path / "cni.sock"))
    stale.close()
    first = CniService(tmp_path)
    first.start()
    second = CniService(tmp_path)       # e.g. a restarted daemon taking over
    second.start()
    first.close()
    assert second.socket_path.exists()
    second.set_ready(True)
    (tmp_path / SUBNET_FILE_NAME).write_text(SUBNET_ENV)
    assert status(tmp_path) == (0, None)
    second.close()


def test_malformed_requests_get_spec_errors(service):
    for payload in (b"not json", b'{"env": 1, "stdin": ""}', b'{"env": {"CNI_COMMAND": "ADD"}, "stdin": "{"}'):
        code, text, _ = service.answer(payload)
        error = json.loads(text)
        assert code == 1 and error["code"] in (4, 6)


def run_plugin(environ, stdin: bytes, socket_hint=None):
    out = io.StringIO()
    code = plugin.main(environ=environ, stdin=stdin, stdout=out, socket_hint=socket_hint)
    return code, (json.loads(out.getvalue()) if out.getvalue().strip() else None)


def test_with_the_service_up_input_errors_get_their_spec_codes_from_it(service, tmp_path):
    """The client forwards whatever names a run dir and lets the service validate it."""
    env = {"CNI_COMMAND": "ADD", "CNI_CONTAINERID": "c1", "CNI_NETNS": "/run/netns/x", "CNI_IFNAME": "eth0",
           "CNI_PATH": "/x"}
    good = {"cniVersion": "1.0.0", "name": "n", "type": "overlay", "runDir": str(tmp_path)}
    cases = [
        ({**good, "cniVersion": "0.2.0"}, env, 1),
        ({**good, "ipam": {}}, env, 2),
        (good, {**env, "CNI_IFNAME": "a/b"}, 4),
        ({**good, "bridge": 7}, env, 7),
        ({**good, "cniVersion": "0.3.1"}, {**env, "CNI_COMMAND": "CHECK"}, 1),
    ]
    for config, environ, code in cases:
        status, error = run_plugin(environ, json.dumps(config).encode())
        assert status == 1 and error["code"] == code and error["msg"], (config, environ, error)
    # What the client cannot route (no JSON, a relative runDir, too large) it answers itself.
    assert run_plugin(env, b"{nope")[1]["code"] == 6
    assert run_plugin(env, json.dumps({**good, "runDir": "rel"}).encode())[1]["code"] == 7
    big = json.dumps({**good, "args": {"x": "y" * (1 << 20)}}).encode()
    assert run_plugin(env, big)[1]["code"] == 7


@pytest.mark.parametrize("hinted, loaded", [(False, "['_json', 'cni', 'cni.plugin']"),
                                             (True, "['cni', 'cni.plugin']")])
def test_a_forwarded_call_loads_no_parsing_module(service, tmp_path, hinted, loaded):
    """The forwarding path imports no parsing module, and with its launcher's socket hint not
    even _json (start-up is what a runtime pays)."""
    import subprocess
    import sys
    service.set_ready(True)
    root = os.path.dirname(os.path.dirname(plugin.__file__))
    config = json.dumps({"cniVersion": "1.1.0", "name": "n", "type": "overlay", "runDir": str(tmp_path)})
    hint = repr(str(service.socket_path)) if hinted else "None"
    code = (f"import sys; sys.path.insert(0, sys.argv[1]); from cni import plugin; "
            f"status = plugin.main(socket_hint={hint}); "
            "print(sorted(m for m in sys.modules if m.startswith(('cni', '_json'))), file=sys.stderr); "
            "sys.exit(status)")
    done = subprocess.run([sys.executable, "-IS", "-c", code, root], input=config.encode(), capture_output=True,
                          env={"CNI_COMMAND": "STATUS", "CNI_PATH": "/x"})
    assert done.returncode == 0, done.stdout
    assert done.stderr.decode().strip() == loaded


def test_a_hint_to_another_run_dirs_service_ends_at_the_configs(tmp_path):
    """A launcher's hint names one run dir's service, the config another: that service answers
    'elsewhere' without acting, and the client goes to the config's runDir."""
    services = []
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        (tmp_path / name / SUBNET_FILE_NAME).write_text(SUBNET_ENV)
        services.append(CniService(tmp_path / name))
        services[-1].start()
    try:
        services[1].set_ready(True)      # only b is ready: STATUS tells which one answered
        config = json.dumps({"cniVersion": "1.1.0", "name": "n", "type": "overlay", "runDir": str(tmp_path / "b")})
        out = io.StringIO()
        status = plugin.main(environ={"CNI_COMMAND": "STATUS", "CNI_PATH": "/x"}, stdin=config.encode(),
                             stdout=out, socket_hint=str(services[0].socket_path))
        assert status == 0 and out.getvalue() == ""
        # a symlinked spelling of a's run dir is a's run dir
        os.symlink(tmp_path / "a", tmp_path / "a-link")
        link = json.dumps({"cniVersion": "1.1.0", "name": "n", "type": "overlay", "runDir": str(tmp_path / "a-link")})
        code, error = run_plugin({"CNI_COMMAND": "STATUS", "CNI_PATH": "/x"}, link.encode(),
                                 socket_hint=str(services[0].socket_path))
        assert code == 1 and error["code"] == 50 and "not ready" in error["msg"]
        # the config's run dir has no service: try again later, as without a hint
        gone = json.dumps({"cniVersion": "1.1.0", "name": "n", "type": "overlay", "runDir": str(tmp_path / "c")})
        env = {"CNI_COMMAND": "ADD", "CNI_CONTAINERID": "c1", "CNI_NETNS": "/run/netns/x", "CNI_IFNAME": "eth0",
               "CNI_PATH": "/x"}
        assert run_plugin(env, gone.encode(), socket_hint=str(services[1].socket_path))[1]["code"] == 11
    finally:
        for service in services:
            service.close()


def test_request_strings_are_json():
    for text in ["", "plain", 'quo"te', "back\\slash", "new\nline\ttab\r\x00\x1f\x7f", "é ü 中", "\udcff"]:
        assert json.loads(plugin._string(text)) == text


def _voluntary_switches(native_id: int) -> int:
    with open(f"/proc/self/task/{native_id}/status") as status_file:
        for line in status_file:
            if line.startswith("voluntary_ctxt_switches:"):
                return int(line.split()[1])
    raise AssertionError("no voluntary_ctxt_switches line")


def test_an_idle_service_sleeps_until_a_client_or_close_calls(service, tmp_path):
    # socketserver's serve_forever woke every poll interval (20 times a second at 0.05 s) to look
    # for shutdown(); the accept loop now blocks until the socket or close()'s pipe is readable.
    thread = service._thread
    before = _voluntary_switches(thread.native_id)
    time.sleep(0.5)   # an observation window, not a wait for a condition
    assert _voluntary_switches(thread.native_id) - before <= 1
    assert status(tmp_path)[1]["code"] == 50   # a client still wakes it
    service.close()
    assert not thread.is_alive()


def test_a_config_that_escaping_makes_larger_than_2_mib_is_answered_by_the_service(service, tmp_path):
    service.set_ready(True)
    config = {"cniVersion": "1.1.0", "name": "n", "type": "overlay", "runDir": str(tmp_path),
              "args": {"x": "\u0436" * 400_000}}     # 2 bytes in UTF-8, 6 once escaped
    stdin = json.dumps(config, ensure_ascii=False).encode()
    assert len(stdin) < 1 << 20
    out = io.StringIO()
    # 0, not the client's own fallback (50: it cannot tell readiness; 11: service unreachable).
    assert plugin.main(environ={"CNI_COMMAND": "STATUS"}, stdin=stdin, stdout=out) == 0, out.getvalue()


def test_add_waits_while_the_daemon_is_not_ready(service, tmp_path):
    # Not ready: the daemon lost its lease (or has none yet), and its subnet may change.
    config = json.dumps({"cniVersion": "1.1.0", "name": "n", "type": "overlay", "runDir": str(tmp_path)})
    out = io.StringIO()
    code = plugin.main(environ={"CNI_COMMAND": "ADD", "CNI_CONTAINERID": "c1", "CNI_NETNS": "/run/netns/ovl-none",
                                "CNI_IFNAME": "eth0"}, stdin=config.encode(), stdout=out)
    error = json.loads(out.getvalue())
    assert code != 0 and error["code"] == 11 and "lease" in error["msg"], error
    assert not (tmp_path / "cni-ipam" / "allocations.json").exists()
