"""The handle returned by ``diffattn.apply``: it owns every piece of per-run state.

State that lives here and nowhere else:
- the original attention processors of each model it installed on, restored by ``remove()``;
- the forward pre-hooks that record the token layout and denoising step before each forward;
- the run state (layout, step index, number of steps) shared by every transformer of a pipeline;
- the cache of block masks and compiled kernels, keyed by everything each entry depends on.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Callable, Hashable

import torch

from .layout import TokenLayout

logger = logging.getLogger("diffattn")

HANDLE_ATTR = "_diffattn_handle"


@dataclass
class RunState:
    """Where the current pipeline call is. Written by the layout hook before every forward."""

    layout: TokenLayout | None = None
    step: int = 0
    num_steps: int | None = None
    last_timestep: float | None = None

    def observe_timestep(self, timestep: float) -> None:
        """Step tracking without a scheduler: timesteps fall within one pipeline call.

        A repeated value is the same step (CFG runs the transformer twice per step); a smaller one
        is the next step; a larger one starts a new pipeline call.
        """
        if self.last_timestep is None or timestep > self.last_timestep:
            self.step = 0
        elif timestep < self.last_timestep:
            self.step += 1
        self.last_timestep = timestep


@dataclass
class _Installed:
    model: torch.nn.Module
    original_processors: dict[str, Any]
    hook: torch.utils.hooks.RemovableHandle


class Handle:
    """Per-run state of one ``apply``. Also a context manager: leaving the block removes it."""

    def __init__(self, method_name: str, method: Any, family: str, scheduler: Any = None):
        self.method_name = method_name
        self.method = method
        self.family = family
        self.scheduler = scheduler
        self.state = RunState()
        self._installed: list[_Installed] = []
        self._cache: dict[Hashable, Any] = {}
        self._notes: set[str] = set()
        self.removed = False

    # -- installation (used by the API layer) --------------------------------------------------
    def attach(self, model: torch.nn.Module, original_processors: dict[str, Any], hook) -> None:
        setattr(model, HANDLE_ATTR, self)
        self._installed.append(_Installed(model, original_processors, hook))

    @property
    def models(self) -> list[torch.nn.Module]:
        return [entry.model for entry in self._installed]

    def remove(self) -> None:
        """Restore the original processors and drop hooks and caches. Safe to call twice."""
        if self.removed:
            return
        for entry in self._installed:
            entry.hook.remove()
            entry.model.set_attn_processor(dict(entry.original_processors))
            if getattr(entry.model, HANDLE_ATTR, None) is self:
                delattr(entry.model, HANDLE_ATTR)
        self._installed.clear()
        self._cache.clear()
        self.removed = True

    def __enter__(self) -> "Handle":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()

    # -- per-run state ----------------------------------------------------------------------------
    def begin_forward(self, layout: TokenLayout, timestep: torch.Tensor | float | None) -> None:
        """Record layout and step before a transformer forward."""
        state = self.state
        state.layout = layout
        index = getattr(self.scheduler, "step_index", None) if self.scheduler is not None else None
        has_scheduler_index = self.scheduler is not None and hasattr(self.scheduler, "step_index")
        if has_scheduler_index:
            # step_index is None until the first scheduler.step() of a call, then counts steps.
            begin = getattr(self.scheduler, "begin_index", None) or 0
            state.step = (index if index is not None else begin) - begin
            timesteps = getattr(self.scheduler, "timesteps", None)
            state.num_steps = len(timesteps) - begin if timesteps is not None else None
        elif timestep is not None:
            value = float(timestep.max()) if torch.is_tensor(timestep) else float(timestep)
            state.observe_timestep(value)

    def cache(self, key: Hashable, build: Callable[[], Any]) -> Any:
        """Cached value for ``key`` (which names every input it depends on), built on first use."""
        if key not in self._cache:
            self._cache[key] = build()
        return self._cache[key]

    def note_once(self, message: str) -> None:
        """Log a declared fallback once per handle."""
        if message not in self._notes:
            self._notes.add(message)
            logger.info(message)

    def __repr__(self) -> str:
        names = [type(m).__name__ for m in self.models]
        status = "removed" if self.removed else "active"
        return f"Handle(method={self.method_name!r}, family={self.family!r}, models={names}, {status})"
