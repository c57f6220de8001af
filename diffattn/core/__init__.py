"""The small shared core: token layout, per-call context, the schedule, options, the protocols,
the handle that owns per-run state, and argument checks. Every layer may import from here;
nothing here imports a higher layer."""

from .context import AttnContext
from .handle import Handle, RunState
from .layout import TokenLayout
from .protocols import Adapter, Backend, ElementRule, Method
from .schedule import Schedule, ScheduleOptions

__all__ = [
    "Adapter", "AttnContext", "Backend", "ElementRule", "Handle", "Method", "RunState", "Schedule",
    "ScheduleOptions", "TokenLayout",
]
