"""The guidance branch on a diffusers model: the extra weak forward, its batching with CFG, the
combination with the pipeline's output, the step window, and the shared prefix.

Everything goes through diffusers' own hook registry (``diffusers.hooks.HookRegistry``): one
``GuidanceHook`` on each model (it also receives the pipeline's ``cache_context`` names, which say
which call is the conditional one) and one ``BlockHook`` on each transformer block that a branch
skips (STG) or that the shared prefix replays. The perturbation itself runs inside diffattn's
processors (``DiffattnProcessor.attend``), reading ``handle.guide``.

**Which rows are conditional.** Pipelines that call the model once per branch name the calls
(``cache_context("cond")`` / ``("uncond")``: Wan, FLUX, HunyuanVideo); pipelines that batch CFG
send ``[uncond; cond]`` in one call (SD, SDXL, SD3, CogVideoX, LTX, Mochi; diffusers always puts the
negative prompt first) and say so with ``do_classifier_free_guidance``; a model called alone (no
pipeline), or a pipeline without CFG (FLUX-dev, FLUX.2, HunyuanVideo without ``true_cfg_scale``),
is all conditional.

**The combination never needs the CFG scale.** With CFG the pipeline computes
``u + w (c - u)``. The hook adds ``d = s (c - weak)`` to *both* its conditional and its
unconditional output (to the latter at the next ``uncond`` call of the same step), so the pipeline
yields ``u + d + w (c + d - u - d) = u + w (c - u) + s (c - weak)``: the papers' formula for any
``w``, Wan2.2's second-expert scale and FLUX's ``true_cfg_scale`` included. Without CFG it yields
``c + s (c - weak)``. (A pipeline's ``guidance_rescale`` then measures the guided conditional
output, where diffusers' PAG pipelines measure the plain one.)

**Batching.** "joint" appends the weak rows to the batch (``[u; c; c']``: one call, 1.5x the
activations), "separate" runs one more call on the conditional rows (memory-safe for long video),
"auto" follows the pipeline: joint where it batches CFG, separate where it calls per branch.

**Shared prefix** (separate calls): the blocks before the first perturbed layer compute the same
thing in the conditional and the weak branch. The conditional call keeps the output of the last of
them; in the weak call those blocks return at once (their input, then that kept output), so only
the blocks from the first perturbed layer on run again. Only for models whose blocks form one chain
(every DiT here; not U-Nets, whose resnets sit between the attention blocks).
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
from dataclasses import dataclass, field
import torch
from diffusers.hooks.hooks import BaseState, HookRegistry, ModelHook, StateManager

from diffattn.guidance import GuidanceConfig, ModelInfo, Perturbation, Plan

HOOK_NAME = "diffattn_guidance"
BLOCK_HOOK_NAME = "diffattn_guidance_block"


# -- per-handle runtime state --------------------------------------------------------------------

@dataclass
class Guide:
    """The guidance state of one handle (``handle.guide``).

    configs:  the weak branches' configs (one extra forward each).
    active:   while a forward runs weak rows: ``[(rows, plan)]`` (``rows`` a slice of the batch).
    pending:  ``{id(model): d}``, the term owed to the next unconditional call of the same step.
    stats:    what ran (``handle.summary()["guidance"]``).
    """

    configs: list[GuidanceConfig]
    active: list[tuple[slice, Plan]] = field(default_factory=list)
    pending: dict[int, torch.Tensor] = field(default_factory=dict)
    running: bool = False
    replay: dict | None = None  # the shared prefix of the running weak call: {"skip": set, "out": {block: output}}
    record: dict | None = None  # the conditional call's kept block outputs: {block index: output}
    hits: int = 0  # perturbed attention calls and skipped blocks of the running weak rows
    forced: int | None = None  # inside ``handle.weak(i)``: every forward is weak branch i alone
    stats: dict = field(default_factory=lambda: {"weak_forwards": 0, "joint_calls": 0, "separate_calls": 0,
                                                 "steps_outside_window": 0, "prefix_blocks_reused": 0})

    @property
    def names(self) -> list[str]:
        return [c.name for c in self.configs]

    @contextlib.contextmanager
    def weak(self, branch: int = 0):
        if not 0 <= branch < len(self.configs):
            raise ValueError(f"diffattn: weak branch {branch} of {len(self.configs)} ({self.names})")
        previous, self.forced = self.forced, branch
        try:
            yield
        finally:
            self.forced = previous

    def at(self, layer: int) -> list[tuple[slice, Perturbation]]:
        """``[(rows, perturbation)]`` of the running forward at ``layer`` (empty: nothing to do)."""
        out = []
        for rows, plan in self.active:
            p = plan.layers.get(layer)
            if p is not None:
                out.append((rows, p))
        return out


def model_info(model, adapter, family: str) -> ModelInfo:
    """Layers, heads per layer and named groups of ``model`` in the adapter's numbering."""
    heads: dict[int, int] = {}
    named: dict[str, list[int]] = {}
    for key, layer in adapter.targets(model).items():
        module = model.get_submodule(key.removesuffix(".processor"))
        heads[layer] = int(getattr(module, "heads"))
        for group in ("down", "mid", "up"):
            if key.startswith(f"{group}_block"):
                named.setdefault(group, []).append(layer)
    count = max(heads) + 1 if heads else 0
    return ModelInfo(count, heads, {k: tuple(sorted(set(v))) for k, v in named.items()}, family)


