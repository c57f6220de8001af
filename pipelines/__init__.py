"""Model adapters: one module per diffusers model family (imported as ``diffattn.pipelines``)."""

from . import cogvideox, flux, flux2, hunyuan_video, hunyuan_video15, ltx, ltx2, mochi, sd3, skyreels_v2, unet, wan

# diffusers model class name -> adapter module; a static table, nothing registers at import time
ADAPTERS = {name: module for module in (wan, skyreels_v2, hunyuan_video, hunyuan_video15, mochi, cogvideox, ltx, ltx2, flux, flux2, sd3, unet) for name in module.MODEL_CLASSES}
FAMILIES = tuple(family for module in (wan, skyreels_v2, hunyuan_video, hunyuan_video15, mochi, cogvideox, ltx, ltx2, flux, flux2, sd3, unet) for family in module.FAMILIES)

__all__ = ["ADAPTERS", "FAMILIES", "cogvideox", "flux", "flux2", "hunyuan_video", "hunyuan_video15", "ltx", "ltx2", "mochi", "sd3", "skyreels_v2", "unet", "wan"]
