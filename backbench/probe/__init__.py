"""Probes on cached features: linear, few-shot, kNN, retrieval, OOD."""
