"""Element rules: the per-(query, key) rule a description's partial blocks evaluate.

A rule is a frozen dataclass of named parameters with
- ``kind`` and ``kernel_id`` (its branch in ``kernels/triton/rules.py``),
- ``pack()``: the parameters as ints in the order the Triton branch reads them,
- ``mask(q_idx, kv_idx)``: the torch twin, used by the SDPA backend on broadcast index tensors and
  by the Flex backend as a ``mask_mod`` (scalar tensors), so every backend runs the same rule.

Adding a rule: one file here (dataclass + twin), one branch in ``kernels/triton/rules.py``, and an
entry in ``RULES``; the BackendTester then checks every backend against the fp32 reference.
"""

from .circle import CircleRule, TiledCircleRule
from .grid import GridRule
from .neighborhood import NeighborhoodRule, TiledNeighborhoodRule, window

RULES = {rule.kind: rule for rule in (NeighborhoodRule, TiledNeighborhoodRule, CircleRule, TiledCircleRule)}  # static table

__all__ = ["RULES", "CircleRule", "GridRule", "NeighborhoodRule", "TiledCircleRule", "TiledNeighborhoodRule", "window"]
