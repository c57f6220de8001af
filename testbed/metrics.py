"""Image / video similarity for comparing a method's samples with the dense ones."""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """PSNR in dB of arrays in [0, 1] (inf when identical)."""
    mse = float(((np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)) ** 2).mean())
    return float("inf") if mse == 0 else 10 * math.log10(1.0 / mse)


def ssim(a: np.ndarray, b: np.ndarray) -> float:
    """Mean SSIM (11x11 Gaussian window, sigma 1.5, per channel) of images ``[..., H, W, 3]`` in [0, 1]."""
    if np.shape(a) != np.shape(b) or np.shape(a)[-1] != 3 or np.ndim(a) < 3:
        raise ValueError(f"ssim: need two arrays of the same shape [..., H, W, 3], got {np.shape(a)} and {np.shape(b)}")
    x = torch.from_numpy(np.ascontiguousarray(a)).float().reshape(-1, *np.shape(a)[-3:]).permute(0, 3, 1, 2)
    y = torch.from_numpy(np.ascontiguousarray(b)).float().reshape(-1, *np.shape(b)[-3:]).permute(0, 3, 1, 2)
    g = torch.exp(-((torch.arange(11) - 5.0) ** 2) / (2 * 1.5**2))
    w = (g[:, None] * g[None, :] / g.sum() ** 2).expand(3, 1, 11, 11).contiguous()

    def blur(t):
        return F.conv2d(t, w, groups=3)

    mx, my = blur(x), blur(y)
    vx, vy, cxy = blur(x * x) - mx**2, blur(y * y) - my**2, blur(x * y) - mx * my
    c1, c2 = 0.01**2, 0.03**2
    s = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx**2 + my**2 + c1) * (vx + vy + c2))
    return float(s.mean())
