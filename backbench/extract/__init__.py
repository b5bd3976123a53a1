"""Backbones, data sources and the extraction loop."""
