"""What the dense-probe tests share: a stand-in for MapArray and one torch thread per module."""

from __future__ import annotations

import numpy as np
import pytest


class SlicedMaps:
    """What MapArray offers the probes, and nothing more: len, shape and row slices as float32."""

    def __init__(self, maps: np.ndarray) -> None:
        self._maps, self.shape, self.reads = maps, maps.shape, []

    def __len__(self) -> int:
        return len(self._maps)

    def __getitem__(self, key):
        if not isinstance(key, slice) or key.step not in (None, 1):
            raise TypeError(f"only contiguous row slices, got {key!r}")
        self.reads.append((key.start, key.stop))
        return np.array(self._maps[key], dtype=np.float32)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One torch thread for every fit of the module that imports this (its results are compared
    bit for bit, and torch's sums depend on the thread count); the fits are tiny and the two
    cores are shared."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
