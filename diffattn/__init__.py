"""diffattn: sparse and linear attention for diffusers video and image pipelines.

    import diffattn
    handle = diffattn.apply(pipe, "radial")          # every supported model of the pipeline
    video = pipe(prompt=..., num_frames=...).frames[0]
    handle.report()                                 # per call site: backend, density, fallbacks
    diffattn.remove(pipe)                           # original processors, bit-identical output

or, model-level:

    model.set_attn_processor(diffattn.processors(model, "radial"))
    diffattn.remove(model)

Method options (``decay=``, ``kernel_size=``, ``dense_steps=``, ...) go to the method's config;
``backend=`` ("auto", "fa4", "triton", "flex", "sdpa"), block sizes and ``family=`` (override the detected
family) are keyword-only knobs; ``lora=PATH`` also loads trained weights (a distilled CLEAR student
from ``diffattn train clear``, a length-extension LoRA from ``diffattn train length``, at weight
``lora_scale=``), whose options it takes, and ``remove`` unloads them (a length LoRA joins the LoRA
adapters already loaded, e.g. a style LoRA, and ``remove`` leaves those as they were). ``apply``
returns a ``Handle``, also usable as a context manager.

``apply`` runs an install plan: targets (every model of the pipeline an adapter knows:
``transformer``, ``transformer_2``, ``unet``, ...) -> steps (processor swaps, the layout hook, the
marker) -> one ``Handle`` that undoes them in reverse.
"""

from __future__ import annotations

import contextlib
import dataclasses

import torch

from diffattn.core.handle import HANDLE_ATTR, ForwardHook, Handle, Marker, ProcessorSwap, attn_processors, set_attn_processors
from diffattn.core.layout import TokenLayout
from diffattn.core.registry import lookup
from diffattn.core.weights import trained_steps
from diffattn.guidance import GUIDANCE, as_guidance, guide
from diffattn.methods import METHODS, method_class
from diffattn.methods.dense import Dense
from diffattn.pipelines import ADAPTERS, FAMILIES
from diffattn.pipelines import guidance as guidance_branch
from diffattn.pipelines.base import layout_hook

__version__ = "0.1.0"
__all__ = [
    "Handle", "TokenLayout", "apply", "attention_modules", "attn_processors", "config_class", "cp_plan", "detect_family",
    "disable_parallelism", "enable_parallelism", "families",
    "guidance_methods", "guide", "methods", "patch_size", "processors", "remove", "set_attn_processors", "supported_models",
]

COMPONENT_NAMES = ("transformer", "transformer_2", "unet")  # also looked up when a pipeline has no .components


def methods() -> dict[str, tuple[str, ...]]:
    """``{method: model families it fits}`` for every method diffattn has."""
    return {name: cls.FAMILIES for name, cls in sorted(METHODS.items())}


def guidance_methods() -> tuple[str, ...]:
    """Every guidance method (``apply(pipe, name)`` alone, or ``apply(pipe, method, guidance=name)``)."""
    return tuple(sorted(GUIDANCE))


def families() -> tuple[str, ...]:
    """Every model family name (``family=`` accepts these)."""
    return FAMILIES


def supported_models() -> dict[str, dict]:
    """``{diffusers model class: {"families": ..., "methods": ...}}``."""
    out = {}
    for name, adapter in sorted(ADAPTERS.items()):
        fits = sorted(m for m, cls in METHODS.items() if set(cls.FAMILIES) & set(adapter.FAMILIES))
        out[name] = {"families": adapter.FAMILIES, "methods": fits}
    return out


def attention_modules(model: torch.nn.Module) -> dict[str, int]:
    """``{module name: layer}`` of the attention modules diffattn's methods run on in ``model``
    (Wan's self-attention ``blocks.N.attn1``, HunyuanVideo's dual- and single-stream ``attn``, ...):
    the modules a length-extension LoRA targets."""
    adapter = _adapter_of(model)
    if adapter is None:
        raise NotImplementedError(f"diffattn does not support {type(model).__name__}; supported model classes: {sorted(ADAPTERS)}")
    return {key.removesuffix(".processor"): layer for key, layer in adapter.targets(model).items()}


def detect_family(target) -> str:
    """The model family ``apply`` detects for a pipeline (its first supported model) or a model."""
    components, pipe = _components(target)
    model = components[0][1]
    return _adapter_of(model).family(model, pipe)


