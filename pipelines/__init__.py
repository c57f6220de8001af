"""Model adapters: one module per diffusers model family (imported as ``diffattn.pipelines``)."""

from . import hunyuan_video, wan

# diffusers model class name -> adapter module; a static table, nothing registers at import time
ADAPTERS = {name: module for module in (wan, hunyuan_video) for name in module.MODEL_CLASSES}

__all__ = ["ADAPTERS", "hunyuan_video", "wan"]
