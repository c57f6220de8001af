"""U-Net adapter (``UNet2DConditionModel``: SD 1.5, SD 2.1, SDXL, SDXL-Turbo; their text-to-image,
img2img and inpainting pipelines).

Methods replace the self-attention ``attn1`` of every transformer block (down, mid, up, numbered
in that order as layers 0..); cross-attention ``attn2`` keeps its processor (IP-adapter processors
included). A U-Net attends at several resolutions in one forward: the layout hook records the
latent ``[B, C, H, W]`` of the forward, and each call derives its own grid from its token count
(downsampling s = round(sqrt(H W / N)), grid ceil(H / s) x ceil(W / s), so odd sizes and RAU-Net's
shrunk maps are found too). CFG batches are kept whole (cond and uncond in one batch share every
choice); pipelines that call the U-Net twice per step get the same choices per step.

Levels (``levels``): 0 is the highest-resolution level that has attention (SD: ``down_blocks.0``
with ``up_blocks.3``; SDXL: ``down_blocks.1`` with ``up_blocks.1``), counting down to the mid block.

RAU-Net (``structural_steps``) goes through named forward hooks only, each undone by ``remove()``:
the downsampler conv after the RAD level sees every other row and column (= stride 4, padding 2,
dilation 2 on the full input), the first attention of the pooling level's down block is followed by
2 x 2 average pooling and the mirrored up block's attention before the full-size skip by a bicubic
restore, and every upsampler is handed the size of the skip it meets. The per-forward sizes live in
the handle's run state and are cleared before each forward, so an exception mid-call leaves nothing
behind. ControlNet pipelines are refused for RAU-Net (their residuals have the unshrunk sizes).

``Processor`` mirrors ``AttnProcessor2_0`` of diffusers 0.42.1 for self-attention; any call it
cannot reproduce (a mask, ``spatial_norm``/``group_norm``, 4-D input) runs the stock processor.
"""

from __future__ import annotations

import dataclasses
import math

import torch

from diffattn.core.context import AttnContext
from diffattn.core.handle import ForwardHook, OutputHook
from diffattn.core.layout import TokenLayout
from diffattn.guidance.perturb import blend_identity, blur_queries

from .base import DiffattnProcessor

MODEL_CLASSES = ("UNet2DConditionModel",)
FAMILIES = ("sd1.5", "sd2.1", "sdxl", "sdxl-turbo")
STOCK_PROCESSORS = ("AttnProcessor2_0", "AttnProcessor")
BLOCK_CHAIN = False  # resnets and samplers sit between the transformer blocks: guidance cannot share a prefix


def family(model, pipe=None) -> str:
    name = str(getattr(pipe, "name_or_path", "") or getattr(getattr(model, "config", None), "_name_or_path", "") or "")
    if getattr(model.config, "addition_embed_type", None) == "text_time":
        return "sdxl-turbo" if "sdxl-turbo" in name.lower() else "sdxl"
    cross = model.config.cross_attention_dim
    return "sd2.1" if (cross[0] if isinstance(cross, (list, tuple)) else cross) == 1024 else "sd1.5"


def _blocks(model):
    """[(prefix, BasicTransformerBlock)] in forward order: down, mid, up."""
    out = []
    for group, blocks in (("down_blocks", model.down_blocks), ("mid_block", [model.mid_block]), ("up_blocks", model.up_blocks)):
        for i, block in enumerate(blocks):
            if block is None:
                continue
            prefix = group if group == "mid_block" else f"{group}.{i}"
            for a, attention in enumerate(getattr(block, "attentions", None) or []):
                for t, tb in enumerate(getattr(attention, "transformer_blocks", None) or []):
                    if getattr(tb, "attn1", None) is not None:
                        out.append((f"{prefix}.attentions.{a}.transformer_blocks.{t}", tb))
    return out


def targets(model) -> dict[str, int]:
    return {f"{prefix}.attn1.processor": i for i, (prefix, _) in enumerate(_blocks(model))}


def top_level(model) -> int:
    """Index of the first down block that has attention."""
    for i, block in enumerate(model.down_blocks):
        if getattr(block, "attentions", None):
            return i
    raise NotImplementedError(f"diffattn unet: {type(model).__name__} has no down block with attention")


def levels(model) -> dict[str, int]:
    """``{processor key: level}``: 0 = the top attention level, counting down to the mid block."""
    n, top = len(model.down_blocks), top_level(model)
    out = {}
    for key in targets(model):
        group, index = key.split(".")[0], key.split(".")[1]
        depth = n - 1 if group == "mid_block" else (int(index) if group == "down_blocks" else n - 1 - int(index))
        out[key] = depth - top
    return out


