"""The default grid of the probes' inverse regularization ``C``: a module without scikit-learn
or torch, so a probe whose record is already logged keys it without importing either."""

from __future__ import annotations

import numpy as np


def default_Cs() -> np.ndarray:
    """13 values of ``C`` from 1e-4 to 1e4: a coarse version of DINOv2's log grid."""
    return 10.0 ** np.linspace(-4, 4, 13)
