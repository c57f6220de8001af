"""Methods: ``method(q, k, v, ctx) -> out`` with q, k, v ``[B, H, S, D]``. They know nothing
about diffusers. One file per paper; ``compose`` combines the U-Net methods in one handle."""

from .agent import Agent, AgentConfig
from .clear import Clear, ClearConfig
from .compose import Composite, composite_class, split_name
from .msw_msa import MswMsa, MswMsaConfig
from .neighborhood import NeighborhoodAttention, NeighborhoodConfig
from .radial import Radial, RadialConfig
from .rau_net import RauNet, RauNetConfig
from .tome import Tome, TomeConfig

# name -> method class; a static table, nothing registers itself at import time
METHODS = {cls.name: cls for cls in (Radial, NeighborhoodAttention, Clear, MswMsa, RauNet, Tome, Agent)}
METHODS["hidiffusion"] = composite_class("hidiffusion", split_name("hidiffusion"))


def method_class(name: str):
    """The class of ``name``: a method of ``METHODS`` or a ``+`` combination of U-Net methods
    (``"hidiffusion+tome"``, ``"agent+tome"``); None when it is neither."""
    if name in METHODS:
        return METHODS[name]
    parts = split_name(name)
    return composite_class(name, parts) if parts else None


__all__ = [
    "METHODS", "Agent", "AgentConfig", "Clear", "ClearConfig", "Composite", "MswMsa", "MswMsaConfig", "NeighborhoodAttention",
    "NeighborhoodConfig", "Radial", "RadialConfig", "RauNet", "RauNetConfig", "Tome", "TomeConfig", "method_class",
]
