"""Model adapters: one module per diffusers model family (imported as ``diffattn.pipelines``)."""

from . import hunyuan_video, wan

# diffusers model class name -> adapter module; a static table, nothing registers at import time
ADAPTERS = {name: module for module in (wan, hunyuan_video) for name in module.MODEL_CLASSES}
FAMILIES = tuple(family for module in (wan, hunyuan_video) for family in module.FAMILIES)

__all__ = ["ADAPTERS", "FAMILIES", "hunyuan_video", "wan"]
