"""Fixtures shared by the integration tests: a real etcd on loopback."""

from __future__ import annotations

import pytest

from tests.support.etcd import client_urls, running_etcd


@pytest.fixture
def etcd(tmp_path):
    """One real etcd member on 127.0.0.1; yields its client URL."""
    with running_etcd(tmp_path / "etcd") as processes:
        yield client_urls(processes)


@pytest.fixture
def etcd3(tmp_path):
    """A real three-member etcd cluster on 127.0.0.1; yields the EtcdProcess objects."""
    with running_etcd(tmp_path / "etcd3", members=3) as processes:
        yield processes


@pytest.fixture
def lab(request):
    """A fresh lab (no hosts yet), torn down after the test. A test module's LAB_LETTER starts
    the lab's name, so leftovers (if teardown ever failed) tell which file made them."""
    from tests.support.lab import fresh_lab
    with fresh_lab(getattr(request.module, "LAB_LETTER", "l")) as handle:
        yield handle