def native_size(model) -> tuple[int, int]:
    size = model.config.sample_size
    return (size, size) if isinstance(size, int) else tuple(int(s) for s in size)


def patch_size(model) -> tuple[int, int, int]:
    return (1, 1, 1)


def grid(model, hidden_states: torch.Tensor, inputs=None) -> TokenLayout | str:
    if hidden_states.ndim != 4:
        return f"diffattn unet: the U-Net input has shape {tuple(hidden_states.shape)}, not [B, C, H, W]"
    _, _, height, width = hidden_states.shape  # [B, C, H, W] latents
    return TokenLayout(1, height, width)


def call_grid(latent: TokenLayout, tokens: int) -> tuple[int, int] | None:
    """(rows, cols) of a call with ``tokens`` tokens in a forward with latent ``latent``, or None."""
    h, w = latent.rows, latent.cols
    s = max(1, round(math.sqrt(h * w / tokens)))
    rows, cols = -(-h // s), -(-w // s)
    return (rows, cols) if rows * cols == tokens else None


class Processor(DiffattnProcessor):
    NO_CP = (
        "diffattn unet: a U-Net attends at several resolutions with convolutions in between; a sequence split"
        " would need halo exchanges in every ResNet block, outside diffusers' context parallelism"
    )

    def __init__(self, handle, layer: int, stock=None, site: str = ""):
        if stock is not None and type(stock).__name__ not in STOCK_PROCESSORS:
            raise NotImplementedError(
                f"diffattn unet: {site} has processor {type(stock).__name__}; diffattn replaces {STOCK_PROCESSORS} on "
                "self-attention (reset with unet.set_attn_processor(AttnProcessor2_0()) or disable xFormers first)"
            )
        super().__init__(handle, layer, stock, site)
        self.stock = stock

    def context(self, layout: TokenLayout, kv_len=None) -> AttnContext:
        state, handle = self.handle.state, self.handle
        latent = state.layout
        block_key = ("input", self.site)
        return dataclasses.replace(
            super().context(layout, kv_len), level=handle.levels.get(self.site),
            latent=None if latent is None else (latent.rows, latent.cols), native=state.native,
            block_input=state.forward.get(block_key),
        )

    def __call__(self, attn, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, temb: torch.Tensor | None = None, *args, **kwargs):
        latent = self.video_layout()
        layout, note = None, None
        if latent is None:
            note = self.handle.state.no_layout
        elif hidden_states.ndim != 3:
            note = "diffattn unet: 4-D input to self-attention; running the stock processor"
        elif encoder_hidden_states is not None or attention_mask is not None:
            note = "diffattn unet: self-attention with a mask or context (only_cross_attention); running the stock processor"
        elif attn.spatial_norm is not None or attn.group_norm is not None or attn.residual_connection:
            note = "diffattn unet: attention with spatial/group norm or a residual; running the stock processor"
        else:
            rows_cols = call_grid(latent, hidden_states.shape[1])
            if rows_cols is None:
                note = f"diffattn unet: {hidden_states.shape[1]} tokens form no grid of the latent {latent!r}; running dense"
            else:
                layout = TokenLayout(1, *rows_cols)
        if not self.runs_method(layout, note):
            self.handle.state.forward.pop(("input", self.site), None)
            return self.stock(attn, hidden_states, encoder_hidden_states, attention_mask, temb, *args, **kwargs)

        def project(x, which):  # [B', N', C] -> q, k, v [B', H, N', D] (or q), as AttnProcessor2_0
            query = attn.to_q(x).unflatten(-1, (attn.heads, -1)).transpose(1, 2)
            if attn.norm_q is not None:
                query = attn.norm_q(query)
            if which == "q":
                return query
            key = attn.to_k(x).unflatten(-1, (attn.heads, -1)).transpose(1, 2)
            value = attn.to_v(x).unflatten(-1, (attn.heads, -1)).transpose(1, 2)
            if attn.norm_k is not None:
                key = attn.norm_k(key)
            return query, key, value

        def finish(out):  # [B', H, N', D] -> [B', N', C]
            out = out.transpose(1, 2).flatten(2, 3).to(hidden_states.dtype)
            return attn.to_out[1](attn.to_out[0](out))

        ctx = self.context(layout)
        self.handle.state.forward.pop(("input", self.site), None)
        handle = self.handle
        perturb = handle.guide.at(self.layer) if handle.guide is not None else []
        method_on = not handle.bypassed and handle.method.active(ctx)
        if not perturb:
            out = handle.method.run_tokens(hidden_states, ctx, project, finish)  # [B, S, C]
        elif method_on:
            out = self._guided_method(hidden_states, ctx, project, finish, perturb, attn)
        else:
            out = self._guided_dense(hidden_states, layout, project, finish, perturb)
        return out / attn.rescale_output_factor

    def _guided_method(self, x, ctx, project, finish, perturb, attn):
        """A U-Net method's call with weak rows: the method runs on every row, then the weak rows are
        blended with the identity output ``to_out(V)`` after the out-projection. That is exact for
        one u per layer (the projection is affine); head-level weights and SEG need the attention
        output per head, which the U-Net methods' token paths (windows, merged tokens) do not expose."""
        for _, p in perturb:
            if p.kind != "blend" or len(set(p.u)) != 1:
                raise NotImplementedError(
                    f"diffattn {self.handle.method_name}: {'SEG' if p.kind == 'seg' else 'head-level guidance'} inside a "
                    "U-Net method's calls is not supported (the method's token path has no per-head output); use "
                    "pag/soft-pag/stg(mode='attention') with one u per layer, or guidance without a U-Net method"
                )
        out = self.handle.method.run_tokens(x, ctx, project, finish).clone()  # [B, S, C]
        for rows, p in perturb:
            u = p.u[0]
            identity = attn.to_out[1](attn.to_out[0](attn.to_v(x[rows])))  # O = V, then the out-projection
            out[rows] = (1 - u) * out[rows] + u * identity.to(out.dtype)
        self.handle.guide.hits += 1
        return out

    def _guided_dense(self, x, layout, project, finish, perturb):
        """The stock attention (``AttnProcessor2_0``'s maths) with the weak rows perturbed per head."""
        handle = self.handle
        handle.record(self.site, mode="dense", layout=layout)
        query, key, value = project(x, "qkv")  # [B, H, N, D]
        seg = [(rows, p) for rows, p in perturb if p.kind == "seg"]
        if seg:
            query = query.clone()
            for rows, p in seg:
                query[rows] = blur_queries(query[rows].transpose(1, 2), layout, p.sigma).transpose(1, 2)
        out = torch.nn.functional.scaled_dot_product_attention(query, key, value, dropout_p=0.0, is_causal=False)
        blend = [(rows, p) for rows, p in perturb if p.kind == "blend"]
        if blend:
            out = out.clone()
            for rows, p in blend:
                out[rows] = blend_identity(out[rows].transpose(1, 2), value[rows].transpose(1, 2), torch.tensor(p.u)).transpose(1, 2)
        handle.guide.hits += 1
        return finish(out)


# -- structural steps: block inputs for token merging, RAU-Net -----------------------------------

def structural_steps(model, handle, pipe=None, component: str = "") -> list:
    """The hooks the handle's method needs on ``model`` besides its processors (``component``: the
    model's name in the pipeline, which prefixes its sites)."""
    method = handle.method
    steps = []
    if getattr(method, "needs_block_input", False):
        steps += _block_input_steps(model, handle, component)
    parts = getattr(method, "parts", [method])
    rau = next((p for p in parts if getattr(p, "stage", "") == "structure"), None)
    if rau is not None:
        if pipe is not None and getattr(pipe, "controlnet", None) is not None:
            raise NotImplementedError(
                "diffattn rau-net: ControlNet pipelines are not supported (the ControlNet's residuals keep the "
                "unshrunk sizes); use 'msw-msa' (or 'msw-msa+tome') with ControlNet"
            )
        steps += _rau_steps(model, handle, rau.layout, component)
    return steps


def _block_input_steps(model, handle, component: str) -> list:
    steps = []
    for prefix, block in _blocks(model):
        site = f"{component}.{prefix}.attn1.processor" if component else f"{prefix}.attn1.processor"

        def record(module, args, kwargs, site=site):
            if not handle.state.live:
                return
            hidden = args[0] if args else kwargs["hidden_states"]
            handle.state.forward[("input", site)] = hidden  # [B, N, C], taken by the attn1 processor
        steps.append(ForwardHook(block, record))
    return steps


def _check_rad_conv(conv, where: str) -> None:
    ok = (tuple(conv.kernel_size) == (3, 3) and tuple(conv.stride) == (2, 2) and tuple(conv.padding) == (1, 1)
          and tuple(conv.dilation) == (1, 1) and conv.padding_mode == "zeros")
    if not ok:
        raise NotImplementedError(
            f"diffattn rau-net: {where} is not a 3 x 3, stride-2, padding-1 conv (kernel {conv.kernel_size}, stride "
            f"{conv.stride}, padding {conv.padding}); RAU-Net's downsampler needs one. Use 'msw-msa' on this U-Net"
        )


def _rau_steps(model, handle, layout: str, component: str = "") -> list:
    top, n = top_level(model), len(model.down_blocks)
    rad_level = None if layout == "turbo" else top
    pool_level = top + 1 if layout == "sd" else top
    downs, ups = model.down_blocks, model.up_blocks
    if rad_level is not None:
        samplers = getattr(downs[rad_level], "downsamplers", None)
        if not samplers:
            raise NotImplementedError(f"diffattn rau-net: down_blocks.{rad_level} has no downsampler; use 'msw-msa' on this U-Net")
        _check_rad_conv(samplers[0].conv, f"down_blocks.{rad_level}.downsamplers.0.conv")
    if pool_level >= n - 1 or not getattr(downs[pool_level], "attentions", None):
        raise NotImplementedError(f"diffattn rau-net: down_blocks.{pool_level} has no attention to pool after; use 'msw-msa' on this U-Net")
    pairs = len(downs[pool_level].resnets)
    restore_block = ups[n - 1 - pool_level]
    if len(getattr(restore_block, "attentions", None) or []) < pairs:
        raise NotImplementedError(f"diffattn rau-net: up_blocks.{n - 1 - pool_level} does not mirror down_blocks.{pool_level}")
    forward = handle.state.forward
    prefix = f"{component}." if component else ""
    rad_site = f"{prefix}down_blocks.{rad_level}.downsamplers.0.conv" if rad_level is not None else None
    pool_site = f"{prefix}down_blocks.{pool_level}.attentions.0"
    for site in filter(None, (rad_site, pool_site)):
        handle.add_site(site, "", -1)  # report rows of the structural changes (layer -1: not an attention)

    def report(site, on):
        handle.record(site, mode="method" if on else "dense", layout=handle.state.layout, backend="rau-net" if on else None)

    def plan():
        if not handle.state.live:
            return None
        if "rau" not in forward:
            state = handle.state
            latent = state.layout
            ctx = AttnContext(layout=latent, step=state.step, num_steps=state.num_steps, layer=0,
                              latent=None if latent is None else (latent.rows, latent.cols), native=state.native)
            forward["rau"] = handle.method.plan(ctx) if latent is not None else None
        return forward["rau"]

    steps = []
    for i, block in enumerate(downs):
        if getattr(block, "downsamplers", None):
            def skip_size(module, args, kwargs, i=i):
                if not handle.state.live:
                    return
                hidden = args[0] if args else kwargs["hidden_states"]
                forward[("skip", i)] = tuple(hidden.shape[-2:])  # the skip its mirrored upsampler must reach
            steps.append(ForwardHook(block.downsamplers[0], skip_size))
    if rad_level is not None:
        def rad(module, args, kwargs):
            p = plan()
            if p is not None:
                report(rad_site, p.rad)
            if p is not None and p.rad:
                # stride 2 / padding 1 on every other row and column == stride 4 / padding 2 / dilation 2
                return (args[0][:, :, ::2, ::2],) + tuple(args[1:]), kwargs
            return None
        steps.append(ForwardHook(downs[rad_level].downsamplers[0].conv, rad))
    for j, block in enumerate(ups):
        if getattr(block, "upsamplers", None):
            def to_skip(module, args, kwargs, level=n - 2 - j):
                if not handle.state.live:
                    return None
                size = forward.get(("skip", level))
                hidden = args[0] if args else kwargs["hidden_states"]
                if size is None or size == (2 * hidden.shape[-2], 2 * hidden.shape[-1]):
                    return None
                kwargs = {k: v for k, v in kwargs.items() if k != "output_size"}
                return (hidden, size) + tuple(args[2:]), kwargs
            steps.append(ForwardHook(block.upsamplers[0], to_skip))

    def pool(module, args, kwargs, output):
        p = plan()
        if p is not None:
            report(pool_site, p.pool)
        if p is None or not p.pool:
            return None
        sample = output[0] if isinstance(output, tuple) else output.sample  # [B, C, H, W]
        forward["pooled"] = tuple(sample.shape[-2:])
        pooled = torch.nn.functional.avg_pool2d(sample, 2, ceil_mode=True)
        return (pooled,) + tuple(output[1:]) if isinstance(output, tuple) else dataclasses.replace(output, sample=pooled)

    def restore(module, args, kwargs, output):
        size = forward.pop("pooled", None)
        if size is None:
            return None
        sample = output[0] if isinstance(output, tuple) else output.sample
        restored = torch.nn.functional.interpolate(sample, size=size, mode="bicubic")
        return (restored,) + tuple(output[1:]) if isinstance(output, tuple) else dataclasses.replace(output, sample=restored)

    steps.append(OutputHook(downs[pool_level].attentions[0], pool))
    steps.append(OutputHook(restore_block.attentions[pairs - 1], restore))
    return steps

