"""The small shared core: token layout, per-call context, the handle that owns per-run state,
and argument checks. Every layer may import from here; nothing here imports a higher layer."""

from .context import AttnContext
from .handle import Handle, RunState
from .layout import TokenLayout

__all__ = ["AttnContext", "Handle", "RunState", "TokenLayout"]
