"""backbench: which pretrained vision backbone should I build on?

The Python API: :func:`extract`, :func:`probe`, :func:`knn`, :func:`retrieve`, :func:`ood`,
:func:`shift`, :func:`run` (any registered task), :func:`battle` and :func:`report`; each takes a
cache as a path or a :class:`~backbench.store.Cache` (see :mod:`backbench.api`).

Four of these share their names with subpackages (``backbench.extract``, ``backbench.probe``,
``backbench.battle``, ``backbench.report``): as attributes of ``backbench`` they are the
functions; the subpackages are reached by import (``from backbench.extract import run``).
"""

import sys
import types

__version__ = "0.1.0"

from backbench.api import (TaskResult, battle, detect, extract, knn, ood, probe, report, retrieve, run,  # noqa: E402
                           segment, shift)
from backbench.api import cluster  # noqa: E402

__all__ = ["TaskResult", "battle", "detect", "extract", "knn", "ood", "probe", "report", "retrieve", "run", "segment",
           "shift", "__version__"]
__all__ += ["cluster"]
from backbench.api import zeroshot  # noqa: E402
__all__ += ["zeroshot"]
from backbench.api import text_retrieval  # noqa: E402
__all__ += ["text_retrieval"]


class _Package(types.ModuleType):
    """This package's module: importing a same-named subpackage does not replace an API function."""

    def __setattr__(self, name: str, value: object) -> None:
        if name in __all__ and isinstance(value, types.ModuleType):
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
