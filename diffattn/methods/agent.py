"""Agent attention for Stable Diffusion U-Nets, training-free (Han et al., "Agent Attention: On the
Integration of Softmax and Linear Attention", arXiv 2312.08874; AgentSD in LeapLabTHU/Agent-Attention).
research/hidiffusion_agent.md §4. Written from the formulas (the reference has no licence).

n agent tokens A mediate two small softmax attentions instead of one N x N one (per head, dim d):

    V_A = softmax(A K^T d^-1/2) V            # agents gather            [n, d]
    O   = softmax(Q A^T d^-k2/2) V_A + k_s V  # tokens read the agents  [N, d]

with AgentSD's training-free settings: no agent biases and no depthwise conv (both need training),
the sharper second softmax (``k2`` = 0.3) and a small identity shortcut (``k_s`` = 0.075). Agents:
- "merge" (AgentSD): a ToMe merge of the queries from the bipartite ranking on the block input,
  aggressive enough to leave n = N - min(#sources, N agent_ratio) tokens (sx = sy = 4,
  agent_ratio 0.95: every source merged, n = N/16);
- "pool" (the paper's): adaptive average pooling of the query map to ``pool`` x ``pool`` cells
  (default ``None``: a quarter of the map per side, n = N/16 as "merge").
Agents run only where 2 n < N' (N' the tokens after ToMe when composed with it), only where the
map is downsampled at most ``max_downsample`` and, by default, only in the first 40 % of the steps
(``end=0.4``; AgentSD re-patches to plain ToMe at step 20 of 50). ``fp32`` runs both logit products
in float32 (recommended for SD 2.x, whose fp16 logits overflow; the family default there).

``diffattn.apply(pipe, "agent+tome", ratio=0.4)`` is AgentSD's recipe: ToMe merges 40 % of the
tokens and the agents come from the same ranking; after ``end`` ToMe alone runs (its own sx/sy).
No dense setting exists (an approximation): the tests check it against the formula written out
densely.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field

import torch

from diffattn.core.checks import check_bool, check_choice, check_int, check_number
from diffattn.core.context import AttnContext
from diffattn.core.schedule import ScheduleOptions
from diffattn.methods.unet_base import UNET_FAMILIES, GridMethod, StepWindow, downsample_of

AGENTS = ("merge", "pool")


@dataclass(frozen=True)
class AgentConfig(ScheduleOptions, StepWindow):
    """What agent attention computes (plus the schedule, step window and resolution guard).

    agents:         "merge" (AgentSD: merged queries) or "pool" (the paper: pooled queries).
    agent_ratio:    "merge": fraction of tokens merged away to make the agents (0.95: n = N/16 at sx = sy = 4).
    pool:           "pool": agents on a pool x pool grid (None: ceil(Y/4) x ceil(X/4)).
    sx, sy:         "merge": destination stride of the agents' ranking.
    k2:             temperature exponent of the second softmax (scale d^-k2/2); 1 = standard.
    k_shortcut:     weight of the identity shortcut on V.
    fp32:           logits in float32 (None: the family default, on for SD 2.x).
    max_downsample: agents where the map is downsampled at most this much (1 = the top level).
    """

    agents: str = field(default="merge", metadata={"help": "agent tokens: merge (AgentSD) or pool (paper)"})
    agent_ratio: float = field(default=0.95, metadata={"help": "merge agents: fraction of tokens merged away"})
    pool: int | None = field(default=None, metadata={"help": "pool agents: grid side (None = a quarter of the map)"})
    sx: int = field(default=4, metadata={"help": "merge agents: destination stride along columns"})
    sy: int = field(default=4, metadata={"help": "merge agents: destination stride along rows"})
    k2: float = field(default=0.3, metadata={"help": "second softmax scale exponent (d^-k2/2)"})
    k_shortcut: float = field(default=0.075, metadata={"help": "identity shortcut weight on V"})
    fp32: bool | None = field(default=None, metadata={"help": "logits in float32 (None: on for SD 2.x)"})
    max_downsample: int = field(default=1, metadata={"help": "agents where the map is downsampled at most this much"})
    use_rand: bool = field(default=True, metadata={"help": "merge agents: random destination in each cell"})

    def __post_init__(self):
        ScheduleOptions.__post_init__(self)
        self.check_window("agent")
        check_choice("agent agents", self.agents, AGENTS)
        ratio = check_number("agent agent_ratio", self.agent_ratio)
        if not 0 < ratio < 1:
            raise ValueError(f"agent agent_ratio must be in (0, 1), got agent_ratio={ratio!r}")
        if self.pool is not None:
            check_int("agent pool", self.pool, 1)
        check_int("agent sx", self.sx, 1)
        check_int("agent sy", self.sy, 1)
        check_number("agent k2", self.k2)
        check_number("agent k_shortcut", self.k_shortcut, positive=False)
        if self.fp32 is not None:
            check_bool("agent fp32", self.fp32)
        if self.max_downsample not in (1, 2, 4, 8):
            raise ValueError(f"agent max_downsample must be one of 1, 2, 4, 8, got max_downsample={self.max_downsample!r}")
        check_bool("agent use_rand", self.use_rand)


def agent_attention(q, k, v, agents, k2: float, k_shortcut: float, fp32: bool) -> torch.Tensor:
    """q, k, v ``[B, H, N, D]``, agents ``[B, H, n, D]`` -> ``[B, H, N, D]`` (two SDPA calls)."""
    d = q.shape[-1]
    dtype = q.dtype
    if fp32:
        q, k, v, agents = (t.float() for t in (q, k, v, agents))
    with torch.autocast(q.device.type, enabled=False) if fp32 else contextlib.nullcontext():
        gathered = torch.nn.functional.scaled_dot_product_attention(agents, k, v)  # [B, H, n, D], scale d^-1/2
        out = torch.nn.functional.scaled_dot_product_attention(q, agents, gathered, scale=d ** (-k2 / 2))  # [B, H, N, D]
    return (out + k_shortcut * v).to(dtype)


def agent_reference(q, k, v, agents, k2: float, k_shortcut: float) -> torch.Tensor:
    """The formula written out densely in fp32 (the twin of ``agent_attention``)."""
    q, k, v, a = (t.double() for t in (q, k, v, agents))
    d = q.shape[-1]
    gathered = torch.softmax(a @ k.transpose(-1, -2) / math.sqrt(d), -1) @ v
    return torch.softmax(q @ a.transpose(-1, -2) * d ** (-k2 / 2), -1) @ gathered + k_shortcut * v


class Agent(GridMethod):
    """Core stage: replaces the softmax attention of the call by agent attention."""

    name = "agent"
    Config = AgentConfig
    stage = "core"
    # SDXL's first attention level is downsampled 2x: max_downsample 2 there reaches it (as tome)
    FAMILY_DEFAULTS = {family: dict(end=0.4, max_downsample=2 if family.startswith("sdxl") else 1) for family in UNET_FAMILIES}

    @property
    def needs_block_input(self) -> bool:
        return self.config.agents == "merge"

    @property
    def steps_random(self) -> bool:
        return self.config.agents == "merge" and self.config.use_rand

    @property
    def fp32(self) -> bool:
        return self.config.fp32 if self.config.fp32 is not None else self.family == "sd2.1"

    def call_active(self, ctx: AttnContext) -> bool:
        if downsample_of(ctx) > self.config.max_downsample:
            return False
        return super().call_active(ctx)

    def pooled_agents(self, q: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
        """``[B, H, N, D]`` queries -> ``[B, H, n, D]`` agents by adaptive average pooling of the map."""
        b, h, _, d = q.shape
        p = self.config.pool
        size = (min(p, rows), min(p, cols)) if p is not None else (-(-rows // 4), -(-cols // 4))
        grid = q.reshape(b * h, rows, cols, d).permute(0, 3, 1, 2)  # [BH, D, Y, X]
        pooled = torch.nn.functional.adaptive_avg_pool2d(grid.float(), size).to(q.dtype)  # [BH, D, ay, ax]
        return pooled.flatten(2).transpose(1, 2).reshape(b, h, -1, d)

    def agent_count(self, n: int, sources: int) -> int:
        """Merged-away count of the agents' plan: n - agents."""
        return min(sources, int(n * self.config.agent_ratio))
