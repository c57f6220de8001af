"""What every model adapter shares: the processor plumbing and the layout hook.

An adapter module (one per diffusers model family) meets ``diffattn.core.protocols.Adapter``:
- ``MODEL_CLASSES`` (the diffusers class names it handles) and ``FAMILIES`` (the family names it
  reports; method defaults are keyed by these);
- ``family(model, pipe)``: the family of this model (e.g. "wan2.1" / "wan2.2");
- ``targets(model)``: ``{processor key: layer index}`` of the attention modules methods replace;
- ``grid(model, hidden_states)``: the ``TokenLayout`` of the latent tokens of one forward;
- ``patch_size(model)``: ``(t, y, x)`` latent cells per token;
- ``Processor``: the diffusers processor that reproduces the stock one and calls the method.

Every attention call goes through ``DiffattnProcessor.attend``: it builds the call's context,
asks the method whether this call is active (schedule, dense layers), runs the method or the stock
``dispatch_attention_fn``, and records what ran in the handle's report. Processors compute each
call's layout from the recorded grid and the call's own tokens, so models that attend at several
resolutions per forward (U-Nets) get one layout per call.
"""

from __future__ import annotations

import dataclasses
import inspect

import torch
from diffusers.models.attention_dispatch import dispatch_attention_fn

from diffattn.core.context import AttnContext
from diffattn.core.handle import Handle
from diffattn.core.layout import TokenLayout
from diffattn.guidance.perturb import blend_identity, blur_queries
from diffattn.kernels import select

from . import parallel


