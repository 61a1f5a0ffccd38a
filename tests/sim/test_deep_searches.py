"""The deep runs of the unit tier's searches: the same test bodies (each hypothesis test's
``.hypothesis.inner_test``, the seeded check's function) with the example and seed counts that
used to run in tests/unit. The unit tier runs a sample of each (tests/unit/test_fsm_liveness.py,
tests/unit/test_parsers_fuzz.py) so that it stays fast; these find what a sample may miss."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.unit import test_fsm_liveness as liveness
from tests.unit import test_parsers_fuzz as fuzz

SLOW_OK = [HealthCheck.too_slow]


def inner(test: Any) -> Callable[..., None]:
    """The body of a hypothesis test, without its strategies and settings."""
    body: Callable[..., None] = test.hypothesis.inner_test
    return body


json_value = fuzz.json_value


# -- liveness of the pure core ----------------------------------------------------------------------


@settings(max_examples=300, deadline=None, suppress_health_check=SLOW_OK)
@given(st.data())
def test_every_wait_names_an_input_that_is_coming(data: st.DataObject) -> None:
    liveness.wait_names_a_coming_input(data)


def test_every_wait_names_an_input_that_is_coming_over_many_seeds() -> None:
    liveness.check_waits_over_seeds(1500)


# -- parsers of outside data ------------------------------------------------------------------------


@settings(max_examples=300, deadline=None, suppress_health_check=SLOW_OK)
@given(st.sampled_from(fuzz.FIELDS), json_value)
def test_config_any_value_is_accepted_or_a_clear_error(path: tuple[str, ...], value: Any) -> None:
    inner(fuzz.test_config_any_value_is_accepted_or_a_clear_error)(path, value)


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=200))
def test_config_file_of_random_bytes_is_a_clear_error(raw: bytes) -> None:
    inner(fuzz.test_config_file_of_random_bytes_is_a_clear_error)(raw)


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=120))
def test_dcs_json_values_decode_or_give_a_reason(raw: bytes) -> None:
    inner(fuzz.test_dcs_json_values_decode_or_give_a_reason)(raw)


@settings(max_examples=500, deadline=None)
@given(json_value)
def test_member_values_of_any_shape_never_crash(value: Any) -> None:
    inner(fuzz.test_member_values_of_any_shape_never_crash)(value)


@settings(max_examples=500, deadline=None)
@given(json_value)
def test_records_decode_or_raise_value_error(value: Any) -> None:
    inner(fuzz.test_records_decode_or_raise_value_error)(value)


@settings(max_examples=300, deadline=None)
@given(json_value, st.sampled_from(["input", "transition", "action", "bogus"]))
def test_records_with_a_valid_envelope_and_any_body(body: Any, kind: str) -> None:
    inner(fuzz.test_records_with_a_valid_envelope_and_any_body)(body, kind)


@settings(max_examples=400, deadline=None, suppress_health_check=SLOW_OK)
@given(
    st.sampled_from(["dcs", "pg", "lease", "effect", "peer", "pod", "timer"]),
    st.dictionaries(st.text(max_size=12), json_value, max_size=8),
)
def test_recorded_inputs_with_garbage_data_never_crash_nor_promote(
    kind: str, data: dict[str, Any]
) -> None:
    inner(fuzz.test_recorded_inputs_with_garbage_data_never_crash_nor_promote)(kind, data)


@settings(max_examples=300, deadline=None)
@given(json_value)
def test_input_envelope_decode(value: Any) -> None:
    inner(fuzz.test_input_envelope_decode)(value)
