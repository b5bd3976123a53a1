"""Moved to :mod:`backbench.extract.datasets` (one module per data source); this re-export
remains until the last importer (``battle/config.py``, ``split_spec``) points there."""

from backbench.extract.datasets import (CsvSource, Digits, HFDatasetSource, ImageFolder, ImageSource, Textures,
                                        TorchvisionSource, WebDatasetSource, open_source, split_spec)

__all__ = ["CsvSource", "Digits", "HFDatasetSource", "ImageFolder", "ImageSource", "Textures", "TorchvisionSource",
           "WebDatasetSource", "open_source", "split_spec"]
