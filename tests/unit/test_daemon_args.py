"""overlayd's command line and environment: a bad value is a clear error (exit 2 or a
ConfigError naming the option), never a traceback."""

from __future__ import annotations

import asyncio

import pytest

from overlay.daemon import Daemon, build_parser, main, settings_from_args
from overlay.errors import ConfigError

ENDPOINTS = ["--etcd-endpoints", "http://127.0.0.1:2379"]


@pytest.mark.parametrize("variable, value", [("OVERLAY_HEALTHZ_PORT", "abc"), ("OVERLAY_SUBNET_LEASE_TTL", "1d"),
                                             ("OVERLAY_RESYNC_INTERVAL", "soon")])
def test_a_bad_number_in_the_environment_is_a_usage_error(monkeypatch, capsys, variable, value):
    monkeypatch.setenv(variable, value)
    with pytest.raises(SystemExit) as exited:
        build_parser().parse_args(ENDPOINTS)
    assert exited.value.code == 2 and "invalid" in capsys.readouterr().err


def test_a_bad_log_level_from_the_environment_or_the_flag(monkeypatch, capsys):
    monkeypatch.setenv("OVERLAY_LOG_LEVEL", "chatty")
    assert main(ENDPOINTS) == 2 and "chatty" in capsys.readouterr().err
    monkeypatch.delenv("OVERLAY_LOG_LEVEL")
    with pytest.raises(SystemExit):
        build_parser().parse_args([*ENDPOINTS, "--log-level", "chatty"])
    assert build_parser().parse_args([*ENDPOINTS, "--log-level", "DEBUG"]).log_level == "debug"


@pytest.mark.parametrize("port", ["-1", "70000"])
def test_a_port_out_of_range_is_refused(port):
    with pytest.raises(ConfigError, match="--healthz-port"):
        settings_from_args(build_parser().parse_args([*ENDPOINTS, "--healthz-port", port]))


def test_a_health_address_it_cannot_listen_on_is_a_config_error():
    args = build_parser().parse_args([*ENDPOINTS, "--healthz-ip", "203.0.113.7", "--healthz-port", "9999"])
    daemon = Daemon(settings_from_args(args))
    with pytest.raises(ConfigError, match="cannot listen on 203.0.113.7:9999"):
        asyncio.run(asyncio.wait_for(daemon.run(), 30))
