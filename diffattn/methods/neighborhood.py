"""Neighborhood attention (NATTEN semantics; Hassani et al., "Neighborhood Attention Transformer",
"Faster Neighborhood Attention" arXiv 2403.04690, "Generalized Neighborhood Attention" (GNA,
stride) arXiv 2504.16922) on the ``(F, Y, X)`` latent grid of a video DiT.

Every video query attends to a ``kernel_size`` window of video keys around it (clamped inward at
the borders, so every query sees exactly the window), with GNA ``stride`` (queries of a stride group
share their leader's window), ``dilation`` and ``causal`` dimensions (research/neighborhood.md §2).
Text tokens of joint attention are global both ways (§4.3): text queries see every key and every
video query sees all text keys; padded text keys are masked. The pattern is exact at the token
level: the kernel lists the blocks the windows touch and evaluates the rule per element in the
blocks that are not fully inside (``diffattn.rules.neighborhood``).

Defaults (``kernel_size=None``): the family's preset, rescaled to the grid of each call the way
Cosmos-Predict2 does (research §4.2: window = round(w * extent / base), clamped to [2, extent];
stride = round(s * extent / base), clamped to [1, window]):
- HunyuanVideo: window (18, 24, 24), stride (16, 8, 8) on a (30, 48, 80) grid: the GNA paper's
  training-free HunyuanVideo setting (research §3.2, about 91 % sparse).
- Wan2.1 / Wan2.2: the same relative extent and stride on Wan's 720p grid (21, 45, 80): window
  (13, 23, 24), stride (11, 8, 8). No published Wan preset exists; this carries the one published
  training-free video setting over by grid fraction.
- SkyReels-V2 (a Wan2.1 fine-tune), LTX-Video and LTX-2 (its video stream): Wan's preset by grid fraction.
- HunyuanVideo-1.5, Mochi and CogVideoX: HunyuanVideo's preset by grid fraction (both joint MM-DiTs with full 3-D attention).
- FLUX.1 / FLUX.2 / SD3 (images, 2-D): window (80, 80), stride (16, 16) on FLUX's 4K grid (256, 256), the
  GNA paper's FLUX setting (research §3.2, about 90 % sparse), rescaled to each grid (FLUX.2 and
  SD3 share it: the same 16-px tokens).
The first ``dense_steps`` steps run dense (STA and radial keep early steps dense; 12 of 50, as
radial) and on Wan the first layer (Cosmos keeps one dense layer in its 14B model); on images the
first 6 steps (about a quarter of FLUX-dev's default 28).

Deviations from NATTEN: none in the pattern; text handling follows research §4.3 (NATTEN's
additional KV) but masks padded text instead of trimming it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from diffattn.core.layout import TokenLayout
from diffattn.core.schedule import ScheduleOptions
from diffattn.methods.base import BlockSparseMethod
from diffattn.patterns import neighborhood as nb_pattern
from diffattn.patterns.blocks import BlockSparsity

# family -> (base grid (F, Y, X), window, stride): research/neighborhood.md §3.2 and the module docstring
PRESETS = {
    "hunyuan_video": ((30, 48, 80), (18, 24, 24), (16, 8, 8)),
    "wan2.1": ((21, 45, 80), (13, 23, 24), (11, 8, 8)),
    "wan2.2": ((21, 45, 80), (13, 23, 24), (11, 8, 8)),
    "hunyuan_video15": ((30, 48, 80), (18, 24, 24), (16, 8, 8)),  # HunyuanVideo's, by grid fraction
    "mochi": ((30, 48, 80), (18, 24, 24), (16, 8, 8)),  # HunyuanVideo's GNA setting by grid fraction
    "cogvideox": ((30, 48, 80), (18, 24, 24), (16, 8, 8)),  # HunyuanVideo's GNA setting by grid fraction
    "skyreels_v2": ((21, 45, 80), (13, 23, 24), (11, 8, 8)),  # Wan2.1's
    "ltx": ((21, 45, 80), (13, 23, 24), (11, 8, 8)),  # Wan's by grid fraction
    "ltx2": ((21, 45, 80), (13, 23, 24), (11, 8, 8)),  # Wan's by grid fraction (the video self-attention)
    "flux": ((1, 256, 256), (1, 80, 80), (1, 16, 16)),
    "flux2": ((1, 256, 256), (1, 80, 80), (1, 16, 16)),
    "sd3": ((1, 256, 256), (1, 80, 80), (1, 16, 16)),
}


def _per_dim(name: str, value, kind):
    """None, one value or three (F, Y, X); ints >= 1 (kind int) or bools (kind bool)."""
    if value is None:
        return None
    values = (value,) if isinstance(value, (int, bool)) else tuple(value) if isinstance(value, (tuple, list)) else None
    if values is None or len(values) not in (1, 3):
        raise ValueError(f"neighborhood {name} must be one value or three (F, Y, X), got {name}={value!r}")
    for v in values:
        if kind is bool and not isinstance(v, bool):
            raise ValueError(f"neighborhood {name} must be True/False per dimension, got {name}={value!r}")
        if kind is int and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
            raise ValueError(f"neighborhood {name} must be ints >= 1, got {name}={value!r}")
    return value if isinstance(value, (int, bool)) else tuple(values)


def rescale(preset, layout: TokenLayout) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(window, stride) of a family preset on ``layout``'s grid (Cosmos-Predict2's rule)."""
    base, window, stride = preset
    kernel, strides = [], []
    for extent, b, w, s in zip((layout.frames, layout.rows, layout.cols), base, window, stride):
        if extent == 1:
            kernel.append(1)
            strides.append(1)
            continue
        k = min(max(round(w * extent / b), 2), extent)
        kernel.append(k)
        strides.append(min(max(round(s * extent / b), 1), k))
    return tuple(kernel), tuple(strides)


