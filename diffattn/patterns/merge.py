"""Token merging by bipartite soft matching on a (Y, X) grid (ToMe for SD, research/hidiffusion_agent.md §5.2).

Per call, with tokens ``x [B, N, C]`` on a ``rows x cols`` grid:
1. destination tokens: one per ``sy x sx`` cell of the ``(rows // sy) x (cols // sx)`` cells (a random
   position in the cell from ``generator``, else the cell's top-left); every other token (leftover
   rows and columns included) is a source;
2. similarity: cosine between each source and each destination, on the ``metric`` tokens (ToMe uses
   the block input); each source takes its best destination;
3. the ``r`` sources with the highest best-score are merged (mean, the destination's own value
   included); the rest stay. Merged order: ``[unmerged sources..., destinations...]``, N - r tokens;
4. unmerge copies each group's output back to every member: N tokens again.

``agents(r_agents)`` is AgentSD's second plan from the same ranking (a more aggressive merge whose
tokens are the agents). Sorting is stable, so ties resolve by token order (deterministic).

Reference twin: ``Plan.matrices()`` gives the dense merge (``[B, N', N]`` averaging weights) and
unmerge (``[B, N, N']`` one-hot) matrices; ``merge``/``unmerge`` equal multiplying by them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


def split_indices(rows: int, cols: int, sx: int, sy: int, generator: torch.Generator | None, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(src ``[Ns]``, dst ``[Nd]``) token indices of the bipartite split, each in token order."""
    cy, cx = rows // sy, cols // sx
    if cy == 0 or cx == 0:
        raise ValueError(f"tome: the {rows} x {cols} grid has no full {sy} x {sx} cell; use smaller sx/sy")
    if generator is not None:
        pick = torch.randint(sy * sx, (cy, cx), generator=generator, device=generator.device).to(device)
    else:
        pick = torch.zeros(cy, cx, dtype=torch.int64, device=device)
    # the picked token of each cell, as a grid position
    ys = (torch.arange(cy, device=device)[:, None] * sy + pick // sx).reshape(-1)
    xs = (torch.arange(cx, device=device)[None, :] * sx + pick % sx).reshape(-1)
    is_dst = torch.zeros(rows * cols, dtype=torch.bool, device=device)
    is_dst[ys * cols + xs] = True
    tokens = torch.arange(rows * cols, device=device)
    return tokens[~is_dst], tokens[is_dst]


@dataclass(frozen=True)
class Plan:
    """One merge plan. Indices are ``[B, *]`` int64; ``src``/``dst`` the split (shared by the batch)."""

    n: int  # tokens before merging
    src: torch.Tensor  # [Ns] source token indices
    dst: torch.Tensor  # [Nd] destination token indices
    unm: torch.Tensor  # [B, Ns - r] positions (in src) of unmerged sources
    merged: torch.Tensor  # [B, r] positions (in src) of merged sources
    target: torch.Tensor  # [B, r] positions (in dst) they merge into

    @property
    def r(self) -> int:
        return self.merged.shape[1]

    @property
    def merged_len(self) -> int:
        return self.n - self.r

    def merge(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, N, C]`` -> ``[B, N - r, C]`` (mean over each group)."""
        b, _, c = x.shape
        src, dst = x[:, self.src], x[:, self.dst]  # [B, Ns, C], [B, Nd, C]
        unm = src.gather(1, self.unm[..., None].expand(b, -1, c))
        moved = src.gather(1, self.merged[..., None].expand(b, -1, c))
        dst = dst.scatter_reduce(1, self.target[..., None].expand(b, -1, c), moved, reduce="mean", include_self=True)
        return torch.cat([unm, dst], dim=1)

    def unmerge(self, y: torch.Tensor) -> torch.Tensor:
        """``[B, N - r, C]`` -> ``[B, N, C]``: every token gets its group's row."""
        b, _, c = y.shape
        k = self.unm.shape[1]
        unm, dst = y[:, :k], y[:, k:]
        out = y.new_zeros(b, self.n, c)
        out[:, self.dst] = dst
        out.scatter_(1, self.src[self.unm][..., None].expand(b, -1, c), unm)
        out.scatter_(1, self.src[self.merged][..., None].expand(b, -1, c), dst.gather(1, self.target[..., None].expand(b, -1, c)))
        return out

    def groups(self) -> torch.Tensor:
        """``[B, N]`` index (0 .. N - r - 1) of the merged token each token belongs to."""
        b = self.unm.shape[0]
        k = self.unm.shape[1]
        out = torch.empty(b, self.n, dtype=torch.int64, device=self.src.device)
        out[:, self.dst] = k + torch.arange(self.dst.numel(), device=out.device)
        out.scatter_(1, self.src[self.unm], torch.arange(k, device=out.device).expand(b, -1))
        out.scatter_(1, self.src[self.merged], k + self.target)
        return out

    def matrices(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(merge ``[B, N', N]`` averaging weights, unmerge ``[B, N, N']`` one-hot), fp32."""
        one_hot = torch.nn.functional.one_hot(self.groups(), self.merged_len).float()  # [B, N, N']
        merge = one_hot.transpose(1, 2)
        return merge / merge.sum(-1, keepdim=True), one_hot


@dataclass(frozen=True)
class Ranking:
    """The similarity ranking of one call; plans for any number of merged sources come from it."""

    n: int
    src: torch.Tensor
    dst: torch.Tensor
    order: torch.Tensor  # [B, Ns] sources by best score, descending (stable)
    best: torch.Tensor  # [B, Ns] best destination of each source

    def plan(self, r: int) -> Plan:
        r = max(0, min(int(r), self.src.numel()))
        merged = self.order[:, :r]
        return Plan(self.n, self.src, self.dst, self.order[:, r:], merged, self.best.gather(1, merged))


def rank(metric: torch.Tensor, rows: int, cols: int, sx: int, sy: int, generator: torch.Generator | None = None) -> Ranking:
    """The bipartite ranking of ``metric [B, N, C]`` (N = rows * cols) for ``plan(r)``."""
    b, n, _ = metric.shape
    if n != rows * cols:
        raise ValueError(f"tome: {n} tokens do not form the {rows} x {cols} grid")
    src, dst = split_indices(rows, cols, sx, sy, generator, metric.device)
    m = metric.float()
    m = m / m.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    scores = m[:, src] @ m[:, dst].transpose(1, 2)  # [B, Ns, Nd] cosine
    value, best = scores.max(dim=-1)  # [B, Ns]
    order = torch.sort(value, dim=-1, descending=True, stable=True).indices
    return Ranking(n, src, dst, order, best)
