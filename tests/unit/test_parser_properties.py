"""Property tests: whatever arrives from etcd or an operator, a parser ends in a value or in a
clear domain error, never in an unhandled exception.

Inputs are both free-form (any text, any JSON) and near misses built from valid documents with
one field replaced, which is where hand-written parsers usually slip.
"""

from __future__ import annotations

import json

from hypothesis import given, settings
from hypothesis import strategies as st

from overlay.config import NetworkConfig, parse_config
from overlay.errors import ConfigError, LeaseParseError
from overlay.lease import DEFAULT_PREFIX, LeaseAttrs, parse_lease_value, parse_subnet_key, subnet_key
from overlay.subnetfile import SubnetFile, SubnetFileError, parse_subnet_file

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**40, 2**40) | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4),
    max_leaves=12)

VALID_CONFIG = {"Network": "10.244.0.0/16", "SubnetLen": 24, "SubnetMin": "10.244.1.0",
                "SubnetMax": "10.244.254.0", "Backend": {"Type": "vxlan", "VNI": 1, "Port": 8472}}
VALID_LEASE = {"PublicIP": "198.18.0.3", "PublicIPv6": None, "BackendType": "vxlan",
               "BackendData": {"VNI": 1, "VtepMAC": "c6:d2:5e:11:aa:07"}}


def _config_outcome(text) -> NetworkConfig | None:
    try:
        return parse_config(text)
    except ConfigError as exc:
        assert exc.field and str(exc)
        return None


@settings(max_examples=300)
@given(st.text(max_size=200) | st.binary(max_size=200))
def test_config_from_any_text(text):
    _config_outcome(text)


@settings(max_examples=300)
@given(json_values)
def test_config_from_any_json(value):
    _config_outcome(json.dumps(value))


@settings(max_examples=500)
@given(field=st.sampled_from(["Network", "SubnetLen", "SubnetMin", "SubnetMax", "Backend"]),
       value=json_values)
def test_config_with_one_field_replaced(field, value):
    config = _config_outcome(json.dumps({**VALID_CONFIG, field: value}))
    if config is not None:
        # Whatever was accepted is coherent: every leasable subnet lies inside the network.
        assert config.subnet_min <= config.subnet_max
        assert config.subnet_at(0).subnet_of(config.network)
        assert config.subnet_at(config.subnet_count - 1).subnet_of(config.network)


@settings(max_examples=300)
@given(field=st.sampled_from(["Type", "VNI", "Port", "DirectRouting"]), value=json_values)
def test_config_with_one_backend_field_replaced(field, value):
    config = _config_outcome(json.dumps({**VALID_CONFIG, "Backend": {**VALID_CONFIG["Backend"], field: value}}))
    if config is not None:
        assert 0 < config.backend.vni < 2**24 and 0 < config.backend.port < 2**16


def _lease_outcome(text) -> LeaseAttrs | None:
    try:
        return parse_lease_value(text)
    except LeaseParseError as exc:
        assert str(exc)
        return None


@settings(max_examples=300)
@given(st.text(max_size=200) | st.binary(max_size=200) | json_values.map(json.dumps))
def test_lease_value_from_anything(text):
    _lease_outcome(text)


@settings(max_examples=500)
@given(field=st.sampled_from(["PublicIP", "BackendType", "BackendData", "VNI", "VtepMAC"]), value=json_values)
def test_lease_value_with_one_field_replaced(field, value):
    raw = json.loads(json.dumps(VALID_LEASE))
    if field in ("VNI", "VtepMAC"):
        raw["BackendData"][field] = value
    else:
        raw[field] = value
    attrs = _lease_outcome(json.dumps(raw))
    if attrs is not None:
        # Accepted values round-trip through what we would write ourselves.
        assert parse_lease_value(attrs.to_json()) == attrs


@settings(max_examples=500)
@given(st.text(max_size=40))
def test_subnet_key_from_any_suffix(suffix):
    try:
        subnet = parse_subnet_key(f"{DEFAULT_PREFIX}/subnets/{suffix}", DEFAULT_PREFIX)
    except LeaseParseError:
        return
    assert subnet_key(DEFAULT_PREFIX, subnet) == f"{DEFAULT_PREFIX}/subnets/{suffix}"


@settings(max_examples=300)
@given(st.text(max_size=300))
def test_subnet_file_from_any_text(text):
    try:
        parsed = parse_subnet_file(text)
    except SubnetFileError as exc:
        assert str(exc)
        return
    assert isinstance(parsed, SubnetFile)
