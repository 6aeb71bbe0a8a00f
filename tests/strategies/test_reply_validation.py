"""Tests for medfed.strategies._validation: which replies may enter an average."""

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, MetricRecord, RecordDict

from medfed.strategies._validation import (
    array_layout,
    count_non_finite,
    describe_layout_mismatch,
    find_invalid_replies,
)


def _content(arrays=None, num_examples=10, record_name="arrays", extra_records=None):
    content = RecordDict()
    if arrays is not None:
        content[record_name] = ArrayRecord({k: Array(np.asarray(v)) for k, v in arrays.items()})
    metrics = {} if num_examples is None else {"num-examples": num_examples}
    content["metrics"] = MetricRecord(metrics)
    for name, record in (extra_records or {}).items():
        content[name] = record
    return content


def _ok(value=0.0):
    return {"w": np.full((2, 3), value, dtype=np.float32), "b": np.zeros(3, dtype=np.float32)}


# --- count_non_finite ---------------------------------------------------------------
def test_count_non_finite_counts_nan_and_inf_per_array():
    # Prepare
    arrays = {
        "a": np.array([1.0, np.nan, np.inf, -np.inf]),
        "b": np.ones((2, 2), dtype=np.float32),
        "c": np.array([[np.nan], [2.0]], dtype=np.float16),
    }

    # Execute
    counts = count_non_finite(arrays)

    # Assert
    assert counts == {"a": 3, "c": 1}


def test_count_non_finite_ignores_integer_and_bool_arrays():
    arrays = {"steps": np.array([3, 4], dtype=np.int64), "mask": np.array([True, False])}

    assert count_non_finite(arrays) == {}


# --- layouts -------------------------------------------------------------------------
def test_array_layout_is_sorted_by_name_and_independent_of_input_order():
    first = array_layout({"w": (2, 3), "b": [3]})
    second = array_layout({"b": (3,), "w": (2, 3)})

    assert first == (("b", (3,)), ("w", (2, 3)))
    assert first == second


def test_describe_layout_mismatch_names_missing_extra_and_reshaped_arrays():
    expected = array_layout({"w": (2, 3), "b": (3,)})
    found = array_layout({"w": (3, 2), "head": (1,)})

    text = describe_layout_mismatch(found, expected)

    assert text == (
        "missing arrays ['b']; unexpected arrays ['head']; "
        "array 'w' has shape (3, 2), expected (2, 3)"
    )


# --- find_invalid_replies -------------------------------------------------------------
def test_all_valid_replies_give_no_reasons():
    contents = [_content(_ok(1.0)), _content(_ok(2.0), num_examples=3)]

    assert find_invalid_replies(contents) == {}


def test_non_finite_reply_is_reported_by_index_with_the_array_name():
    bad = _ok(1.0)
    bad["w"][0, 0] = np.nan
    bad["w"][1, 2] = np.inf

    invalid = find_invalid_replies([_content(_ok()), _content(bad), _content(_ok())])

    assert invalid == {1: "array 'w' holds 2 NaN/inf values"}


def test_non_finite_in_several_arrays_mentions_the_others():
    bad = {"w": np.full((2, 3), np.nan, np.float32), "b": np.array([np.inf, 0, 0], np.float32)}

    invalid = find_invalid_replies([_content(bad), _content(_ok())])

    assert invalid == {0: "array 'w' holds 6 NaN/inf values (and 1 more array)"}


def test_shape_mismatch_is_dropped_in_favour_of_the_majority():
    odd = {"w": np.zeros((3, 2), np.float32), "b": np.zeros(3, np.float32)}

    invalid = find_invalid_replies([_content(odd), _content(_ok()), _content(_ok())])

    assert invalid == {
        0: "its arrays differ from the other replies': array 'w' has shape (3, 2), "
        "expected (2, 3)"
    }


def test_a_layout_tie_goes_to_the_reply_that_lacks_nothing_whichever_comes_first():
    odd = {"w": np.zeros((2, 3), np.float32)}  # 'b' missing

    after = find_invalid_replies([_content(_ok()), _content(odd)])
    before = find_invalid_replies([_content(odd), _content(_ok())])

    assert after == {1: "its arrays differ from the other replies': missing arrays ['b']"}
    assert before == {0: "its arrays differ from the other replies': missing arrays ['b']"}


