"""Property tests of the CNI plugin's parsing: whatever a runtime (or anyone) puts in the
environment and on stdin, the result is an invocation or a CniFailure that maps to a spec code
and renders as valid error JSON; never an unhandled exception.
"""

from __future__ import annotations

import json

from hypothesis import given, settings
from hypothesis import strategies as st

from cni import spec
from cni.errors import CniFailure, INTERNAL_ERROR_CODE, cni_code

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**40, 2**40) | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4),
    max_leaves=12)

VALID_CONFIG = {"cniVersion": "1.0.0", "name": "overlay", "type": "overlay"}
VALID_ENV = {"CNI_COMMAND": "ADD", "CNI_CONTAINERID": "abc123", "CNI_NETNS": "/run/netns/x",
             "CNI_IFNAME": "eth0", "CNI_PATH": "/usr/lib/cni"}
env_text = st.text(alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"), max_size=40)


def outcome(environ: dict, stdin: str):
    try:
        return spec.parse_invocation(environ, stdin)
    except CniFailure as exc:
        code = cni_code(exc)
        assert code != INTERNAL_ERROR_CODE, exc
        assert exc.msg
        rendered = json.loads(spec.error_json(spec.version_for_errors(stdin), code, exc.msg, exc.details))
        assert rendered["code"] == code and rendered["msg"] == exc.msg
        assert rendered["cniVersion"] in spec.SUPPORTED_VERSIONS
        return None


@settings(max_examples=250)
@given(st.text(max_size=300))
def test_any_stdin(stdin):
    outcome(VALID_ENV, stdin)


@settings(max_examples=250)
@given(json_values)
def test_any_json_on_stdin(value):
    outcome(VALID_ENV, json.dumps(value))


@settings(max_examples=300)
@given(field=st.sampled_from(["cniVersion", "name", "type", "runDir", "bridge", "runtimeConfig",
                              "prevResult", "capabilities", "cni.dev/valid-attachments"]),
       value=json_values)
def test_config_with_one_field_replaced(field, value):
    outcome(VALID_ENV, json.dumps({**VALID_CONFIG, field: value}))


@settings(max_examples=300)
@given(name=st.sampled_from(sorted(VALID_ENV) + ["CNI_ARGS"]), value=env_text)
def test_environment_with_one_variable_replaced(name, value):
    outcome({**VALID_ENV, name: value}, json.dumps(VALID_CONFIG))


@settings(max_examples=250)
@given(st.dictionaries(st.sampled_from(sorted(VALID_ENV) + ["CNI_ARGS"]), env_text, max_size=6))
def test_any_environment(environ):
    outcome(environ, json.dumps(VALID_CONFIG))


quads = st.builds("{}.{}.{}.{}".format, *[st.integers(0, 300)] * 4)
cni_args = st.one_of(
    env_text,
    st.lists(st.tuples(st.sampled_from(["IP", "IgnoreUnknown", "K8S_POD_NAME", ""]), quads | env_text),
             max_size=4).map(lambda pairs: ";".join(f"{key}={value}" for key, value in pairs)))


@settings(max_examples=300)
@given(cni_args)
def test_any_cni_args(args):
    invocation = outcome({**VALID_ENV, "CNI_ARGS": args}, json.dumps(VALID_CONFIG))
    if invocation is not None:
        # What was accepted is K=V pairs, and a requested IP is a dotted quad.
        assert all(key and "=" not in key for key, _ in invocation.args)
        if invocation.requested_ip is not None:
            assert spec.is_dotted_quad(str(invocation.requested_ip).split("/")[0])


@settings(max_examples=300)
@given(st.text(max_size=200))
def test_version_never_fails(stdin):
    answer = json.loads(spec.version_answer(stdin))
    assert answer["supportedVersions"] == list(spec.SUPPORTED_VERSIONS)
    assert answer["cniVersion"] in spec.SUPPORTED_VERSIONS
