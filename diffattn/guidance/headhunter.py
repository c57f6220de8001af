"""HeadHunter runtime (Ahn et al., NeurIPS 2025, "Where and How to Perturb"; research/guidance.md §2).

The unit of perturbation is one attention head: the weak model blends exactly the listed
``(layer, head)`` pairs toward the identity with weight ``u`` (SoftPAG's blend, §3.3), every other
head and layer untouched. A dense ``table`` [layers][heads] of weights is the general form (one u
per head). Head lists come from an offline search (``diffattn headhunter``, Algorithm 1: greedy,
top-k per round, scored by a user objective); no lists are published for any model (§2.5), so they
are searched per model and objective. The search's JSON output loads with ``heads="heads.json"``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from .base import GuidanceConfig, ModelInfo, Perturbation, Plan, check_heads, check_layers
from .soft_pag import check_u


def load_heads(path) -> tuple[tuple[int, int], ...]:
    """The ``(layer, head)`` list of a head-search result (``{"heads": [[l, h], ...]}``) or a plain
    JSON list of pairs."""
    data = json.loads(Path(path).read_text())
    pairs = data.get("heads") if isinstance(data, dict) else data
    if pairs is None:
        raise ValueError(f"headhunter: {path} has no 'heads' list (write it with `diffattn headhunter`)")
    return normal_heads(pairs)


def normal_heads(pairs) -> tuple[tuple[int, int], ...]:
    try:
        out = tuple((int(l), int(h)) for l, h in pairs)
    except (TypeError, ValueError):
        raise ValueError(f"headhunter: heads must be (layer, head) pairs, got heads={pairs!r}") from None
    if len(set(out)) != len(out):
        raise ValueError(f"headhunter: repeated (layer, head) pairs in heads={pairs!r}")
    return out


@dataclass(frozen=True)
class HeadHunterConfig(GuidanceConfig):
    """HeadHunter: ``heads`` (pairs ``[(layer, head), ...]`` or the path of a search's JSON),
    ``u`` (0.5: the paper searches at 1.0 and then lowers u to about 0.5 against over-saturation,
    App. B), or ``table`` ([layers][heads] weights in [0, 1], instead of heads and u), ``scale``
    (3.0, the paper's search and Tab. 1 value on SD3)."""

    name = "headhunter"

    heads: object = None
    u: float = 0.5
    table: object = None

    def __post_init__(self):
        super().__post_init__()
        object.__setattr__(self, "u", check_u(self.name, self.u))
        if self.layers is not None:
            raise ValueError("headhunter: the heads name their layers; pass heads=[(layer, head), ...], not layers=")
        if (self.heads is None) == (self.table is None):
            raise ValueError("headhunter: pass heads=[(layer, head), ...] (or a search's JSON path) or table=[[u, ...], ...], one of them")
        if self.heads is not None:
            heads = load_heads(self.heads) if isinstance(self.heads, (str, Path)) else normal_heads(self.heads)
            if not heads:
                raise ValueError("headhunter: heads=[] perturbs nothing; name at least one (layer, head)")
            object.__setattr__(self, "heads", heads)
        else:
            table = tuple(tuple(float(w) for w in row) for row in self.table)
            if any(not 0.0 <= w <= 1.0 for row in table for w in row) or not any(w for row in table for w in row):
                raise ValueError("headhunter: table weights must be in [0, 1] with at least one > 0")
            object.__setattr__(self, "table", table)

    def plan(self, info: ModelInfo) -> Plan:
        weights: dict[int, list[float]] = {}
        if self.table is not None:
            if len(self.table) != info.layers:
                raise ValueError(f"headhunter: table has {len(self.table)} rows but the model has {info.layers} attention layers")
            for layer, row in enumerate(self.table):
                if len(row) != info.heads[layer]:
                    raise ValueError(f"headhunter: table row {layer} has {len(row)} weights but layer {layer} has {info.heads[layer]} heads")
                if any(row):
                    weights[layer] = list(row)
        else:
            check_layers(self.name, sorted({l for l, _ in self.heads}), info)
            for layer, head in self.heads:
                check_heads(self.name, layer, [head], info.heads[layer])
                weights.setdefault(layer, [0.0] * info.heads[layer])[head] = self.u
        return Plan(self.name, {l: Perturbation("blend", tuple(w)) for l, w in sorted(weights.items())})