class DiffattnProcessor:
    """Base of the adapters' processors: holds the handle, this module's layer index and site.

    ``_attention_backend`` and ``_parallel_config`` follow the diffusers convention, so
    ``set_attention_backend`` and ``enable_parallelism`` reach the dense path. They are copied from
    the stock processor this one replaces, so dense calls behave exactly as before.
    """

    _attention_backend = None
    _parallel_config = None
    # whether the model's forward builds a padded-text key mask from its (split) sequence length: then
    # under context parallelism every call with padded text runs through ``pipelines.parallel``
    masks_text = False
    # why this family cannot run under context parallelism (None: it can; ``pipelines.parallel``)
    NO_CP: str | None = ("diffattn: this model family has no context-parallel support (no diffusers _cp_plan and "
                         "no diffattn plan); run it on one GPU per process")

    def __init__(self, handle: Handle, layer: int, stock=None, site: str = ""):
        self.handle = handle
        self.layer = layer
        self.site = site
        if stock is not None:
            self._attention_backend = getattr(stock, "_attention_backend", None)
            self._parallel_config = getattr(stock, "_parallel_config", None)

    def context(self, layout: TokenLayout, kv_len: torch.Tensor | None = None) -> AttnContext:
        state, handle = self.handle.state, self.handle
        return AttnContext(
            layout=layout, step=state.step, num_steps=state.num_steps, layer=self.layer, site=self.site,
            kv_len=kv_len, cache=handle.cache, note=handle.note_once, record=handle.record,
        )

    def video_layout(self) -> TokenLayout | None:
        """The grid of the current forward (None: the forward has none a method can use; then
        ``handle.state.no_layout`` says why)."""
        layout = self.handle.state.layout
        if layout is None and self.handle.state.no_layout:
            return None
        if layout is None:
            raise RuntimeError(
                "diffattn: the attention processor ran before the layout hook; call the transformer "
                "(or pipeline) it was installed on, not the attention module directly"
            )
        return layout

    def cp_world(self) -> int:
        """The number of ranks one attention call's sequence is split over (1: no context parallelism)."""
        cp = parallel.cp_config(self._parallel_config)
        return 1 if cp is None else parallel.degree(cp)

    def guided(self) -> bool:
        """Whether the running forward has weak guidance rows perturbed at this layer."""
        guide = self.handle.guide
        return guide is not None and bool(guide.at(self.layer))

    def runs_method(self, layout: TokenLayout, note: str | None = None) -> bool:
        """Whether this call runs the processor's own path (the method, or guidance perturbing this
        layer); False (recorded as a dense call, with ``note`` saying why when given) for processors
        that then call their stock processor object themselves."""
        handle = self.handle
        if note is None and not handle.bypassed and (handle.method.active(self.context(layout)) or self.guided()):
            return True
        if note is not None:
            handle.note_once(note)
        handle.record(self.site, mode="dense", layout=layout, note=note)
        return False

    def attend(self, query, key, value, layout: TokenLayout, *, attention_mask=None, kv_len=None,
               method_ok: bool = True, dense_note: str | None = None) -> torch.Tensor:
        """Core attention of one call. query/key/value in diffusers' [B, S, heads, D]; returns
        [B, S, heads, D]. ``kv_len``: a callable giving the [B] valid-key counts (only evaluated on
        method calls and on guided dense calls without a mask). ``method_ok`` False forces the stock
        path (``dense_note`` says why). Guidance rows of the running forward are perturbed here
        (``handle.guide``): SEG blurs their queries before, the identity blends mix V in after."""
        ctx = self.context(layout)
        handle = self.handle
        perturb = handle.guide.at(self.layer) if handle.guide is not None else []
        cp = parallel.cp_config(self._parallel_config)
        if perturb:
            if cp is None:
                query = self._perturb_queries(query, layout, perturb)
            rows, p = perturb[0]
            if len(perturb) == 1 and p.full_identity and rows == slice(0, query.shape[0]):
                out = value.clone()  # the whole batch is the weak branch with O = V: no attention to run
                handle.guide.hits += 1
                handle.record(self.site, mode="dense", layout=layout, note="guidance: identity attention (no kernel run)")
                handle.keep(self.site, out)
                return out
        run_method = method_ok and not handle.bypassed and handle.method.active(ctx)
        if cp is not None:
            out = self._attend_parallel(cp, query, key, value, layout, ctx, perturb, attention_mask, kv_len, run_method, dense_note)
        elif run_method:
            if kv_len is not None:
                ctx = dataclasses.replace(ctx, kv_len=kv_len())
            out = handle.method(query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2), ctx)  # [B, H, S, D]
            out = out.transpose(1, 2)
        else:
            if dense_note is not None:
                handle.note_once(dense_note)
            handle.record(self.site, mode="dense", layout=layout, note=dense_note)
            if perturb and attention_mask is None and kv_len is not None:
                valid = kv_len().to(query.device)  # [B] keys valid as a prefix (padded text last)
                attention_mask = _prefix_mask(valid, key.shape[1])
            out = dispatch_attention_fn(
                query, key, value, attn_mask=attention_mask, dropout_p=0.0, is_causal=False,
                backend=self._attention_backend, parallel_config=self._parallel_config,
            )
        if perturb:
            out = self._perturb_output(out, value, perturb)
        handle.keep(self.site, out)
        return out

    def _attend_parallel(self, cp, query, key, value, layout: TokenLayout, ctx: AttnContext, perturb, attention_mask,
                         kv_len, run_method: bool, dense_note: str | None) -> torch.Tensor:
        """One call under diffusers' context parallelism (``pipelines.parallel``): query/key/value
        are this rank's slices ``[B, S / degree, heads, D]``; returns the same slice of the output.
        ``kv_len`` must give the valid-key counts in the layout's order (the full sequence)."""
        handle, name = self.handle, self.handle.method_name
        if self.NO_CP:
            raise NotImplementedError(self.NO_CP)
        parallel.check_config(cp, name)
        world = parallel.degree(cp)
        seg = [(rows, p) for rows, p in perturb if p.kind == "seg"]
        valid = kv_len() if kv_len is not None and (run_method or perturb or self.masks_text) else None
        if valid is not None and bool((valid >= layout.seq_len).all()):
            valid = None  # no padded key: the stock path is exact
        if not run_method and valid is None and not seg and (cp.ring_degree == 1 or parallel.backend_rings(self._attention_backend)):
            # dense without a mask to rebuild: diffusers' own context-parallel attention
            if dense_note is not None:
                handle.note_once(dense_note)
            handle.record(self.site, mode="dense", layout=layout, note=dense_note)
            handle.record_parallel(self.site, mode="diffusers", degree=world)
            return dispatch_attention_fn(
                query, key, value, attn_mask=attention_mask, dropout_p=0.0, is_causal=False,
                backend=self._attention_backend, parallel_config=self._parallel_config,
            )
        parallel.check_split(layout, world, query.shape[1], name)
        if seg and cp.ring_degree > 1:
            raise NotImplementedError(
                f"diffattn {name}: SEG blurs the queries over the whole grid, which a ring rank does not hold; "
                "use Ulysses context parallelism (ContextParallelConfig(ulysses_degree=N)) with SEG"
            )
        method = handle.method if run_method else None
        if method is not None and not hasattr(method, "description") and cp.ring_degree > 1:
            raise NotImplementedError(f"diffattn {name}: ring context parallelism needs a block-sparse method; use Ulysses")
        q, k, v = (parallel.ulysses_in(t, cp) for t in (query, key, value))  # [B, S_group, h, D]
        ctx = dataclasses.replace(ctx, kv_len=valid, heads=parallel.head_range(cp, q.shape[2]))
        dev = q.device
        if cp.ring_degree == 1:  # Ulysses: the full sequence in the layout's order
            order = handle.cache(("cp-order", layout, world, str(dev)), lambda: parallel.group_positions(layout, cp, 0, dev))
            inverse = handle.cache(("cp-inverse", layout, world, str(dev)), lambda: torch.argsort(order))
            q, k, v = (t.index_select(1, inverse) for t in (q, k, v))
            if seg:
                q = self._perturb_queries(q, layout, seg)
            out = self._core(q, k, v, layout, ctx, method, dense_note)
            handle.record_parallel(self.site, mode="ulysses", degree=cp.ulysses_degree)
            return parallel.ulysses_out(out.index_select(1, order), cp)
        me = cp._ring_local_rank
        if method is not None:
            sparsity = method.description(ctx, dev)
            if sparsity.heads > 1:  # a per-head description: this rank's heads (after Ulysses)
                sparsity = sparsity.select_heads(*ctx.heads)
            plan_key = ("cp-ring", method.describe_key(layout), ctx.heads, cp.ring_degree, cp.ulysses_degree, me, str(dev))
        else:
            sparsity = handle.cache(("cp-dense", layout, str(dev)), lambda: parallel.dense_rows(layout))
            plan_key = ("cp-ring-dense", layout, cp.ring_degree, cp.ulysses_degree, me, str(dev))
        plan = handle.cache(plan_key, lambda: parallel.ring_plan(
            sparsity, layout, [parallel.group_positions(layout, cp, j, dev) for j in range(cp.ring_degree)], me))

        def run(qf, kf, vf):  # [B, h, S, D] in the layout's order
            if method is not None:
                return method(qf, kf, vf, ctx, rows=(plan_key, plan.rows))
            handle.record(self.site, mode="dense", layout=layout, note=dense_note)
            grad = torch.is_grad_enabled() and any(t.requires_grad for t in (qf, kf, vf))
            backend, _ = select.choose("auto", qf, plan.rows, padded=valid is not None, grad=grad)
            return backend.run(qf, kf, vf, plan.rows, kv_len=valid, cache=handle.cache, key=plan_key,
                               text_key_start=layout.video_tokens if valid is not None else None)

        out = parallel.ring_attention(q, k, v, layout, plan, cp._ring_mesh.get_group(), run, kv_len=valid)
        handle.record_parallel(self.site, mode="ring" if cp.ulysses_degree == 1 else "ulysses+ring", degree=world,
                               keys_moved=plan.tokens_moved, keys_all_gather=plan.tokens_dense)
        return parallel.ulysses_out(out, cp)

    def _core(self, q, k, v, layout: TokenLayout, ctx: AttnContext, method, dense_note) -> torch.Tensor:
        """Full-sequence attention [B, S, h, D] in the layout's order (Ulysses): the method, or dense
        attention with the valid-key mask of ``ctx.kv_len``."""
        if method is not None:
            return method(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), ctx).transpose(1, 2)
        self.handle.record(self.site, mode="dense", layout=layout, note=dense_note)
        mask = None if ctx.kv_len is None else _prefix_mask(ctx.kv_len.to(q.device), k.shape[1])
        return dispatch_attention_fn(q, k, v, attn_mask=mask, dropout_p=0.0, is_causal=False, backend=self._attention_backend)

    def _perturb_queries(self, query, layout: TokenLayout, perturb) -> torch.Tensor:
        seg = [(rows, p) for rows, p in perturb if p.kind == "seg"]
        if not seg:
            return query
        query = query.clone()
        for rows, p in seg:
            query[rows] = blur_queries(query[rows], layout, p.sigma, p.frame_sigma)
        self.handle.guide.hits += 1
        return query

    def _perturb_output(self, out, value, perturb) -> torch.Tensor:
        blend = [(rows, p) for rows, p in perturb if p.kind == "blend"]
        if not blend:
            return out
        out = out.clone()
        for rows, p in blend:
            out[rows] = blend_identity(out[rows], value[rows], torch.tensor(p.u))
        self.handle.guide.hits += 1
        return out

    def __repr__(self) -> str:
        return f"{type(self).__name__}(method={self.handle.method_name!r}, layer={self.layer})"


