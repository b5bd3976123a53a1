"""backbench's estimators keep scikit-learn's contract: scikit-learn's own estimator checks.

``LinearProbe`` and every OOD scorer of :data:`backbench.probe.ood.SCORES` go through
``parametrize_with_checks`` (unfitted use raises ``NotFittedError``, ``get_params``/
``set_params``/``clone`` round-trip, ``fit`` returns ``self``, input validation in
scikit-learn's words, pickling, ...). KNNDistance runs with ``k=1``: its default k of 50
is more neighbours than the checks' tiny data sets hold; the scorers that fit a linear head
fit it at one ``C`` (the sweep over ``C`` is the probe's own, tested with it).
"""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.base import clone
from sklearn.exceptions import NotFittedError
from sklearn.utils.estimator_checks import parametrize_with_checks

from backbench.probe import ood
from backbench.probe.linear import LinearProbe

FAST = {"knn": {"k": 1}, "msp": {"Cs": [1.0]}, "maxlogit": {"Cs": [1.0]}, "energy": {"Cs": [1.0]}, "vim": {"Cs": [1.0]}}
SCORERS = {name: make(**FAST.get(name, {})) for name, make in ood.SCORES.items()}


@parametrize_with_checks([LinearProbe(), *SCORERS.values()])
def test_sklearn_estimator_checks(estimator, check) -> None:
    check(estimator)


@pytest.mark.parametrize("estimator", [LinearProbe(), *SCORERS.values()], ids=lambda e: type(e).__name__)
def test_unfitted_use_raises_not_fitted_and_params_round_trip(estimator) -> None:
    X = np.random.default_rng(0).normal(size=(8, 3))
    method = estimator.predict if hasattr(estimator, "predict") else estimator.score_samples
    with pytest.raises(NotFittedError):
        method(X)
    params = estimator.get_params()
    copy = clone(estimator)
    assert copy is not estimator and copy.get_params() == params
    name = "C" if isinstance(estimator, LinearProbe) else "batch_size"
    assert copy.set_params(**{name: 7}) is copy and copy.get_params()[name] == 7
    assert estimator.get_params()[name] == params[name]
