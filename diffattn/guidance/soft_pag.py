"""SoftPAG (HeadHunter paper §4.2; research/guidance.md §3): the attention map of the chosen heads
is blended toward the identity, ``A' = (1 - u) A + u I``.

Because the output is linear in the map, ``A' V = (1 - u) O + u V``: the method's own kernel (dense,
radial, neighborhood, CLEAR...) runs as usual and the chosen heads are blended with V afterwards
(§3.3). No N x N map is ever formed. u = 1 is PAG; u = 0 is no perturbation (refused: it would make
the extra forward pointless).
"""

from __future__ import annotations

from dataclasses import dataclass

from .base import GuidanceConfig, Perturbation, check_heads


def check_u(name: str, u) -> float:
    if isinstance(u, bool) or not isinstance(u, (int, float)) or not 0.0 < float(u) <= 1.0:
        raise ValueError(f"{name}: u must be in (0, 1] (0 = no perturbation, 1 = PAG's identity), got u={u!r}")
    return float(u)


@dataclass(frozen=True)
class SoftPagConfig(GuidanceConfig):
    """SoftPAG: ``u`` (0.5: the paper's FID optimum, Fig. 11, and its advice to lower u to about 0.5
    after a search at 1.0), ``heads`` (None: every head of each chosen layer; a list: those heads in
    every chosen layer), ``scale`` and ``layers`` as PAG."""

    name = "soft-pag"

    u: float = 0.5
    heads: tuple[int, ...] | None = None

    def __post_init__(self):
        super().__post_init__()
        object.__setattr__(self, "u", check_u(self.name, self.u))
        if self.heads is not None:
            heads = (self.heads,) if isinstance(self.heads, int) else tuple(self.heads)
            if not heads:
                raise ValueError(f"{self.name}: heads=() perturbs nothing; pass None for every head")
            object.__setattr__(self, "heads", heads)

    def perturbation(self, layer: int, heads: int) -> Perturbation:
        if self.heads is None:
            return Perturbation("blend", (self.u,) * heads)
        check_heads(self.name, layer, self.heads, heads)
        return Perturbation("blend", tuple(self.u if h in self.heads else 0.0 for h in range(heads)))
