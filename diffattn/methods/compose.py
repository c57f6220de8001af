"""Combinations of the U-Net methods in one handle, and the one runner every U-Net method call goes through.

``"hidiffusion"`` is RAU-Net + MSW-MSA (HiDiffusion's default). Any other combination is named with
``+`` (``"hidiffusion+tome"``, ``"msw-msa+tome"``, ``"agent+tome"`` = AgentSD); the parts must be
pairwise compatible (``COMPATIBLE``): agent attention is global, so it does not combine with
windows, and a method combines with itself never. Options go to every part that has them (the
schedule fields, ``seed``); an option no part has raises with the valid ones.

One attention call runs the active stages in order (each part decides per call, ``call_active``):
window split (msw-msa) -> token merge (tome) -> core (agent attention, else softmax attention over
the windows / merged tokens) -> unmerge -> window join. Shapes: q, k, v ``[B, H, N, D]``.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import torch

from diffattn.core.context import AttnContext
from diffattn.core.options import resolve
from diffattn.methods.agent import Agent, agent_attention
from diffattn.methods.msw_msa import MswMsa
from diffattn.methods.rau_net import RauNet, RauPlan
from diffattn.methods.tome import Tome
from diffattn.methods.unet_base import GridMethod, call_generator
from diffattn.patterns import merge as merge_pattern

PARTS = {cls.name: cls for cls in (MswMsa, RauNet, Tome, Agent)}
NAMED = {"hidiffusion": ("rau-net", "msw-msa")}
COMPATIBLE = {frozenset(pair) for pair in (("rau-net", "msw-msa"), ("rau-net", "tome"), ("msw-msa", "tome"), ("agent", "tome"))}
COMBINATION_DEFAULTS = {frozenset(("agent", "tome")): {"ratio": 0.4}}  # AgentSD's ToMe ratio


def split_name(name: str) -> tuple[str, ...] | None:
    """The parts of a combined name (``"hidiffusion+tome"`` -> rau-net, msw-msa, tome), or None
    when ``name`` is not a combination of U-Net methods."""
    if not isinstance(name, str):
        return None
    pieces = [p.strip() for p in name.split("+")]
    parts: list[str] = []
    for piece in pieces:
        if piece in NAMED:
            parts.extend(NAMED[piece])
        elif piece in PARTS:
            parts.append(piece)
        else:
            return None
    if len(parts) < 2 and name not in NAMED:
        return None
    return tuple(parts)


def check_parts(name: str, parts: tuple[str, ...]) -> None:
    if len(set(parts)) != len(parts):
        raise ValueError(f"diffattn: {name!r} names a method twice ({list(parts)}); name each once")
    for i, a in enumerate(parts):
        for b in parts[i + 1:]:
            if frozenset((a, b)) not in COMPATIBLE:
                valid = sorted("+".join(sorted(p)) for p in COMPATIBLE)
                raise ValueError(
                    f"diffattn: {a!r} and {b!r} do not combine ({'agent attention is global; windows split the map' if {a, b} == {'agent', 'msw-msa'} else 'no paper runs them together'}); "
                    f"combinations that do: {valid} (and 'hidiffusion' = rau-net+msw-msa, 'hidiffusion+tome')"
                )


def _union_config(name: str, classes) -> type:
    """A frozen dataclass with every part's fields (first part's default wins): the options list."""
    seen: dict[str, tuple] = {}
    for cls in classes:
        for f in dataclasses.fields(cls.Config):
            if f.name not in seen:
                default = f.default if f.default is not dataclasses.MISSING else None
                seen[f.name] = (f.name, f.type, dataclasses.field(default=default, metadata=f.metadata))
    return dataclasses.make_dataclass(f"{name.title().replace('+', '').replace('-', '')}Config", list(seen.values()), frozen=True)


def composite_class(name: str, parts: tuple[str, ...]) -> type:
    """The method class of a combination (built on lookup; nothing is registered)."""
    check_parts(name, parts)
    classes = [PARTS[p] for p in parts]
    families = tuple(f for f in classes[0].FAMILIES if all(f in c.FAMILIES for c in classes[1:]))
    return type(
        "Composite", (Composite,),
        {"name": name, "PART_NAMES": parts, "FAMILIES": families, "Config": _union_config(name, classes),
         "__doc__": f"{name}: {' + '.join(parts)} in one handle."},
    )


class Composite:
    """Several U-Net methods in one handle (``composite_class`` makes the class of a name)."""

    name: ClassVar[str]
    PART_NAMES: ClassVar[tuple[str, ...]]
    FAMILIES: ClassVar[tuple[str, ...]]
    FAMILY_DEFAULTS: ClassVar[dict[str, dict[str, Any]]] = {}
    KNOBS: ClassVar[tuple[str, ...]] = ()
    Config: ClassVar[type]
    stage = "composite"

    def __init__(self, parts: list[GridMethod]):
        self.parts = parts
        values: dict[str, Any] = {}
        for part in reversed(parts):
            values.update(dataclasses.asdict(part.config))
        self.config = self.Config(**{k: v for k, v in values.items() if k in {f.name for f in dataclasses.fields(self.Config)}})

    @classmethod
    def from_options(cls, family: str, *, declared: dict | None = None, owners: dict | None = None, **options):
        resolve(cls.name, cls.Config, family, {}, options, owners=owners)  # unknown names raise here
        defaults = COMBINATION_DEFAULTS.get(frozenset(cls.PART_NAMES), {})
        parts = []
        for part_name in cls.PART_NAMES:
            part = PARTS[part_name]
            names = {f.name for f in dataclasses.fields(part.Config)}
            mine = {k: v for k, v in {**defaults, **options}.items() if k in names}
            parts.append(part.from_options(family, declared={k: v for k, v in (declared or {}).items() if k in names}, **mine))
        return cls(parts)

    @property
    def needs_step(self) -> bool:
        return any(p.needs_step for p in self.parts)

    @property
    def needs_block_input(self) -> bool:
        return any(p.needs_block_input for p in self.parts)

    def part(self, stage: str) -> GridMethod | None:
        return next((p for p in self.parts if p.stage == stage), None)

    def plan(self, ctx: AttnContext) -> RauPlan:
        rau = self.part("structure")
        return rau.plan(ctx) if rau is not None else RauPlan()

    def active(self, ctx: AttnContext) -> bool:
        return any(p.stage != "structure" and p.call_active(ctx) for p in self.parts)

    def check_layout(self, layout) -> None:
        for p in self.parts:
            p.check_layout(layout)

    def describe(self, layout, device):
        """U-Net methods have no block description: they run SDPA on windows or merged tokens."""
        raise NotImplementedError(f"{self.name} is not block-sparse: it has no block description (no mask to draw)")

    def __call__(self, q, k, v, ctx: AttnContext) -> torch.Tensor:
        return run_grid_methods(self.parts, q, k, v, ctx)

    def run_tokens(self, x, ctx: AttnContext, project, finish) -> torch.Tensor:
        return run_grid_tokens(self.parts, x, ctx, project, finish)

    def __repr__(self) -> str:
        return f"{self.name}({', '.join(repr(p) for p in self.parts)})"


def _merge_heads(plan, x: torch.Tensor) -> torch.Tensor:
    """``[B, H, N, D]`` -> ``[B, H, N', D]`` by one plan for every head."""
    b, h, n, d = x.shape
    return plan.merge(x.transpose(1, 2).reshape(b, n, h * d)).reshape(b, -1, h, d).transpose(1, 2)


def _unmerge_heads(plan, y: torch.Tensor) -> torch.Tensor:
    b, h, n, d = y.shape
    return plan.unmerge(y.transpose(1, 2).reshape(b, n, h * d)).reshape(b, -1, h, d).transpose(1, 2)


def run_grid_methods(parts, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ctx: AttnContext) -> torch.Tensor:
    """One attention call through the active stages; q, k, v ``[B, H, N, D]`` -> ``[B, H, N, D]``."""
    active = {p.stage: p for p in parts if p.stage != "structure" and p.call_active(ctx)}
    win, mer, core = active.get("window"), active.get("merge"), active.get("core")
    rows, cols = ctx.layout.rows, ctx.layout.cols
    n_full = rows * cols
    metric = ctx.block_input  # [B, N, C] or None
    wants_ranking = mer is not None or (core is not None and core.config.agents == "merge")
    if wants_ranking and metric is None:
        raise RuntimeError(f"diffattn {'+'.join(p.name for p in parts)}: the block input was not recorded; call the U-Net it was applied to")
    mask, shift_k = None, 0
    if win is not None:
        shift_k = win.shift_index(ctx)
        tensors = [q, k, v] + ([metric[:, None]] if metric is not None else [])  # metric as one head
        split, mask, (rows, cols) = win.split(tensors, rows, cols, shift_k)
        q, k, v = split[:3]
        metric = split[3][:, 0] if metric is not None else None
    n = rows * cols
    names = "+".join(p.name for p in active.values())
    if mask is not None and wants_ranking:
        ctx.note(f"diffattn {names}: odd window grid, token merging skipped on these calls (padded windows)")
        mer, core = None, None
    ranking, plan = None, None
    q_full = q
    if mer is not None or core is not None and core.config.agents == "merge":
        if core is not None and core.config.agents == "merge":
            ranking = mer_ranking(mer, core, metric, rows, cols, ctx)
        else:
            ranking = mer.ranking(metric, rows, cols, ctx)
    if mer is not None:
        plan = ranking.plan(mer.merged_count(n))
        q, k, v = (_merge_heads(plan, t) for t in (q, k, v))  # [B, H, N', D]
    merged = q.shape[-2]
    density = merged * merged / (n * n)
    agents = None
    if core is not None:
        if core.config.agents == "merge":
            agents = _merge_heads(ranking.plan(core.agent_count(n, ranking.src.numel())), q_full)  # [B, H, n_a, D]
        else:
            agents = core.pooled_agents(q_full, rows, cols)
    out, backend, density = _core(core, q, k, v, agents, mask, n, density, ctx, names)
    if plan is not None:
        out = _unmerge_heads(plan, out)
    if win is not None:
        density = density * 4 * n * n / (n_full * n_full)
        out = win.join(out, ctx.layout.rows, ctx.layout.cols, shift_k)
    ctx.record(ctx.site, mode="method", layout=ctx.layout, backend=backend, density=min(1.0, density))
    return out


def _core(core, q, k, v, agents, mask, n: int, density: float, ctx: AttnContext, names: str):
    """The core of one call: agent attention where 2 n_agents < N', else softmax attention.
    Returns (out ``[B', H, N', D]``, backend name, density of the score work)."""
    merged = q.shape[-2]
    if agents is not None and 2 * agents.shape[-2] < merged:
        out = agent_attention(q, k, v, agents, core.config.k2, core.config.k_shortcut, core.fp32)
        return out, "agent", 2 * agents.shape[-2] * merged / (n * n)
    if agents is not None:
        ctx.note(f"diffattn {names}: {agents.shape[-2]} agents for {merged} tokens (2n >= N'), plain attention on these calls")
    return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask), "sdpa", density  # [B', H, N', D]


