"""CLEAR's circle rule (research/clear.md §1.2): an image token sees the image tokens of its own
frame with (y_q - y_k)^2 + (x_q - x_k)^2 < r^2 (strict, Euclidean, clipped, no wrap)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .grid import GridRule


@dataclass(frozen=True)
class CircleRule(GridRule):
    radius_sq: int = 1  # r^2 in tokens

    kind = "circle"
    kernel_id = 2

    def pack(self) -> tuple[int, ...]:
        # order read by kernels/triton/rules.py `_circle`: grid, then r^2
        return (*self.pack_grid(), self.radius_sq)

    def mask(self, q_idx: torch.Tensor, kv_idx: torch.Tensor) -> torch.Tensor:
        def video(cq, ck):
            dy, dx = cq[1] - ck[1], cq[2] - ck[2]
            return (cq[0] == ck[0]) & (dy * dy + dx * dx < self.radius_sq)

        return self.with_text(q_idx, kv_idx, video)