@dataclass(frozen=True)
class NeighborhoodConfig(ScheduleOptions):
    """What neighborhood attention computes (plus the shared schedule).

    kernel_size: window per dimension (F, Y, X), one int for all, or None for the family preset
                 rescaled to the grid. Larger is denser and closer to dense; the GNA preset keeps
                 about 10-20 % of the keys.
    stride:      GNA stride: queries in a stride group share one window. Larger strides make more
                 tiles fully dense or empty (faster, same window size); <= kernel_size. None: the
                 preset's with the preset window, else 1.
    dilation:    keys every ``dilation`` tokens (a wider, sparser window); kernel * dilation <= grid.
    causal:      per dimension, keys only up to the query (causal time: ``(True, False, False)``).
    """

    kernel_size: int | tuple[int, int, int] | None = field(default=None, metadata={"help": "window (F, Y, X) or one int; default: the family preset rescaled to the grid", "nargs": "+"})
    stride: int | tuple[int, int, int] | None = field(default=None, metadata={"help": "GNA stride (F, Y, X) or one int, <= kernel size", "nargs": "+"})
    dilation: int | tuple[int, int, int] = field(default=1, metadata={"help": "dilation (F, Y, X) or one int", "nargs": "+"})
    causal: bool | tuple[bool, bool, bool] = field(default=False, metadata={"help": "causal per dimension (F, Y, X) or one bool", "nargs": "+"})

    def __post_init__(self):
        super().__post_init__()
        k = _per_dim("kernel_size", self.kernel_size, int)
        s = _per_dim("stride", self.stride, int)
        d = _per_dim("dilation", self.dilation, int)
        c = _per_dim("causal", self.causal, bool)
        if d is None or c is None:
            raise ValueError("neighborhood dilation and causal need a value (1 and False are the defaults)")
        if s is not None and k is None:
            raise ValueError("neighborhood stride needs kernel_size too (the family preset sets both); pass kernel_size=...")
        if k is not None and s is not None:
            ks = (k,) * 3 if isinstance(k, int) else k
            ss = (s,) * 3 if isinstance(s, int) else s
            for dim, kk, st in zip("FYX", ks, ss):
                if st > kk:
                    raise ValueError(f"neighborhood stride must be <= kernel_size, got {dim}: stride {st} > kernel {kk}")
        for name, value in (("kernel_size", k), ("stride", s), ("dilation", d), ("causal", c)):
            object.__setattr__(self, name, value)