def config_class(method: str):
    """The frozen config dataclass of ``method`` or of a guidance method (its fields are the options)."""
    if method in GUIDANCE:
        return GUIDANCE[method]
    return _method_class(method).Config


def _method_class(method: str):
    cls = method_class(method) if isinstance(method, str) else None
    if cls is None:
        lookup(METHODS, method, "method", hint=" (U-Net methods combine with '+': 'hidiffusion+tome', 'agent+tome')")
    return cls


def _adapter_of(model):
    for cls in type(model).__mro__:
        if cls.__name__ in ADAPTERS:
            return ADAPTERS[cls.__name__]
    return None


def _components(target) -> tuple[list[tuple[str, torch.nn.Module]], object]:
    """([(name, model)], pipeline or None) of the models diffattn installs on."""
    if isinstance(target, torch.nn.Module):
        if _adapter_of(target) is None:
            raise NotImplementedError(
                f"diffattn does not support {type(target).__name__}; supported model classes: "
                f"{sorted(ADAPTERS)} (pass a pipeline that has one of them, or the model itself)"
            )
        return [("", target)], None
    components = getattr(target, "components", None)
    if not isinstance(components, dict):
        components = dict(vars(target)) if hasattr(target, "__dict__") else {}
        components.update({name: getattr(target, name, None) for name in COMPONENT_NAMES if hasattr(target, name)})
    found = [(name, m) for name, m in components.items() if isinstance(m, torch.nn.Module) and _adapter_of(m) is not None]
    if not found:
        present = sorted(type(m).__name__ for m in components.values() if isinstance(m, torch.nn.Module))
        raise NotImplementedError(
            f"diffattn: {type(target).__name__} has no model diffattn can install on (its models: {present}); "
            f"supported model classes: {sorted(ADAPTERS)}"
        )
    return found, target


def _owners() -> dict[str, list[str]]:
    """option name -> methods that have it (to say whose option a misplaced one is)."""
    owners: dict[str, list[str]] = {}
    for name, cls in METHODS.items():
        for f in dataclasses.fields(cls.Config):
            owners.setdefault(f.name, []).append(name)
        for knob in cls.KNOBS:
            owners.setdefault(knob, []).append(name)
    return owners


def _build_method(method: str, family: str, options: dict, pipe):
    if method in GUIDANCE:
        return Dense()
    cls = _method_class(method)
    if family not in FAMILIES:
        raise ValueError(f"diffattn: unknown family={family!r}; valid families: {list(FAMILIES)}")
    if family not in cls.FAMILIES:
        fitting = sorted(m for m, c in METHODS.items() if family in c.FAMILIES)
        raise NotImplementedError(
            f"diffattn: method {method!r} does not fit model family {family!r}; it fits {list(cls.FAMILIES)}. "
            f"Methods for {family!r}: {fitting}"
        )
    declared = (getattr(pipe, "diffattn_defaults", None) or {}).get(method) if pipe is not None else None
    return cls.from_options(family, declared=declared, owners=_owners(), **options)


