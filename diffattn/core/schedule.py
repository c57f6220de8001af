"""One schedule for every method: which denoising steps and which layers run the method, and which
run the model's stock dense attention.

Every method config inherits ``ScheduleOptions`` (the three user-facing fields); ``Schedule`` is the
frozen object the handle and the processors ask. A dense call runs the stock diffusers attention
path unchanged, so a schedule that is dense everywhere reproduces the stock pipeline bit for bit.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .checks import check_int


@dataclass(frozen=True)
class ScheduleOptions:
    """The schedule fields every method config carries (mixin; all have defaults).

    dense_steps:      first denoising steps run dense. More keeps the layout of the output closer to
                      dense; fewer is faster (radial's paper: 12 of 50 on Wan).
    last_dense_steps: last denoising steps run dense; 1 helps few-step LoRAs. Needs the number of
                      steps, so ``apply`` on the pipeline (not the bare model).
    dense_layers:     first layers (the adapter's numbering) run dense.
    """

    dense_steps: int = field(default=0, metadata={"help": "first denoising steps run dense"})
    last_dense_steps: int = field(default=0, metadata={"help": "last denoising steps run dense"})
    dense_layers: int = field(default=0, metadata={"help": "first transformer layers run dense"})

    def __post_init__(self):
        check_int("dense_steps", self.dense_steps)
        check_int("last_dense_steps", self.last_dense_steps)
        check_int("dense_layers", self.dense_layers)

    @property
    def schedule(self) -> "Schedule":
        return Schedule(self.dense_steps, self.last_dense_steps, self.dense_layers)


@dataclass(frozen=True)
class Schedule:
    dense_steps: int = 0
    last_dense_steps: int = 0
    dense_layers: int = 0

    @property
    def needs_step(self) -> bool:
        """Whether decisions depend on the denoising step (else the layout hook never reads it)."""
        return self.dense_steps > 0 or self.last_dense_steps > 0

    def layer_active(self, layer: int) -> bool:
        return layer >= self.dense_layers

    def step_active(self, step: int, num_steps: int | None) -> bool:
        if step < self.dense_steps:
            return False
        if self.last_dense_steps:
            if num_steps is None:
                raise ValueError(
                    "last_dense_steps needs the number of denoising steps: apply diffattn to the pipeline "
                    "(not the bare model), or set last_dense_steps=0"
                )
            if step >= num_steps - self.last_dense_steps:
                return False
        return True

    def active(self, step: int, num_steps: int | None, layer: int) -> bool:
        return self.layer_active(layer) and self.step_active(step, num_steps)