def test_a_tie_between_layouts_of_equal_size_keeps_the_first_reply():
    only_w, only_b = {"w": np.zeros((2, 3), np.float32)}, {"b": np.zeros(3, np.float32)}

    invalid = find_invalid_replies([_content(only_b), _content(only_w)])

    assert invalid == {1: "its arrays differ from the other replies': missing arrays ['b']; unexpected arrays ['w']"}


def test_non_finite_replies_do_not_vote_on_the_layout():
    # Two NaN replies share a layout that differs from the single finite reply's.
    nan_odd = {"w": np.full((3, 2), np.nan, np.float32), "b": np.zeros(3, np.float32)}

    invalid = find_invalid_replies([_content(nan_odd), _content(nan_odd), _content(_ok())])

    assert sorted(invalid) == [0, 1]
    assert 2 not in invalid


def test_differently_named_array_record_is_dropped():
    invalid = find_invalid_replies(
        [_content(_ok()), _content(_ok(), record_name="weights"), _content(_ok())]
    )

    assert invalid == {1: "its ArrayRecord is named 'weights', the others' 'arrays'"}


@pytest.mark.parametrize(
    ("content", "reason"),
    [
        (_content(None), "it carries 0 ArrayRecords, expected exactly 1"),
        (
            _content(_ok(), extra_records={"more": ArrayRecord()}),
            "it carries 2 ArrayRecords, expected exactly 1",
        ),
        (
            _content(_ok(), extra_records={"more": MetricRecord({"num-examples": 1})}),
            "it carries 2 MetricRecords, expected exactly 1",
        ),
        (_content(_ok(), num_examples=None), "its MetricRecord lacks the weight key 'num-examples'"),
        (_content(_ok(), num_examples=0), "its weight 'num-examples' is 0, expected a finite number > 0"),
        (_content(_ok(), num_examples=-2.0), "its weight 'num-examples' is -2.0, expected a finite number > 0"),
        (
            _content(_ok(), num_examples=float("nan")),
            "its weight 'num-examples' is nan, expected a finite number > 0",
        ),
    ],
)
def test_malformed_replies_are_reported(content, reason):
    invalid = find_invalid_replies([_content(_ok()), content])

    assert invalid == {1: reason}


def test_weight_key_is_configurable():
    content = RecordDict(
        {
            "arrays": ArrayRecord({"w": Array(np.zeros(2))}),
            "metrics": MetricRecord({"n": 5}),
        }
    )

    assert find_invalid_replies([content], weighted_by_key="n") == {}
    assert find_invalid_replies([content]) == {
        0: "its MetricRecord lacks the weight key 'num-examples'"
    }


def _with_array(name, array):
    content = _content(_ok())
    content["arrays"][name] = array
    return content


@pytest.mark.parametrize("array, reason", [
    # Bytes that are no .npy at all: np.load refuses them (a damaged or hostile reply).
    (Array(dtype="float32", shape=(3,), stype="numpy.ndarray", data=b"not an array"),
     "arrays that cannot be read (ValueError)"),
    # Declares (3,) but holds a (1, 3) array: it would pass the shape checks, then break the mean.
    (Array(dtype="float32", shape=(3,), stype="numpy.ndarray", data=Array(np.zeros((1, 3), np.float32)).data),
     "array 'b' holds another shape than it declares"),
])
def test_a_reply_whose_arrays_do_not_read_as_declared_is_dropped_not_a_crash(array, reason):
    # Execute
    invalid = find_invalid_replies([_content(_ok()), _with_array("b", array), _content(_ok())], "num-examples")
    # Assert
    assert invalid == {1: reason}


def test_group_counts_one_more_than_the_examples_are_refused_and_equal_ones_pass():
    # FairLoRA weights groups by these counts: a count beyond the reply's own examples, even by
    # one, is not a count of its examples.
    def with_groups(c0, c1):
        content = _content(_ok())
        content["metrics"] = MetricRecord({"num-examples": 10, "num-examples-group-0": c0,
                                           "num-examples-group-1": c1})
        return content

    # Execute
    invalid = find_invalid_replies([with_groups(6, 4), with_groups(6, 5), with_groups(6.0, 4.0)])

    # Assert: 6 + 4 = 10 fits (examples of no known group are in none); 6 + 5 = 11 does not.
    assert invalid == {1: "its group counts add up to 11, more than its 'num-examples' of 10"}
