"""Shared pytest set-up. Tier by directory: tests/unit needs nothing; tests/integration needs
root, real network namespaces and a real etcd (started by the tests themselves)."""

import os
import signal

import pytest


def pytest_configure(config):
    # SIGTERM (a cancelled CI job, `timeout`, `kill`) ends the run as Ctrl-C does, so pytest
    # still tears down every fixture: namespaces, labs, etcd members and daemons go with them.
    # By default SIGTERM ends Python at once and leaves all of that behind.
    def interrupted(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")
    signal.signal(signal.SIGTERM, interrupted)


def pytest_collection_modifyitems(config, items):
    for item in items:
        if "/integration/" in str(item.fspath):
            item.add_marker(pytest.mark.integration)
            if os.geteuid() != 0:
                item.add_marker(pytest.mark.skip(reason="integration tests need root"))
