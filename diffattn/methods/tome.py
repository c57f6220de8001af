"""ToMe for SD: token merging before self-attention (Bolya & Hoffman, "Token Merging for Fast Stable
Diffusion", arXiv 2303.17604; dbolya/tomesd). research/hidiffusion_agent.md §5.

In every transformer block at a downsampling ``s <= max_downsample`` (1: the latent's resolution),
``ratio`` of the tokens are merged into their most similar destination (bipartite soft matching,
``diffattn.patterns.merge``; similarity on the block's input tokens, as tomesd), self-attention runs
on the remaining tokens and every merged token gets its group's output back. Merging and unmerging
are means and copies of rows, so they commute with the q/k/v and output projections: merging q, k
and v equals merging the block's normalised input (tomesd's order), and this runs inside the
attention processor.

Options as tomesd: ``ratio`` 0.5, ``max_downsample`` 1 (2 on SDXL, whose top attention level is
downsampled 2x: tomesd's 1 merges nowhere there), ``sx = sy = 2``, random destinations
(``use_rand``; off when the batch is odd, as tomesd does: cond and uncond not in one batch would get
different merges). ``ratio`` above ``1 - 1/(sx sy)`` (every source merged) raises, where tomesd caps
it silently.

Composes with ``msw-msa`` (merging inside each window), ``rau-net`` and ``agent`` (AgentSD: the
agents come from the same ranking; ``diffattn.apply(pipe, "agent+tome")``).

Where it pays: the merge costs a similarity matrix of (N - N/4) x N/4 per block; with flash SDPA the
attention saved only outweighs it at large maps (tomesd's own numbers: 1.01x at 512^2, 1.65x at
2048^2 with xFormers). RESULTS.md has ours.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from diffattn.core.checks import check_bool, check_int, check_number
from diffattn.core.context import AttnContext
from diffattn.core.schedule import ScheduleOptions
from diffattn.methods.unet_base import UNET_FAMILIES, GridMethod, StepWindow, call_generator, downsample_of
from diffattn.patterns import merge as pattern


@dataclass(frozen=True)
class TomeConfig(ScheduleOptions, StepWindow):
    """What ToMe computes (plus the schedule, step window and resolution guard).

    ratio:          fraction of the tokens merged away (0.5: about 2x fewer; at most 1 - 1/(sx sy)).
                    Higher is faster and blurrier.
    max_downsample: merge only where the map is downsampled at most this much (1, 2, 4 or 8; 1 =
                    the top level only, where almost all the attention cost is).
    sx, sy:         destination stride: one destination per sy x sx cell.
    use_rand:       random destination within each cell (tomesd's default); False = top-left.
    """

    ratio: float = field(default=0.5, metadata={"help": "fraction of tokens merged away before self-attention"})
    max_downsample: int = field(default=1, metadata={"help": "merge where the map is downsampled at most this much (1, 2, 4, 8)"})
    sx: int = field(default=2, metadata={"help": "destination stride along columns"})
    sy: int = field(default=2, metadata={"help": "destination stride along rows"})
    use_rand: bool = field(default=True, metadata={"help": "random destination in each cell (off for odd batches)"})

    def __post_init__(self):
        ScheduleOptions.__post_init__(self)
        self.check_window("tome")
        check_int("tome sx", self.sx, 1)
        check_int("tome sy", self.sy, 1)
        if self.sx * self.sy < 2:
            raise ValueError("tome: sx * sy must be >= 2 (one destination per cell of sx x sy tokens)")
        ratio = check_number("tome ratio", self.ratio, positive=False)
        limit = 1 - 1 / (self.sx * self.sy)
        if not 0.0 <= ratio <= limit:
            raise ValueError(
                f"tome ratio must be in [0, {limit:.3f}] with sx={self.sx}, sy={self.sy} (every source merged); "
                f"got ratio={ratio!r}; raise sx/sy to merge more"
            )
        if self.max_downsample not in (1, 2, 4, 8):
            raise ValueError(f"tome max_downsample must be one of 1, 2, 4, 8, got max_downsample={self.max_downsample!r}")
        check_bool("tome use_rand", self.use_rand)


class Tome(GridMethod):
    """Merge stage: the plan for this call, from the block input's ranking."""

    name = "tome"
    Config = TomeConfig
    # SDXL's first attention level is already downsampled 2x (its first level has no attention): 1
    # there (tomesd's default) would merge nowhere
    FAMILY_DEFAULTS = {family: dict(max_downsample=2 if family.startswith("sdxl") else 1) for family in UNET_FAMILIES}
    stage = "merge"
    needs_block_input = True

    @property
    def steps_random(self) -> bool:
        return self.config.use_rand

    def call_active(self, ctx: AttnContext) -> bool:
        if downsample_of(ctx) > self.config.max_downsample or self.config.ratio == 0:
            return False
        rows, cols = ctx.layout.rows, ctx.layout.cols
        if rows // self.config.sy == 0 or cols // self.config.sx == 0:
            return False
        return super().call_active(ctx)

    def ranking(self, metric, rows: int, cols: int, ctx: AttnContext, sx: int | None = None, sy: int | None = None):
        """The bipartite ranking of ``metric [B, N, C]`` on this call's grid."""
        c = self.config
        sx, sy = sx or c.sx, sy or c.sy
        rand = c.use_rand and metric.shape[0] % 2 == 0
        g = call_generator(c.seed, ctx, 2, "cpu") if rand else None
        return pattern.rank(metric, rows, cols, sx, sy, g)

    def merged_count(self, n: int) -> int:
        return int(n * self.config.ratio)
