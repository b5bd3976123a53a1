"""The Zarr feature cache."""

from backbench.store.cache import Cache, default_cache_path
from backbench.store.group import FeatureGroup

__all__ = ["Cache", "FeatureGroup", "default_cache_path"]
