"""Every method's fast paths vs its token-level reference (tests/testers.py MethodTester)."""

import pytest

from diffattn.core.layout import TokenLayout
from testers import MethodTester

pytestmark = pytest.mark.cpu


class TestRadialMethod(MethodTester):
    method = "radial"
    cases = [
        (TokenLayout(7, 8, 8), dict(block_size=32, decay=0.5, sink=True)),
        (TokenLayout(6, 16, 16, 12, "after"), dict(block_size=64, decay=0.3, sink=False)),
        (TokenLayout(5, 7, 9), dict(block_size=16, decay=0.4)),            # frames cut blocks, tail
        (TokenLayout(3, 5, 6, 7, "after"), dict(block_size=16, decay=1.0)),  # unaligned text
        (TokenLayout(4, 6, 6, 9, "before"), dict(block_size=16, decay=0.4)),  # CogVideoX: text first
    ]
    full_cases = [(TokenLayout(4, 16, 16), dict(block_size=64, decay=1000.0))]


class TestNeighborhoodMethod(MethodTester):
    method = "neighborhood"
    cases = [
        (TokenLayout(5, 8, 8), dict(kernel_size=(3, 3, 5))),
        (TokenLayout(4, 9, 7, 6, "after"), dict(kernel_size=(2, 4, 3), stride=(1, 2, 3))),  # even kernel, GNA
        (TokenLayout(6, 8, 10), dict(kernel_size=3, dilation=(1, 2, 3))),
        (TokenLayout(5, 6, 6, 5, "after"), dict(kernel_size=(3, 3, 3), causal=(True, False, False))),
        (TokenLayout(1, 12, 13), dict(kernel_size=5, stride=2)),  # an image grid: F = 1 is not windowed
        (TokenLayout(8, 16, 16), dict()),  # the Wan preset rescaled to the testbed grid
        (TokenLayout(4, 9, 7, 6, "after"), dict(kernel_size=(2, 4, 3), stride=(1, 2, 3), reorder=True)),  # tile order
        (TokenLayout(5, 6, 6, 5, "after"), dict(kernel_size=3, dilation=(1, 2, 1), block_m=32, block_n=16)),
    ]
    full_cases = [(TokenLayout(3, 5, 7, 4, "after"), dict(kernel_size=(3, 5, 7)))]


class TestClearMethod(MethodTester):
    method, family = "clear", "flux"
    cases = [
        (TokenLayout(1, 12, 13, 5, "before"), dict(radius=4)),                       # FLUX: text first, tile order
        (TokenLayout(1, 12, 13, 5, "before"), dict(radius=4, reorder=False, block_m=32, block_n=16)),
        (TokenLayout(1, 11, 9, 6, "after"), dict(radius=3)),                         # SD3: text after, padded keys
        (TokenLayout(1, 10, 14, 4, "before"), dict(radius=5, down_factor=3)),         # pooled branch, tile order
        (TokenLayout(1, 10, 14, 4, "before"), dict(radius=5, down_factor=4, reorder=False, block_m=16, block_n=16)),
        (TokenLayout(1, 9, 16), dict(radius=2, tile=(1, 4, 8))),                     # no text, forced tile
    ]
    full_cases = [(TokenLayout(1, 6, 7, 3, "before"), dict(radius=8))]