def _prefix_mask(valid: torch.Tensor, keys: int) -> torch.Tensor:
    """[B, 1, 1, keys] bool key mask of [B] valid-key counts (padded text last), for SDPA."""
    return (torch.arange(keys, device=valid.device)[None, :] < valid[:, None])[:, None, None, :]


def double_single_targets(model) -> dict[str, int]:
    """``{processor key: layer}`` of MM-DiTs with double-stream ``transformer_blocks`` (layers
    0..N-1) then single-stream ``single_transformer_blocks`` (layers N..): HunyuanVideo, FLUX.1/2."""
    double = {f"transformer_blocks.{i}.attn.processor": i for i in range(len(model.transformer_blocks))}
    offset = len(model.transformer_blocks)
    single = {
        f"single_transformer_blocks.{i}.attn.processor": offset + i
        for i in range(len(model.single_transformer_blocks))
    }
    return {**double, **single}


def grid_from_ids(img_ids: torch.Tensor, seq: int) -> tuple[int, int] | None:
    """(rows, cols) of FLUX-style position ids ``[S, A]`` (or ``[B, S, A]``) whose columns 1 and 2
    are (y, x) and every other column is 0, when they form one row-major grid of ``seq`` tokens;
    None otherwise (reference images, custom ids). One host read."""
    ids = img_ids[0] if img_ids.ndim == 3 else img_ids
    lo, hi = torch.stack([ids.amin(0), ids.amax(0)]).to(torch.int64).tolist()
    rows, cols = hi[1] + 1, hi[2] + 1
    others_zero = all(v == 0 for i, v in enumerate(lo + hi) if i % len(lo) not in (1, 2))
    if not others_zero or lo[1] != 0 or lo[2] != 0 or rows * cols != seq or ids.shape[0] != seq:
        return None
    return rows, cols


