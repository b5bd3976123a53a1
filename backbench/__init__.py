"""backbench: which pretrained vision backbone should I build on?"""

__version__ = "0.1.0"
