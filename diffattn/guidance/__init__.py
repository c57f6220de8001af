"""Training-free guidance: PAG, SoftPAG, HeadHunter, STG, SEG (research/guidance.md).

Each is a frozen config describing one weak branch; ``guide(name, **options)`` builds one. The
branch itself (the extra forward, batched with CFG or as its own call, the combination with the
pipeline's output, the shared prefix) runs in ``diffattn.pipelines.guidance``; the perturbation
runs inside diffattn's processors, so it composes with every attention method.

    diffattn.apply(pipe, "soft-pag", u=0.5, scale=3.0)                     # stock attention + SoftPAG
    diffattn.apply(pipe, "radial", guidance="soft-pag")                    # radial + SoftPAG, one handle
    diffattn.apply(pipe, "radial", guidance=diffattn.guide("pag", layers=[8], steps=(0, 0.5)))
    diffattn.apply(pipe, "pag", guidance=[diffattn.guide("seg")])          # two weak branches
"""

from __future__ import annotations

from dataclasses import fields

from .base import GuidanceConfig, ModelInfo, Perturbation, Plan
from .headhunter import HeadHunterConfig, load_heads
from .pag import PagConfig
from .seg import SegConfig
from .soft_pag import SoftPagConfig
from .stg import StgConfig

# name -> config class; a static table
GUIDANCE = {cls.name: cls for cls in (PagConfig, SoftPagConfig, HeadHunterConfig, StgConfig, SegConfig)}


def guide(name: str, **options) -> GuidanceConfig:
    """The config of guidance ``name`` with ``options`` (validated; layer and head ranges are checked
    against the model when it is applied)."""
    cls = GUIDANCE.get(name)
    if cls is None:
        raise ValueError(f"diffattn: unknown guidance {name!r}; choose from {sorted(GUIDANCE)}")
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(options) - known)
    if unknown:
        raise ValueError(f"{name}: unknown option(s) {unknown}; valid options are {sorted(known)}")
    return cls(**options)


def as_guidance(value) -> list[GuidanceConfig]:
    """``guidance=`` of ``apply``: a name, a config, a ``{"name": ..., **options}`` dict, or a list of them."""
    if value is None:
        return []
    items = list(value) if isinstance(value, (list, tuple)) else [value]
    out = []
    for item in items:
        if isinstance(item, GuidanceConfig):
            out.append(item)
        elif isinstance(item, str):
            out.append(guide(item))
        elif isinstance(item, dict) and "name" in item:
            out.append(guide(item["name"], **{k: v for k, v in item.items() if k != "name"}))
        else:
            raise ValueError(f"diffattn: guidance= takes a name {sorted(GUIDANCE)}, diffattn.guide(...), a dict with 'name', "
                             f"or a list of them; got {item!r}")
    return out


__all__ = ["GUIDANCE", "GuidanceConfig", "HeadHunterConfig", "ModelInfo", "PagConfig", "Perturbation", "Plan", "SegConfig",
           "SoftPagConfig", "StgConfig", "as_guidance", "guide", "load_heads"]
