"""The one label normaliser (backbench/labels.py), as data sources and the HDF5 import use it."""

from __future__ import annotations

import numpy as np
import pytest

from backbench.errors import CacheError, DataSourceError
from backbench.labels import normalize_labels, sorted_names
from backbench.store.export import IMPORTED_LABELS


def test_names_sort_as_numbers_when_all_are_numbers():
    assert sorted_names(["10", "9", "-1", "9"]) == ["-1", "9", "10"]
    assert sorted_names(["10", "9"], numeric=False) == ["10", "9"]
    assert sorted_names(["b", "10", "a"]) == ["10", "a", "b"]


def test_source_labels_ints_and_names():
    labels, classes = normalize_labels([2, 0, 2], what="s")
    assert labels.dtype == np.int64 and labels.tolist() == [2, 0, 2] and classes == ["0", "1", "2"]
    labels, classes = normalize_labels(["dog", "cat", "dog"], what="s")
    assert labels.tolist() == [1, 0, 1] and classes == ["cat", "dog"]
    labels, classes = normalize_labels(["ant", "cow"], ["cow", "bee", "ant"], what="s")
    assert labels.tolist() == [2, 0] and classes == ["cow", "bee", "ant"]


@pytest.mark.parametrize("values, names, message", [
    ([], None, "s holds no samples"),
    ([1, "a"], None, "s mixes integer and text labels"),
    ([0, -1], None, r"unlabelled samples \(label -1\)"),
    ([0, 3], ["a", "b"], "s has label 3 but only 2 class names"),
    (["a", "z"], ["a", "b"], "s has label 'z' that its class list lacks"),
])
def test_source_label_errors(values, names, message):
    with pytest.raises(DataSourceError, match=message):
        normalize_labels(values, names, what="s")


def test_imported_labels_keep_unlabelled_rows_and_name_present_values():
    labels, classes = normalize_labels(np.array([3.0, -1.0, 7.0]), what="f: /labels", rules=IMPORTED_LABELS)
    assert labels.tolist() == [3, -1, 7] and classes == ["3", "7"]
    labels, classes = normalize_labels(np.array(["10", "9"]), what="f: /labels", rules=IMPORTED_LABELS)
    assert classes == ["10", "9"] and labels.tolist() == [0, 1]
    with pytest.raises(CacheError, match="holds non-integer numbers"):
        normalize_labels(np.array([0.5]), what="f: /labels", rules=IMPORTED_LABELS)
    with pytest.raises(CacheError, match="f: /labels runs to 2 but classes names only 2"):
        normalize_labels(np.array([0, 2]), ["a", "b"], what="f: /labels", rules=IMPORTED_LABELS)
    with pytest.raises(CacheError, match="holds 'z', which is not in its classes"):
        normalize_labels(np.array(["z"]), ["a"], what="f: /labels", rules=IMPORTED_LABELS)