def run_grid_tokens(parts, x: torch.Tensor, ctx: AttnContext, project, finish) -> torch.Tensor:
    """The fast path of one self-attention call, on the block's normalised tokens ``x [B, N, C]``.

    Windows and merges are token permutations and means, so they commute with the per-token q/k/v
    and output projections; here they run on ``x`` before the projections (one tensor instead of
    three, and ToMe saves projection work too, as tomesd does). ``project(x, "qkv")`` returns q, k, v
    ``[B, H, N, D]``, ``project(x, "q")`` the queries; ``finish(out [B, H, N, D])`` applies the output
    projection -> ``[B, N, C']``. ``run_grid_methods`` on q, k, v is its reference twin.
    """
    active = {p.stage: p for p in parts if p.stage != "structure" and p.call_active(ctx)}
    win, mer, core = active.get("window"), active.get("merge"), active.get("core")
    rows, cols = ctx.layout.rows, ctx.layout.cols
    n_full = rows * cols
    metric = ctx.block_input  # [B, N, C] or None
    merge_agents = core is not None and core.config.agents == "merge"
    if (mer is not None or merge_agents) and metric is None:
        raise RuntimeError(f"diffattn {'+'.join(p.name for p in parts)}: the block input was not recorded; call the U-Net it was applied to")
    mask, shift_k = None, 0
    if win is not None:
        shift_k = win.shift_index(ctx)
        (x_w,), mask, (rows, cols) = win.split([x[:, None]], rows, cols, shift_k)  # [4B, 1, n, C]
        x = x_w[:, 0]
        if metric is not None:
            (m_w,), _, _ = win.split([metric[:, None]], ctx.layout.rows, ctx.layout.cols, shift_k)
            metric = m_w[:, 0]
    n = rows * cols
    names = "+".join(p.name for p in active.values())
    if mask is not None and (mer is not None or merge_agents):
        ctx.note(f"diffattn {names}: odd window grid, token merging skipped on these calls (padded windows)")
        mer, core, merge_agents = None, None, False
    ranking = None
    if merge_agents:
        ranking = mer_ranking(mer, core, metric, rows, cols, ctx)
    elif mer is not None:
        ranking = mer.ranking(metric, rows, cols, ctx)
    plan = ranking.plan(mer.merged_count(n)) if mer is not None else None
    x_m = plan.merge(x) if plan is not None else x  # [B', N', C]
    q, k, v = project(x_m, "qkv")  # [B', H, N', D]
    merged = q.shape[-2]
    density = merged * merged / (n * n)
    agents = None
    if core is not None:
        if merge_agents:
            agents = project(ranking.plan(core.agent_count(n, ranking.src.numel())).merge(x), "q")  # [B', H, n_a, D]
        else:
            agents = core.pooled_agents(project(x, "q"), rows, cols)
    out, backend, density = _core(core, q, k, v, agents, mask, n, density, ctx, names)
    y = finish(out)  # [B', N', C']
    if plan is not None:
        y = plan.unmerge(y)
    if win is not None:
        density = density * 4 * n * n / (n_full * n_full)
        y = win.join(y[:, None], ctx.layout.rows, ctx.layout.cols, shift_k)[:, 0]
    ctx.record(ctx.site, mode="method", layout=ctx.layout, backend=backend, density=min(1.0, density))
    return y


def mer_ranking(mer, core, metric, rows: int, cols: int, ctx: AttnContext):
    """AgentSD: one ranking on the agents' (coarser) destination grid for both plans."""
    source = mer if mer is not None else core
    c = core.config
    rand = c.use_rand and metric.shape[0] % 2 == 0
    g = call_generator(source.config.seed, ctx, 2, "cpu") if rand else None
    return merge_pattern.rank(metric, rows, cols, c.sx, c.sy, g)
