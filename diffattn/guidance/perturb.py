"""The weak branch's tensor maths, with the dense reference twins the tests compare against.

Processors hold diffusers' ``[B, S, heads, D]``; these functions take that layout (rows of the weak
batch only). ``blend_identity`` is the fused SoftPAG/PAG/HeadHunter form ``(1 - u_h) O_h + u_h V_h``
(research/guidance.md §3.3); ``identity_blend_reference`` builds the N x N map ``(1 - u) A + u I``
the reference code builds, for small sizes only. ``blur_queries`` is SEG's Gaussian over the token
grid; ``blur_reference`` writes the same blur as one dense matrix per axis.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from diffattn.core.layout import TokenLayout


def blend_identity(out: torch.Tensor, value: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """out, value ``[B, S, heads, D]``, u ``[heads]`` -> ``(1 - u) out + u value`` per head."""
    u = u.to(device=out.device, dtype=torch.float32)[None, None, :, None]  # [1, 1, heads, 1]
    return ((1.0 - u) * out.float() + u * value.float()).to(out.dtype)


def identity_blend_reference(q, k, v, u, scale: float | None = None) -> torch.Tensor:
    """q, k, v ``[B, S, heads, D]`` -> ``A' V`` with ``A' = (1 - u_h) softmax(q k^T) + u_h I``, in fp32."""
    q, k, v = (t.float().transpose(1, 2) for t in (q, k, v))  # [B, heads, S, D]
    scale = scale if scale is not None else q.shape[-1] ** -0.5
    attn = torch.softmax(q @ k.transpose(-1, -2) * scale, dim=-1)  # [B, heads, S, S]
    eye = torch.eye(q.shape[-2], dtype=attn.dtype)
    w = torch.as_tensor(u, dtype=attn.dtype)[None, :, None, None]
    return (((1 - w) * attn + w * eye) @ v).transpose(1, 2)  # [B, S, heads, D]


def _kernel_1d(sigma: float, n: int, device) -> torch.Tensor | None:
    """SEG's Gaussian: size ceil(6 sigma) rounded up to odd, its half-width capped at n - 1 (reflect
    padding); None when the axis has one token."""
    if n == 1:
        return None
    size = math.ceil(6 * sigma)
    size = size + 1 - size % 2
    half = min(size // 2, n - 1)
    x = torch.arange(-half, half + 1, dtype=torch.float32, device=device)
    w = torch.exp(-0.5 * (x / sigma) ** 2)
    return w / w.sum()


def _blur_axis(x: torch.Tensor, dim: int, sigma: float) -> torch.Tensor:
    """Blur ``x`` (fp32) along ``dim``: the mean for sigma = inf, else the reflect-padded Gaussian."""
    n = x.shape[dim]
    if sigma <= 0 or n == 1:
        return x
    if math.isinf(sigma):
        return x.mean(dim, keepdim=True).expand_as(x)
    w = _kernel_1d(sigma, n, x.device)
    moved = x.movedim(dim, -1)
    shape = moved.shape
    flat = moved.reshape(-1, 1, n)  # [rows, 1, n]
    half = w.numel() // 2
    flat = F.conv1d(F.pad(flat, (half, half), mode="reflect"), w.view(1, 1, -1))
    return flat.reshape(shape).movedim(-1, dim)


def _grid_view(q: torch.Tensor, layout: TokenLayout):
    if q.shape[1] != layout.seq_len:
        raise ValueError(f"seg: {q.shape[1]} query tokens but the layout {layout!r} has {layout.seq_len}; SEG needs "
                         "the call's token grid")
    start = layout.video_start
    return start, start + layout.video_tokens


def blur_queries(q: torch.Tensor, layout: TokenLayout, sigma: float, frame_sigma: float = 0.0,
                 heads: torch.Tensor | None = None) -> torch.Tensor:
    """q ``[B, S, heads, D]`` with its video tokens blurred over (rows, cols) by ``sigma`` and over
    frames by ``frame_sigma`` (tokens; inf = mean); text tokens unchanged. ``heads`` [heads] bool:
    only those heads (None: all)."""
    start, stop = _grid_view(q, layout)
    b, _, h, d = q.shape
    video = q[:, start:stop].float().reshape(b, layout.frames, layout.rows, layout.cols, h, d)  # [B, F, Y, X, heads, D]
    video = _blur_axis(_blur_axis(video, 2, sigma), 3, sigma)
    video = _blur_axis(video, 1, frame_sigma).reshape(b, stop - start, h, d).to(q.dtype)
    if heads is not None:
        video = torch.where(heads.to(q.device)[None, None, :, None], video, q[:, start:stop])
    return torch.cat([q[:, :start], video, q[:, stop:]], dim=1)


def _blur_matrix(n: int, sigma: float) -> torch.Tensor:
    """[n, n]: row i holds the weights of token i's blurred value (reflect padding folded in)."""
    if sigma <= 0 or n == 1:
        return torch.eye(n)
    if math.isinf(sigma):
        return torch.full((n, n), 1.0 / n)
    w = _kernel_1d(sigma, n, "cpu")
    half = w.numel() // 2
    m = torch.zeros(n, n)
    for i in range(n):
        for j, wj in zip(range(i - half, i + half + 1), w.tolist()):
            jj = -j if j < 0 else (2 * (n - 1) - j if j >= n else j)  # reflect without repeating the edge
            m[i, jj] += wj
    return m


def blur_reference(q: torch.Tensor, layout: TokenLayout, sigma: float, frame_sigma: float = 0.0) -> torch.Tensor:
    """``blur_queries`` as one dense [S, S] operator (Kronecker product of the per-axis blurs), fp32."""
    start, stop = _grid_view(q, layout)
    op = torch.kron(torch.kron(_blur_matrix(layout.frames, frame_sigma), _blur_matrix(layout.rows, sigma)),
                    _blur_matrix(layout.cols, sigma))  # [N, N] video tokens
    full = torch.eye(q.shape[1])
    full[start:stop, start:stop] = op
    return torch.einsum("st,bthd->bshd", full, q.float())
