"""Methods: ``method(q, k, v, ctx) -> out`` with q, k, v ``[B, H, S, D]``. They know nothing
about diffusers. One file per paper."""

from .clear import Clear, ClearConfig
from .neighborhood import NeighborhoodAttention, NeighborhoodConfig
from .radial import Radial, RadialConfig

# name -> method class; a static table, nothing registers itself at import time
METHODS = {cls.name: cls for cls in (Radial, NeighborhoodAttention, Clear)}

__all__ = ["METHODS", "Clear", "ClearConfig", "NeighborhoodAttention", "NeighborhoodConfig", "Radial", "RadialConfig"]