class NeighborhoodAttention(BlockSparseMethod):
    """``method(q, k, v, ctx) -> out`` with q, k, v ``[B, H, S, D]``."""

    name = "neighborhood"
    Config = NeighborhoodConfig
    FAMILIES = ("wan2.1", "wan2.2", "skyreels_v2", "hunyuan_video", "hunyuan_video15", "mochi", "cogvideox", "ltx", "ltx2", "flux", "flux2", "sd3")
    FAMILY_DEFAULTS = {
        "hunyuan_video15": dict(dense_steps=12, dense_layers=0),
        "mochi": dict(dense_steps=12, dense_layers=0),
        "cogvideox": dict(dense_steps=12, dense_layers=0),
        "skyreels_v2": dict(dense_steps=12, dense_layers=1),
        "ltx": dict(dense_steps=12, dense_layers=1),
        "ltx2": dict(dense_steps=7, dense_layers=1),  # 7 of LTX2Pipeline's 30 default steps (radial's 12 of 50)
        "flux": dict(dense_steps=6, dense_layers=0),
        "flux2": dict(dense_steps=6, dense_layers=0),
        "sd3": dict(dense_steps=6, dense_layers=0),
        "wan2.1": dict(dense_steps=12, dense_layers=1),
        "wan2.2": dict(dense_steps=11, dense_layers=1),
        "hunyuan_video": dict(dense_steps=12, dense_layers=0),
    }
    KNOBS = ("backend", "precision", "block_m", "block_n", "reorder", "tile")

    def __init__(self, config: NeighborhoodConfig, *, backend: str = "auto", precision: str | None = None, block_m: int = 128, block_n: int = 128,
                 reorder: bool = False, tile: tuple[int, int, int] | None = None, family: str = "wan2.1"):
        """Performance knobs (the pattern is exact with any of them):

        reorder: put q, k, v in 3-D tile order (NATTEN's token permutation) so that blocks are boxes
                 of the grid and more listed blocks are full (no element rule); the order is undone on
                 the output. It pays for GNA windows whose stride is the tile (queries of a tile share
                 one window, so most blocks are full or absent): Wan-14B 720p attention, window
                 (9, 24, 48) stride (1, 8, 16), 45.8 ms in tile order against 76.8 ms row-major, gather
                 and scatter included (H200, benchmarks/RESULTS.md 2026-12-03). Off by default: for
                 plain 3-D windows tile order pads the grid and computes more (77.1 against 73.8 ms at
                 (9, 23, 40)).
        tile:    the tile shape (tf, ty, tx) with reorder (default: of 128 tokens, least padding).
        block_m / block_n: block edges without reorder (with reorder a block is one tile). 128 x 128
                 measured fastest with the two-instruction bit select (Wan-14B 720p attention forward,
                 H200, 2026-12-03: temporal window 56.2 against 68.4 ms at 128 x 64, 3-D (9, 23, 40)
                 70.5 against 73.8 ms, the preset 102.3 against 108.5 ms; whole forward 1.73x against
                 1.71x dense) despite a few % more computed area. Forward only: the backward at
                 128 x 128 is not timed.
        """
        super().__init__(config, backend=backend, precision=precision)
        for name, value in (("block_m", block_m), ("block_n", block_n)):
            if value not in (16, 32, 64, 128):
                raise ValueError(f"neighborhood {name} must be one of 16, 32, 64, 128, got {name}={value!r}")
        if not isinstance(reorder, bool):
            raise ValueError(f"neighborhood reorder must be True or False, got reorder={reorder!r}")
        if tile is not None:
            tile = tuple(tile)
            volume = tile[0] * tile[1] * tile[2] if len(tile) == 3 and all(isinstance(v, int) and v >= 1 for v in tile) else 0
            if volume not in (16, 32, 64, 128):
                raise ValueError(f"neighborhood tile must be three ints whose product is 16, 32, 64 or 128, got tile={tile!r}")
        self.block_m, self.block_n = block_m, block_n
        self.reorder, self.tile = reorder, tile
        self.preset = PRESETS.get(family)

    @classmethod
    def family_knobs(cls, family: str) -> dict:
        return {"family": family}

    def knob_key(self) -> tuple:
        return (self.block_m, self.block_n, self.reorder, self.tile, self.preset)

    def tiling(self, layout: TokenLayout) -> nb_pattern.Tiling | None:
        if not self.reorder:
            return None
        return nb_pattern.choose_tiling(layout, 128, self.tile)

    def spec(self, layout: TokenLayout) -> nb_pattern.Neighborhood:
        """The window parameters on ``layout`` (the preset rescaled when kernel_size is None)."""
        c = self.config
        kernel, stride = c.kernel_size, c.stride
        if kernel is None:
            if self.preset is None:
                raise ValueError("neighborhood: no preset for this model family; pass kernel_size=...")
            kernel, stride = rescale(self.preset, layout)
        try:
            return nb_pattern.spec(layout, kernel, stride if stride is not None else 1, c.dilation, c.causal)
        except ValueError as exc:
            raise ValueError(
                f"{exc} on the grid (F, Y, X) = {(layout.frames, layout.rows, layout.cols)} of this call; "
                "pass a smaller kernel_size / dilation (or kernel_size=None for the rescaled family preset)"
            ) from None

    def check_layout(self, layout: TokenLayout) -> None:
        self.spec(layout)

    def describe(self, layout: TokenLayout, device) -> BlockSparsity:
        """The description in the order the kernel sees (tile order with ``reorder``)."""
        tiling = self.tiling(layout)
        if tiling is not None:
            return nb_pattern.tiled_block_sparsity(layout, self.spec(layout), tiling, device=device)
        return nb_pattern.block_sparsity(layout, self.spec(layout), block_m=self.block_m, block_n=self.block_n, device=device)

    def token_order(self, layout: TokenLayout, device):
        tiling = self.tiling(layout)
        if tiling is None:
            return None
        gather, valid, scatter = nb_pattern.tile_order(layout, tiling, device)
        extra = tiling.padded_tokens - layout.video_tokens  # padding before the text in tile order
        return gather, scatter, extra

    def text_key_start(self, layout: TokenLayout) -> int | None:
        tiling = self.tiling(layout)
        if tiling is None or not layout.text_tokens:
            return super().text_key_start(layout)
        return tiling.padded_tokens  # text follows the tiles

    def reference_mask(self, layout: TokenLayout):
        """Token-level ``[S, S]`` twin for tests."""
        return nb_pattern.token_mask(layout, self.spec(layout))
