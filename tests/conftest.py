"""Shared pytest set-up. Tier by directory: tests/unit needs nothing; tests/integration needs
root, real network namespaces and a real etcd (started by the tests themselves)."""

import os

import pytest


def pytest_collection_modifyitems(config, items):
    for item in items:
        if "/integration/" in str(item.fspath):
            item.add_marker(pytest.mark.integration)
            if os.geteuid() != 0:
                item.add_marker(pytest.mark.skip(reason="integration tests need root"))
