"""Methods: ``method(q, k, v, ctx) -> out`` with q, k, v ``[B, H, S, D]``. They know nothing
about diffusers. One file per paper."""

from .radial import Radial, RadialConfig

# name -> method class; a static table, nothing registers itself at import time
METHODS = {"radial": Radial}

__all__ = ["METHODS", "Radial", "RadialConfig"]