def _install(target, method: str, options: dict, set_processors: bool) -> tuple[Handle, dict]:
    components, pipe = _components(target)
    for _, model in components:
        existing = getattr(model, HANDLE_ATTR, None)
        if existing is None:
            continue
        if existing.live_on(model):
            raise RuntimeError(
                f"diffattn: {type(model).__name__} already has {existing.method_name!r} applied; call "
                "diffattn.remove(...) (or handle.remove()) first"
            )
        existing.remove()  # a processors() dict that was never set: drop its hook and marker
    name0, model0 = components[0]
    family = options.pop("family", None) or _adapter_of(model0).family(model0, pipe)
    branches = as_guidance(options.pop("guidance", None))
    if method in GUIDANCE:  # guidance alone: the stock attention plus the weak branch
        branches = [guide(method, **options)] + branches
        options = {}
    steps, dicts = [], {}
    lora = options.pop("lora", None)
    lora_scale = options.pop("lora_scale", 1.0)
    if lora is None and lora_scale != 1.0:
        raise ValueError("diffattn: lora_scale= goes with lora=PATH (the weight of the trained LoRA)")
    if lora is not None:
        if not set_processors:
            raise ValueError("diffattn.processors does not load trained weights; use diffattn.apply(target, method, lora=PATH)")
        if len(components) > 1:
            raise ValueError(f"diffattn: lora= loads onto one model, but {type(target).__name__} has {[n for n, _ in components]}; "
                             "apply to the model the weights were trained for")
        options, steps = trained_steps(model0, lora, method, options, scale=lora_scale)
    handle = Handle(method, _build_method(method, family, options, pipe), family, scheduler=getattr(pipe, "scheduler", None), pipe=pipe)
    if branches:
        handle.guide = guidance_branch.Guide(branches)
    for name, model in components:
        adapter = _adapter_of(model)
        original = attn_processors(model)  # key -> processor object, restored by remove()
        new = dict(original)
        levels = adapter.levels(model) if hasattr(adapter, "levels") else {}
        for key, layer in adapter.targets(model).items():
            site = f"{name}.{key}" if name else key
            new[key] = adapter.Processor(handle, layer, stock=original[key], site=site)
            handle.set_probe(model, model.get_submodule(key.removesuffix(".processor")), new[key])
            handle.add_site(site, "", layer)
            if key in levels:
                handle.levels[site] = levels[key]
        if hasattr(adapter, "native_size"):
            handle.state.native = adapter.native_size(model)
        if hasattr(adapter, "structural_steps"):
            steps += adapter.structural_steps(model, handle, pipe, name)  # hooks beyond the processors (RAU-Net, block inputs)
        if branches:
            steps += guidance_branch.install_steps(model, handle, adapter, family, name)  # the weak branch (diffusers hooks)
        steps += [
            ProcessorSwap(model, new, original, set_now=set_processors),
            ForwardHook(model, layout_hook(handle, adapter.grid, getattr(adapter, "forward_facts", None))),
            Marker(model, handle),
        ]
        dicts[id(model)] = new
    handle.install(steps)
    return handle, dicts


def apply(target, method: str, **options) -> Handle:
    """Install ``method`` on a pipeline (every model an adapter knows, one shared handle) or a model.

    Raises ValueError for unknown methods, families or bad option values, NotImplementedError for
    model classes without an adapter or a method that does not fit the model's family,
    RuntimeError when diffattn is already applied. Grid-dependent checks (a window larger than the
    grid) run in the layout hook, before any attention of the first forward.
    """
    handle, _ = _install(target, method, dict(options), set_processors=True)
    return handle


def processors(model: torch.nn.Module, method: str, **options) -> dict:
    """The full processor dict for ``model.set_attn_processor(...)`` (``diffattn.set_attn_processors(model,
    ...)`` for models without that API, e.g. Mochi).

    Entries the method does not apply to (Wan's cross-attention, HunyuanVideo's text refiner) keep
    their current processor objects. The layout hook is registered on ``model`` as part of the same
    handle, so setting the dict is a complete install; ``diffattn.remove(model)`` undoes both. A dict
    that is never set leaves nothing that blocks a later ``apply`` or ``processors``.
    """
    if not isinstance(model, torch.nn.Module):
        raise ValueError(f"diffattn.processors takes a model (an nn.Module), got {type(model).__name__}; use apply() for pipelines")
    _, dicts = _install(model, method, dict(options), set_processors=False)
    return dicts[id(model)]


def remove(target) -> None:
    """Restore the original processors of every model of ``target`` and drop the hooks."""
    components, _ = _components(target)
    handles = {id(h): h for h in (getattr(m, HANDLE_ATTR, None) for _, m in components) if h is not None}
    if not handles:
        raise ValueError(f"diffattn.remove: nothing to remove, diffattn is not applied to {type(target).__name__}")
    for handle in handles.values():
        handle.remove()


def cp_plan(model: torch.nn.Module) -> dict:
    """The context-parallel plan ``model.enable_parallelism(config=..., cp_plan=...)`` needs: the
    diffusers model's own ``_cp_plan`` (Wan, LTX, LTX-2, FLUX.1/2), diffattn's (HunyuanVideo), or
    NotImplementedError saying why the family has none (Mochi, CogVideoX, ...)."""
    adapter = _adapter_of(model)
    if adapter is None:
        raise NotImplementedError(f"diffattn does not support {type(model).__name__}; supported model classes: {sorted(ADAPTERS)}")
    if getattr(model, "_cp_plan", None) is not None:
        return model._cp_plan
    if hasattr(adapter, "cp_plan"):
        return adapter.cp_plan(model)
    processor = adapter.Processor
    why = getattr(processor, "NO_CP", None) if isinstance(processor, type) else None
    raise NotImplementedError(why or f"diffattn: {type(model).__name__} has no context-parallel plan in diffusers or diffattn")


