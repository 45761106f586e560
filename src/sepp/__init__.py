"""sepp: self-supervised visual representation learning with semantic positive pairs."""

__version__ = "0.1.0"
