"""diffattn: sparse and linear attention for diffusers video and image pipelines.

    import diffattn
    handle = diffattn.apply(pipe, "radial")          # every transformer of the pipeline
    video = pipe(prompt=..., num_frames=...).frames[0]
    diffattn.remove(pipe)                           # original processors, bit-identical output

or, model-level:

    model.set_attn_processor(diffattn.processors(model, "radial"))
    diffattn.remove(model)

Method options (``decay=``, ``dense_steps=``, ...) go to the method's config; ``backend=`` ("auto",
"triton", "flex", "sdpa") and ``family=`` (override the detected family defaults) are keyword-only
knobs. ``apply`` returns a ``Handle``, also usable as a context manager.
"""

from __future__ import annotations

import torch

from diffattn.core.handle import HANDLE_ATTR, Handle
from diffattn.core.layout import TokenLayout
from diffattn.methods import METHODS
from diffattn.pipelines import ADAPTERS
from diffattn.pipelines.base import register_layout_hook

__version__ = "0.1.0"
__all__ = ["Handle", "TokenLayout", "apply", "methods", "processors", "remove", "supported_models"]

TRANSFORMER_ATTRS = ("transformer", "transformer_2")


def methods() -> list[str]:
    return sorted(METHODS)


def supported_models() -> list[str]:
    return sorted(ADAPTERS)


def _adapter(model):
    for cls in type(model).__mro__:
        if cls.__name__ in ADAPTERS:
            return ADAPTERS[cls.__name__]
    raise NotImplementedError(
        f"diffattn does not support {type(model).__name__}; supported model classes: {supported_models()} "
        "(pass a pipeline that has one of them as .transformer, or the model itself)"
    )


def _models_of(target) -> tuple[list[torch.nn.Module], object]:
    """(transformers, pipeline or None) of a pipeline or a bare model."""
    if isinstance(target, torch.nn.Module):
        return [target], None
    found = [getattr(target, name) for name in TRANSFORMER_ATTRS if isinstance(getattr(target, name, None), torch.nn.Module)]
    if not found:
        raise NotImplementedError(
            f"diffattn: {type(target).__name__} has no transformer to install on (looked for "
            f"{TRANSFORMER_ATTRS}); supported model classes: {supported_models()}"
        )
    return found, target


def _method(method: str, family: str, options: dict):
    if not isinstance(method, str) or method not in METHODS:
        raise ValueError(f"diffattn: unknown method {method!r}; available methods: {methods()}")
    return METHODS[method].from_options(family, **options)


def _install(target, method: str, options: dict, set_processors: bool) -> tuple[Handle, dict]:
    models, pipe = _models_of(target)
    adapters = [_adapter(model) for model in models]
    for model in models:
        existing = getattr(model, HANDLE_ATTR, None)
        if existing is not None:
            raise RuntimeError(
                f"diffattn: {type(model).__name__} already has {existing.method_name!r} applied; call "
                "diffattn.remove(...) (or handle.remove()) first"
            )
    family = options.pop("family", None) or adapters[0].family(models[0], pipe)
    handle = Handle(method, _method(method, family, options), family, scheduler=getattr(pipe, "scheduler", None))
    dicts = {}
    for model, adapter in zip(models, adapters):
        original = model.attn_processors  # name -> processor object, restored by remove()
        targets = adapter.targets(model)
        new = dict(original)
        for name, layer in targets.items():
            new[name] = adapter.Processor(handle, layer, stock=original[name])
        hook = register_layout_hook(model, handle, adapter.grid)
        handle.attach(model, original, hook)
        dicts[id(model)] = new
        if set_processors:
            model.set_attn_processor(dict(new))
    return handle, dicts


def apply(target, method: str, **options) -> Handle:
    """Install ``method`` on a pipeline (every transformer it has, one shared handle) or a model.

    Raises ValueError for unknown methods or bad option values, NotImplementedError for model
    classes diffattn has no adapter for, RuntimeError when diffattn is already applied.
    """
    handle, _ = _install(target, method, dict(options), set_processors=True)
    return handle


def processors(model: torch.nn.Module, method: str, **options) -> dict:
    """The full processor dict for ``model.set_attn_processor(...)``.

    Entries the method does not apply to (Wan's cross-attention, HunyuanVideo's text refiner) keep
    their current processor objects. The layout hook is registered on ``model`` as part of the same
    handle, so setting the dict is a complete install; ``diffattn.remove(model)`` undoes both.
    """
    if not isinstance(model, torch.nn.Module):
        raise ValueError(f"diffattn.processors takes a model (an nn.Module), got {type(model).__name__}; use apply() for pipelines")
    _, dicts = _install(model, method, dict(options), set_processors=False)
    return dicts[id(model)]


def remove(target) -> None:
    """Restore the original processors of every transformer of ``target`` and drop the hooks."""
    models, _ = _models_of(target)
    handles = {id(h): h for h in (getattr(m, HANDLE_ATTR, None) for m in models) if h is not None}
    if not handles:
        raise ValueError(f"diffattn.remove: nothing to remove, diffattn is not applied to {type(target).__name__}")
    for handle in handles.values():
        handle.remove()
