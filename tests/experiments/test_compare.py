"""The fixture comparisons: numbers (inside strings too) may move, structure and words may not."""

import pytest

from tests.experiments.compare import assert_close_tree, assert_same_structure


def test_same_structure_ignores_numbers_but_not_words_or_shape():
    want = {"a": [1.5, "avoided 1 (p 0.23 -> 0.02; cost 1.1e-3 µJ)"], "b": None}
    assert_same_structure({"a": [7, "avoided 3 (p 0.2 -> 0.03; cost -2E+4 µJ)"], "b": 0.5}, want)
    for got in (
        {"a": [1.5, "kept 1 (p 0.23 -> 0.02; cost 1.1e-3 µJ)"], "b": None},  # a word changed
        {"a": [1.5, "avoided 1 (p 0.23 -> 0.02; cost 1.1e-3 µJ)"]},  # a key missing
        {"a": [1.5], "b": None},  # a list shorter
        {"a": ["1.5", "avoided 1 (p 0.23 -> 0.02; cost 1.1e-3 µJ)"], "b": None},  # not a number
    ):
        with pytest.raises(AssertionError):
            assert_same_structure(got, want)


def test_close_tree_holds_floats_to_the_tolerance_and_strings_exactly():
    assert_close_tree({"x": [1.0, "s"]}, {"x": [1.0 + 5e-7, "s"]}, rtol=1e-6)
    with pytest.raises(AssertionError):
        assert_close_tree({"x": [1.0, "s"]}, {"x": [1.0 + 5e-6, "s"]}, rtol=1e-6)
    with pytest.raises(AssertionError):
        assert_close_tree({"x": [1.0, "s 1"]}, {"x": [1.0, "s 2"]}, rtol=1e-6)