def prefix_counts(attention_mask: torch.Tensor, text: int) -> torch.Tensor | None:
    """[B] valid text tokens of a text key mask whose last ``text`` entries are the text, when the
    valid ones are a prefix (padding last); None when they are not. One host read."""
    valid = attention_mask.reshape(attention_mask.shape[0], -1).bool()[:, attention_mask.shape[-1] - text:]  # [B, T]
    counts = valid.sum(-1)
    is_prefix = bool((valid == (torch.arange(text, device=valid.device)[None] < counts[:, None])).all())
    return counts if is_prefix else None


def zero_padded_text(out: torch.Tensor, video_tokens: int, counts: torch.Tensor) -> torch.Tensor:
    """``out`` [B, S, heads, D] with the rows of padded text ([video; text] order) set to 0."""
    rows = torch.arange(out.shape[1], device=out.device)
    keep = (rows[None, :] < (video_tokens + counts)[:, None])[:, :, None, None]
    return torch.where(keep, out, torch.zeros_like(out))


def layout_hook(handle: Handle, grid, facts=None):
    """The forward pre-hook that records the layout and step before every forward of a model.

    ``grid(model, hidden_states, inputs)`` gets the forward's keyword inputs (positional ones by
    name) and returns the ``TokenLayout`` of the call, or a string saying why this forward has no
    layout a method can use (its attention then runs the stock path, with that note).

    ``facts(model, inputs)``, when the adapter has one, returns tensors of the full (unsplit)
    inputs the processors need under context parallelism (HunyuanVideo's valid text counts); they
    go to ``handle.state.forward``. The hook runs before diffusers' context-parallel split hooks.

    Compile-friendly: it reads shapes and the scheduler's step counter (host ints), never a tensor
    value, unless the method's schedule depends on the step and no scheduler is known (then one
    host read of the timestep) or the adapter reads position ids (FLUX).
    """
    names: dict[int, list[str]] = {}

    def hook(module, args, kwargs):
        inputs = dict(kwargs)
        if args:
            params = names.get(id(module))
            if params is None:
                params = names[id(module)] = list(inspect.signature(module.forward).parameters)
            inputs.update(zip(params, args))
        hidden_states = inputs["hidden_states"] if "hidden_states" in inputs else inputs["sample"]  # U-Nets: sample
        handle.state.live = handle.installed(module)  # structural hooks act only when the processors are set
        handle.begin_forward(grid(module, hidden_states, inputs), inputs.get("timestep"))
        if facts is not None:
            handle.state.forward.update(facts(module, inputs))

    return hook
