"""The stock attention as a "method": never active, so every call runs the model's own dense path.

It is what ``diffattn.apply(pipe, "pag")`` (guidance alone, no attention method) installs: the
processors still run diffattn's code, which is where the guidance perturbation lives, and every
attention call is the stock one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from diffattn.core.context import AttnContext
from diffattn.core.layout import TokenLayout
from diffattn.core.schedule import ScheduleOptions


@dataclass(frozen=True)
class DenseConfig(ScheduleOptions):
    """No options: the model's own attention."""


class Dense:
    name: ClassVar[str] = "dense"
    Config = DenseConfig
    FAMILIES: ClassVar[tuple[str, ...]] = ()  # every family (the API does not check this method's families)
    FAMILY_DEFAULTS: ClassVar[dict] = {}
    KNOBS: ClassVar[tuple[str, ...]] = ()
    needs_step = False

    def __init__(self, config: DenseConfig | None = None):
        self.config = config or DenseConfig()

    def active(self, ctx: AttnContext) -> bool:
        return False

    def check_layout(self, layout: TokenLayout) -> None:
        """Any layout."""

    def describe(self, layout: TokenLayout, device):
        raise NotImplementedError("dense attention has no block description")

    def __call__(self, q, k, v, ctx):
        raise RuntimeError("diffattn: the dense stand-in never runs as a method (its calls run the stock attention)")

    def __repr__(self) -> str:
        return "Dense()"