def blocks_of(model, adapter) -> dict[int, tuple[str, torch.nn.Module]]:
    """``{layer: (name, block)}``: the transformer block holding each layer's attention (its parent module)."""
    out = {}
    for key, layer in adapter.targets(model).items():
        name = key.removesuffix(".processor").rsplit(".", 1)[0]
        out.setdefault(layer, (name, model.get_submodule(name)))
    return out


# -- inputs and outputs --------------------------------------------------------------------------

def _bind(forward, args, kwargs) -> dict:
    names = list(inspect.signature(forward).parameters)
    return {**dict(zip(names, args)), **kwargs}


def _map(value, n: int, fn):
    """Apply ``fn`` to every tensor of ``value`` (nested dicts, lists, tuples) whose dim 0 is the batch ``n``."""
    if torch.is_tensor(value):
        return fn(value) if value.ndim >= 1 and value.shape[0] == n else value
    if isinstance(value, dict):
        return {k: _map(v, n, fn) for k, v in value.items()}
    if isinstance(value, (list, tuple)) and not isinstance(value, str):
        return type(value)(_map(v, n, fn) for v in value)
    return value


def _batch(inputs: dict) -> int:
    x = inputs.get("hidden_states", inputs.get("sample"))
    if not torch.is_tensor(x):
        raise ValueError("diffattn guidance: the model was called without hidden_states/sample")
    return x.shape[0]


def _sample(out):
    if torch.is_tensor(out):
        return out
    if isinstance(out, tuple):
        return out[0]
    return out.sample


def _with_sample(out, sample):
    if torch.is_tensor(out):
        return sample
    if isinstance(out, tuple):
        return (sample,) + tuple(out[1:])
    return dataclasses.replace(out, sample=sample)


def _timestep(inputs: dict) -> float | None:
    t = inputs.get("timestep")
    if t is None:
        return None
    value = float(t.max()) if torch.is_tensor(t) else float(t)
    return value * 1000.0 if value <= 1.0 else value  # flow pipelines pass sigma (FLUX: t / 1000)


def _pipeline_cfg(pipe) -> bool:
    try:
        return bool(getattr(pipe, "do_classifier_free_guidance", False)) if pipe is not None else False
    except (AttributeError, TypeError):  # the property reads call-time attributes
        return False


class _NoState(BaseState):
    def reset(self, *args, **kwargs) -> None:
        pass


# -- the model hook ------------------------------------------------------------------------------