def enable_parallelism(target, config) -> None:
    """``model.enable_parallelism(config=config)`` on every model of ``target`` diffattn supports,
    with ``cp_plan(model)`` where diffusers has no plan, keeping the attention the plan does not
    split on its full input (HunyuanVideo's text refiner). ``config``: diffusers'
    ``ContextParallelConfig(ulysses_degree=..., ring_degree=...)`` (or a ``ParallelConfig``).

    For a diffattn plan (HunyuanVideo) diffattn must be applied first: its processors rebuild the
    padded-text mask of each rank, which the stock ones would get wrong. For models with a diffusers
    plan, ``model.enable_parallelism`` and ``diffattn.apply`` work in either order as well.
    """
    components, _ = _components(target)
    for _, model in components:
        adapter = _adapter_of(model)
        own = getattr(model, "_cp_plan", None) is not None
        plan = None if own else cp_plan(model)
        handle = getattr(model, HANDLE_ATTR, None)
        if not own and (handle is None or not handle.live_on(model)):
            raise RuntimeError(
                f"diffattn: {type(model).__name__}'s context-parallel plan is diffattn's and needs diffattn's processors "
                "(they rebuild each rank's padded-text mask): call diffattn.apply(...) first"
            )
        with _cpu_process_group():
            model.enable_parallelism(config=config, cp_plan=plan)
        if not own:  # diffattn's plan is only right with diffattn's processors: it goes when they go
            handle.install([_PlanStep(model)])
        for name in getattr(adapter, "CP_LOCAL", ()):
            for module in model.get_submodule(name).modules():
                processor = getattr(module, "processor", None)
                if processor is not None and getattr(processor, "_parallel_config", None) is not None:
                    processor._parallel_config = None


@dataclasses.dataclass
class _PlanStep:
    """The install step of diffattn's own context-parallel plan (HunyuanVideo): the stock processors
    would rebuild the padded-text mask wrongly from the split lengths, so ``remove()`` undoes the
    plan first and the model runs whole on every rank again."""

    model: torch.nn.Module

    def do(self) -> None:
        pass

    def undo(self) -> None:
        disable_parallelism(self.model)


def disable_parallelism(target) -> None:
    """Undo ``enable_parallelism``: diffusers' split hooks of the plan removed, every attention
    processor and the model back to no parallel config (diffusers 0.42 has no inverse of its own)."""
    from diffusers.hooks.context_parallel import remove_context_parallel

    components, _ = _components(target)
    for _, model in components:
        if getattr(model, "_parallel_config", None) is None:
            continue
        remove_context_parallel(model, cp_plan(model))
        for module in model.modules():
            processor = getattr(module, "processor", None)
            if processor is not None and getattr(processor, "_parallel_config", None) is not None:
                processor._parallel_config = None
        handle = getattr(model, HANDLE_ATTR, None)
        if handle is not None:  # the stock processors a later remove() restores
            for step in handle._steps:
                for processor in getattr(step, "original", {}).values():
                    if getattr(processor, "_parallel_config", None) is not None:
                        processor._parallel_config = None
        model._parallel_config = None


@contextlib.contextmanager
def _cpu_process_group():
    """diffusers 0.42's ``_resolve_parallel_config`` computes ``rank % torch.accelerator.device_count()``,
    a division by zero in a CPU-only process (a gloo group: tests, CPU clusters). There the count
    reads 1 for the duration of the call; with an accelerator nothing changes."""
    if torch.accelerator.device_count() > 0:
        yield
        return
    count = torch.accelerator.device_count
    torch.accelerator.device_count = lambda: 1
    try:
        yield
    finally:
        torch.accelerator.device_count = count


def patch_size(target) -> tuple[int, int, int]:
    """``(t, y, x)`` latent cells per token of the first supported model of ``target``."""
    components, _ = _components(target)
    model = components[0][1]
    return tuple(int(v) for v in _adapter_of(model).patch_size(model))
