"""Class labels from raw values, normalised in one place for every data source and for imports.

Raw labels come as integers or as class names; out come int64 labels that index a list of
class names. Integers keep their value; names become indices into the sorted unique names
(sorted as numbers when every name is an integer, so ``"10"`` follows ``"9"``) or into the
names a caller already has (a ``classes.txt``, a ``ClassLabel``). A leaf module: data sources
(``extract/datasets``) and the HDF5 import (``store/export.py``) both use it, and the two
differ only in the :class:`LabelRules` they pass: their words and their unlabelled rows.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Literal, Sequence

import numpy as np

from backbench.errors import DataSourceError


@dataclass(frozen=True)
class LabelRules:
    """How a caller words label problems (``str.format`` templates over ``what``, ``value``,
    ``count``) and what it does with negative (unlabelled) integers."""

    error: type[Exception] = DataSourceError
    empty: str = "{what} holds no samples"
    mixed: str = "{what} mixes integer and text labels (e.g. {value!r}); use one kind"
    fractional: str = "{what} holds non-integer numbers; labels must be integers or strings"
    # None: negative labels are kept (rows without a label) instead of refused
    unlabelled: str | None = "{what} has unlabelled samples (label {value}); extract a labelled split"
    beyond: str = "{what} has label {value} but only {count} class names"
    unknown: str = "{what} has label {value!r} that its class list lacks"
    # integers without class names: "range" names every value 0..max, "present" the values seen
    int_names: Literal["range", "present"] = "range"
    numeric_sort: bool = True

    def fail(self, template: str, what: str, **values: Any) -> Exception:
        """The error to raise for one problem."""
        return self.error(template.format(what=what, **values))


SOURCE_RULES = LabelRules()


def sorted_names(values: Iterable[str], *, numeric: bool = True) -> list[str]:
    """The unique names, sorted; as numbers when ``numeric`` and every name is an integer."""
    uniq = set(values)
    by_number = numeric and all(n.lstrip("-").isdigit() for n in uniq)
    return sorted(uniq, key=(lambda n: int(n)) if by_number else None)


def normalize_labels(values: Sequence[Any] | np.ndarray, names: Sequence[str] | None = None, *, what: str,
                     rules: LabelRules = SOURCE_RULES) -> tuple[np.ndarray, list[str]]:
    """Integer labels and class names from raw label values (ints or names).

    With ``names``, integers index into it and names are looked up in it. Without, integer
    labels keep their value and the classes follow ``rules.int_names`` (by default ``"0" ..
    str(max)``, so a split that lacks a class still numbers the others alike); names become
    the sorted unique names. ``what`` names the labels' owner in errors.
    """
    if len(values) == 0:
        raise rules.fail(rules.empty, what)
    ints, texts = _split_kinds(values, what, rules)
    if ints is not None:
        return _from_ints(ints, names, what, rules)
    return _from_texts(texts, names, what, rules)


def _split_kinds(values: Sequence[Any] | np.ndarray, what: str,
                 rules: LabelRules) -> tuple[np.ndarray | None, list[str]]:
    """``(int64 labels, [])`` for integer values (whole floats of an array too), else ``(None, names)``."""
    if isinstance(values, np.ndarray):
        if values.dtype.kind == "f" and not (np.all(np.isfinite(values)) and np.all(values == np.round(values))):
            raise rules.fail(rules.fractional, what)
        if values.dtype.kind in "fiub":
            return values.astype(np.int64), []
        values = values.tolist()
    if all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in values):
        return np.asarray(values, dtype=np.int64), []
    if not all(isinstance(v, str) for v in values):
        raise rules.fail(rules.mixed, what, value=values[0])
    return None, list(values)


def _from_ints(labels: np.ndarray, names: Sequence[str] | None, what: str,
               rules: LabelRules) -> tuple[np.ndarray, list[str]]:
    if rules.unlabelled is not None and labels.min() < 0:
        raise rules.fail(rules.unlabelled, what, value=int(labels.min()))
    if names is not None:
        top = int(labels.max(initial=-1))
        if top >= len(names):
            raise rules.fail(rules.beyond, what, value=top, count=len(names))
        return labels, list(names)
    if rules.int_names == "present":
        return labels, [str(v) for v in np.unique(labels[labels >= 0]).tolist()]
    return labels, [str(i) for i in range(int(labels.max()) + 1)]


def _from_texts(values: list[str], names: Sequence[str] | None, what: str,
                rules: LabelRules) -> tuple[np.ndarray, list[str]]:
    if names is None:
        names = sorted_names(values, numeric=rules.numeric_sort)
    index = {n: i for i, n in enumerate(names)}
    unknown = sorted(set(values) - set(index))
    if unknown:
        raise rules.fail(rules.unknown, what, value=unknown[0])
    return np.asarray([index[v] for v in values], dtype=np.int64), list(names)