class GuidanceHook(ModelHook):
    """Runs the weak branch(es) around one model's forward (diffusers ``ModelHook.new_forward``)."""

    _is_stateful = True  # so diffusers hands it the pipeline's cache_context

    def __init__(self, handle, plans: list[Plan], chain: list[torch.nn.Module] | None, block_index: dict[int, int]):
        super().__init__()
        self.handle = handle
        self.plans = plans
        self.chain = chain  # blocks in forward order when they form one chain (shared prefix), else None
        self.block_index = block_index  # layer -> index in chain
        self.contexts = StateManager(_NoState)

    def reset_state(self, module):
        return module

    def _context(self) -> str | None:
        context = self.contexts._context
        return None if context is None else context.name

    def new_forward(self, module, *args, **kwargs):
        original = self.fn_ref.original_forward
        handle = self.handle
        guide, state = handle.guide, handle.state
        if handle.removed or not state.live or guide.running:
            return original(*args, **kwargs)
        if guide.forced is not None:  # handle.weak(): this forward is the weak model alone
            n = _batch(_bind(original, args, kwargs))
            plan = self.plans[guide.forced]
            guide.active, guide.running, guide.hits = [(slice(0, n), plan)], True, 0
            try:
                out = original(*args, **kwargs)
            finally:
                guide.active, guide.running = [], False
            self._check_hits([(None, plan, 0.0)])
            return out
        name = self._context()
        if name == "uncond":
            out = original(*args, **kwargs)
            shift = guide.pending.pop(id(module), None)
            if shift is None:
                return out
            sample = _sample(out)
            if shift.shape != sample.shape:
                raise RuntimeError(f"diffattn guidance: the unconditional call's output {tuple(sample.shape)} does not match "
                                   f"the conditional call's {tuple(shift.shape)}")
            return _with_sample(out, sample + shift.to(sample.dtype))
        if guide.pending.pop(id(module), None) is not None or (name is None and not _pipeline_cfg(handle.pipe)):
            handle.note_once(
                f"diffattn {guide.names}: no unconditional call (guidance-distilled model such as FLUX-dev or HunyuanVideo, "
                "CFG off, or the model called alone): the output is eps_c + s (eps_c - eps_weak), and the weak branch doubles "
                "the cost of each step in its window; smaller scales and a narrow steps= window are advised on distilled models"
            )
        inputs = _bind(original, args, kwargs)
        timestep = _timestep(inputs) if any(c.adaptive for c in guide.configs) else None
        branches = [(c, p, c.scale_at(timestep)) for c, p in zip(guide.configs, self.plans) if c.in_window(state.step, state.num_steps)]
        branches = [b for b in branches if b[2] > 0]
        if not branches:
            guide.stats["steps_outside_window"] += 1
            return original(*args, **kwargs)
        n = _batch(inputs)
        cfg_batched = name != "cond" and _pipeline_cfg(handle.pipe) and n % 2 == 0
        cond = slice(n // 2, n) if cfg_batched else slice(0, n)
        mode = guide.configs[0].batch
        if mode == "auto":
            mode = "joint" if cfg_batched else "separate"
        if mode == "joint":
            out, d = self._joint(original, inputs, n, cond, branches)
        else:
            out, d = self._separate(original, inputs, n, cond, branches, module)
        sample = _sample(out)
        if cfg_batched:
            d_all = torch.cat([d, d], dim=0)
        else:
            d_all = d
            if name == "cond":
                guide.pending[id(module)] = d  # owed to this step's unconditional call
        return _with_sample(out, sample + d_all.to(sample.dtype))

    def _joint(self, original, inputs, n, cond, branches):
        guide = self.handle.guide
        c = cond.stop - cond.start
        k = len(branches)
        stacked = {key: _map(v, n, lambda t: torch.cat([t] + [t[cond]] * k, dim=0)) for key, v in inputs.items()}
        guide.active = [(slice(n + j * c, n + (j + 1) * c), plan) for j, (_, plan, _) in enumerate(branches)]
        guide.hits = 0
        try:
            out = original(**stacked)
        finally:
            guide.active = []
        self._check_hits(branches)
        guide.stats["weak_forwards"] += k
        guide.stats["joint_calls"] += 1
        sample = _sample(out)  # [n + k c, ...]
        base = sample[:n]
        eps_c = base[cond].float()
        d = sum(s * (eps_c - sample[n + j * c: n + (j + 1) * c].float()) for j, (_, _, s) in enumerate(branches))
        return _with_sample(out, base), d

    def _separate(self, original, inputs, n, cond, branches, module):
        guide, state = self.handle.guide, self.handle.state
        share = self.chain is not None and all(cfg.share_prefix for cfg, _, _ in branches)
        firsts = {self.block_index[plan.first_layer] for _, plan, _ in branches}
        keep = {i - 1 for i in firsts if i >= 1} if share else set()
        guide.record = {i: None for i in keep} if keep else None
        try:
            out = original(**inputs)
        finally:
            recorded, guide.record = guide.record, None
        eps_c = _sample(out)[cond].float()
        weak_inputs = inputs if cond == slice(0, n) else {key: _map(v, n, lambda t: t[cond]) for key, v in inputs.items()}
        rows = cond.stop - cond.start
        d = None
        for _, plan, s in branches:
            first = self.block_index[plan.first_layer]
            replay = None
            if recorded and first - 1 in recorded and recorded[first - 1] is not None:
                kept = recorded[first - 1]
                kept = kept if cond == slice(0, n) else _map(kept, n, lambda t: t[cond])
                replay = {"until": first, "out": kept}
            guide.active, guide.running, guide.replay, guide.hits = [(slice(0, rows), plan)], True, replay, 0
            state.forward.clear()  # structural hooks' per-forward scratch (U-Nets) starts afresh
            try:
                weak = _sample(original(**weak_inputs)).float()
            finally:
                guide.active, guide.running, guide.replay = [], False, None
            self._check_hits([(None, plan, s)])
            guide.stats["weak_forwards"] += 1
            if replay is not None:
                guide.stats["prefix_blocks_reused"] += first
            term = s * (eps_c - weak)
            d = term if d is None else d + term
        guide.stats["separate_calls"] += 1
        return out, d

    def _check_hits(self, branches) -> None:
        if self.handle.guide.hits == 0:
            names = sorted({plan.name for _, plan, _ in branches})
            raise RuntimeError(
                f"diffattn {names}: the weak branch perturbed nothing in this forward (every perturbed layer ran a path "
                "that cannot be perturbed; handle.report() says which and why). Pick other layers, or remove the guidance"
            )


# -- block hooks: STG's skip and the shared prefix -----------------------------------------------

class BlockHook(ModelHook):
    """On one transformer block: returns its input for skipped weak rows (STG), and serves the shared
    prefix (returns at once in a replayed weak call; keeps its output in the conditional call)."""

    def __init__(self, handle, layers: tuple[int, ...], index: int | None, returns: tuple[str, ...]):
        super().__init__()
        self.handle = handle
        self.layers = layers
        self.index = index  # position in the model's block chain (None: not a chain)
        self.returns = returns  # input names of a tuple output, in order
        self.tuple_out: bool | None = None  # learned from the block's last normal call

    def _run(self, original, args, kwargs):
        out = original(*args, **kwargs)
        self.tuple_out = isinstance(out, tuple)
        return out

    def _passthrough(self, inputs: dict):
        return tuple(inputs.get(name) for name in self.returns) if self.tuple_out else inputs["hidden_states"]

    def new_forward(self, module, *args, **kwargs):
        original = self.fn_ref.original_forward
        guide = self.handle.guide
        replay = guide.replay
        if replay is not None and self.index is not None and self.index < replay["until"] and self.tuple_out is not None:
            if self.index == replay["until"] - 1:
                return replay["out"]
            return self._passthrough(_bind(original, args, kwargs))
        skips = [rows for layer in self.layers for rows, p in guide.at(layer) if p.kind == "skip"]
        if not skips:
            out = self._run(original, args, kwargs)
            if guide.record is not None and self.index in guide.record:
                guide.record[self.index] = out
            return out
        inputs = _bind(original, args, kwargs)
        guide.hits += 1
        n = _batch(inputs)
        if len(skips) == 1 and skips[0] == slice(0, n) and self.tuple_out is not None:
            return self._passthrough(inputs)  # every row skips: the block does not run
        out = self._run(original, args, kwargs)
        passed = self._passthrough(inputs)
        outs, ins = ([out], [passed]) if not self.tuple_out else (list(out), list(passed))
        merged = []
        for o, i in zip(outs, ins):
            if torch.is_tensor(o) and torch.is_tensor(i) and o.shape == i.shape and o.shape[0] == n:
                o = o.clone()
                for rows in skips:
                    o[rows] = i[rows]
            merged.append(o)
        return tuple(merged) if self.tuple_out else merged[0]


# -- install steps -------------------------------------------------------------------------------

@dataclass
class RegistryHook:
    """An install step: ``hook`` registered under ``name`` in ``module``'s diffusers hook registry
    (``root``: the model, whose registries' cached child lists are refreshed after each change)."""

    module: torch.nn.Module
    hook: ModelHook
    name: str
    root: torch.nn.Module | None = None
    _made_registry: bool = False

    def do(self) -> None:
        self._made_registry = not hasattr(self.module, "_diffusers_hook")
        HookRegistry.check_if_exists_or_initialize(self.module).register_hook(self.hook, self.name)
        self._refresh()

    def undo(self) -> None:
        registry = getattr(self.module, "_diffusers_hook", None)
        if registry is not None and registry.get_hook(self.name) is not None:
            registry.remove_hook(self.name, recurse=False)
        if self._made_registry and registry is not None and not registry.hooks:
            del self.module._diffusers_hook
            if "forward" in vars(self.module):  # the registry left the bound forward as an instance attribute
                del self.module.forward
        self._refresh()

    def _refresh(self) -> None:
        registry = getattr(self.root, "_diffusers_hook", None) if self.root is not None else None
        if registry is not None and hasattr(registry, "invalidate_child_registries_cache"):
            registry.invalidate_child_registries_cache()


def check_pipeline(pipe) -> None:
    """diffusers' PAG pipelines swap their own processors in at every call (``PAGMixin``), which would
    silently replace diffattn's: refuse them."""
    if pipe is not None and any(c.__name__ == "PAGMixin" for c in type(pipe).__mro__):
        raise NotImplementedError(
            f"diffattn: {type(pipe).__name__} is a diffusers PAG pipeline; it replaces the attention processors at every "
            "call, which would drop diffattn's. Load the base pipeline (e.g. StableDiffusionXLPipeline) and use "
            "diffattn.apply(pipe, 'pag', ...) (alone or as guidance= of a method)"
        )


def install_steps(model, handle, adapter, family: str, component: str = "") -> list:
    """The hooks guidance needs on ``model``: the branch hook, and block hooks for skips and the prefix."""
    guide = handle.guide
    check_pipeline(handle.pipe)
    if getattr(adapter, "NO_GUIDANCE", None):
        raise NotImplementedError(adapter.NO_GUIDANCE)
    info = model_info(model, adapter, family)
    plans = [cfg.plan(info) for cfg in guide.configs]
    modes = {cfg.batch for cfg in guide.configs}
    if len(modes) > 1:
        raise ValueError(f"diffattn guidance: every weak branch runs in one batch mode; got batch={sorted(modes)}")
    blocks = blocks_of(model, adapter)
    order: list[torch.nn.Module] = []
    for layer in sorted(blocks):
        if blocks[layer][1] not in order:
            order.append(blocks[layer][1])
    index = {layer: order.index(blocks[layer][1]) for layer in blocks}
    chain = order if getattr(adapter, "BLOCK_CHAIN", True) else None
    returns = getattr(adapter, "BLOCK_RETURNS", ("hidden_states", "encoder_hidden_states"))
    steps: list = []
    hooked: dict[int, list[int]] = {}
    for plan in plans:
        for layer in plan.skipped():
            hooked.setdefault(index[layer], []).append(layer)
        if chain is not None and any(cfg.share_prefix for cfg in guide.configs):
            for i in range(index[plan.first_layer]):
                hooked.setdefault(i, [])
    by_index = {i: [l for l in blocks if index[l] == i] for i in hooked}
    for i in sorted(hooked):
        steps.append(RegistryHook(order[i], BlockHook(handle, tuple(by_index[i]), i if chain is not None else None, returns),
                                  BLOCK_HOOK_NAME, root=model))
    steps.append(RegistryHook(model, GuidanceHook(handle, plans, chain, index), HOOK_NAME, root=model))
    return steps
