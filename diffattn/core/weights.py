"""Trained weights for a method (a distilled CLEAR student): the file format and the reversible
install step ``apply(..., lora=PATH)`` uses.

A trained folder holds
- ``pytorch_lora_weights.safetensors``: a diffusers LoRA (``load_lora_weights`` / the model's
  ``load_lora_adapter`` read it), or ``full_weights.safetensors``: the fine-tuned linears'
  tensors under their ``transformer.<module>`` names;
- ``diffattn.json``: the method, its options (radius, down_factor; a length LoRA's dense_layers
  and block sizes) and the base model's fingerprint (class and config), so trained weights are
  never loaded onto another base or run with other options; ``"combinable": true`` (length LoRAs)
  lets them join LoRA adapters the user already loaded (a style LoRA) instead of refusing them.
Only safetensors are read.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

META_NAME = "diffattn.json"
LORA_NAME = "pytorch_lora_weights.safetensors"
FULL_NAME = "full_weights.safetensors"
ADAPTER_NAME = "diffattn"
_FINGERPRINT_SKIP = ("_", "sample_size", "pos_embed_max_size")  # keys that do not change the weights' shapes


def fingerprint(model: torch.nn.Module) -> dict:
    """The base model's class and the config entries that fix its weights' shapes."""
    config = {k: v for k, v in dict(model.config).items() if not k.startswith(_FINGERPRINT_SKIP)}
    # the model's own class, not the subclass torch.distributed makes of a sharded one (FSDP)
    cls = next(c for c in type(model).__mro__ if not c.__module__.startswith("torch.distributed"))
    return {"class": cls.__name__, "config": json.loads(json.dumps(config, default=list))}


def write_meta(folder: str | Path, *, method: str, options: dict, model: torch.nn.Module, kind: str, extra: dict | None = None) -> Path:
    path = Path(folder) / META_NAME
    meta = {"method": method, "options": options, "base": fingerprint(model), "kind": kind, **(extra or {})}
    path.write_text(json.dumps(meta, indent=1))
    return path


def read_meta(path: str | Path) -> tuple[Path, dict]:
    """(folder, meta) of a trained folder (or of a file inside it)."""
    folder = Path(path)
    if folder.is_file():
        folder = folder.parent
    meta_path = folder / META_NAME
    if not meta_path.is_file():
        raise ValueError(
            f"diffattn: {path} is not a diffattn training output (no {META_NAME}); pass the folder "
            "`diffattn train clear|length --out` wrote"
        )
    meta = json.loads(meta_path.read_text())
    weights = folder / (LORA_NAME if meta.get("kind") == "lora" else FULL_NAME)
    if not weights.is_file():
        raise ValueError(f"diffattn: {folder} has {META_NAME} but no {weights.name}; the training run did not finish")
    return folder, meta


def check_compatible(meta: dict, method: str, model: torch.nn.Module, options: dict) -> dict:
    """The options to apply with (the trained ones, unless the user passed the same values);
    raises naming the fix for another method, base model or option value."""
    if meta["method"] == "dense" and method != "dense":
        raise ValueError(
            f"diffattn: these weights were trained with dense attention (no diffattn method); load them with "
            f"pipe.load_lora_weights(folder) and run the pipeline as it is, or train with the method {method!r}"
        )
    if meta["method"] != method:
        raise ValueError(f"diffattn: these weights were trained for method {meta['method']!r}; apply {meta['method']!r} with them")
    base = fingerprint(model)
    if base != meta["base"]:
        diff = sorted(k for k in set(base["config"]) | set(meta["base"]["config"])
                      if base["config"].get(k) != meta["base"]["config"].get(k))
        raise ValueError(
            f"diffattn: these weights were trained on another base model ({meta['base']['class']}, differing in "
            f"{diff or ['class']}); load them onto the model they were trained on, or train for this one"
        )
    merged = dict(options)
    for name, value in meta["options"].items():
        value = tuple(value) if isinstance(value, list) else value  # JSON keeps tuples (kernel sizes) as lists
        if name in merged and merged[name] != value:
            raise ValueError(
                f"diffattn: these weights were trained with {name}={value!r}, not {name}={merged[name]!r}; "
                f"pass {name}={value!r} (or leave it out), or train for {name}={merged[name]!r}"
            )
        merged[name] = value
    return merged


@dataclass
class TrainedWeightsLoad:
    """Install step: load trained weights into ``model``; undo restores the model exactly (the
    LoRA adapter is deleted; fine-tuned tensors get their original values back)."""

    model: torch.nn.Module
    folder: Path
    kind: str
    combinable: bool = False  # join the adapters already loaded (their weights kept) instead of refusing them
    scale: float = 1.0
    _saved: dict[str, torch.Tensor] = field(default_factory=dict)
    _previous: list = field(default_factory=list)  # [(adapter, weight)] active before do()
    _loaded: list = field(default_factory=list)    # adapters loaded (active or not) before do()

    def do(self) -> None:
        from safetensors.torch import load_file

        if self.kind == "lora":
            loaded = sorted(getattr(self.model, "peft_config", None) or {})
            if ADAPTER_NAME in loaded:
                raise RuntimeError(f"diffattn: the model already has an adapter named {ADAPTER_NAME!r}; delete it "
                                   f"(model.delete_adapters({ADAPTER_NAME!r})) before applying with lora=")
            if loaded and not self.combinable:
                raise RuntimeError(
                    f"diffattn: the model has LoRA adapters loaded ({loaded}); a CLEAR student is trained on the bare "
                    "base model: fuse them (pipe.fuse_lora(); pipe.unload_lora_weights()) or unload them first, or load "
                    "the student yourself with load_lora_weights and apply without lora="
                )
            if loaded and _merged_layers(self.model):
                raise RuntimeError(
                    f"diffattn: the model has a fused LoRA ({loaded}): peft then runs no other adapter on those layers, so "
                    "these weights would load and do nothing there; unfuse it (pipe.unfuse_lora()) or unload it first"
                )
            self._previous = active_adapter_weights(self.model) if loaded else []
            self._loaded = list(loaded)
            # the folder and weight_name (not the file's path): diffusers reads the rank/alpha metadata only then
            self.model.load_lora_adapter(str(self.folder), weight_name=LORA_NAME, prefix="transformer", adapter_name=ADAPTER_NAME)
            if self._previous or self.scale != 1.0:
                names = [n for n, _ in self._previous] + [ADAPTER_NAME]
                try:
                    self.model.set_adapters(names, [w for _, w in self._previous] + [self.scale])
                except Exception:
                    self.undo()  # not installed: take ours out again, the user's as they were
                    raise
            return
        tensors = load_file(str(self.folder / FULL_NAME))
        params = dict(self.model.named_parameters())
        missing = [k for k in tensors if k.removeprefix("transformer.") not in params]
        if missing:
            raise ValueError(f"diffattn: fine-tuned tensors {missing[:3]} do not exist in this model; load them onto their base model")
        with torch.no_grad():
            for key, value in tensors.items():
                p = params[key.removeprefix("transformer.")]
                self._saved[key] = p.detach().clone()
                p.copy_(value.to(p.dtype))

    def undo(self) -> None:
        if self.kind == "lora":
            if ADAPTER_NAME not in (getattr(self.model, "peft_config", None) or {}):
                return
            others = [n for n in self.model.peft_config if n != ADAPTER_NAME]
            if not others:
                self.model.unload_lora()  # ours was the only adapter: the base modules come back
                return
            # the user's adapters stay: those active before apply() with their weights, and any loaded
            # since, as they are now
            keep = dict(self._previous)
            for name, weight in active_adapter_weights(self.model):
                if name != ADAPTER_NAME and name not in self._loaded:
                    keep[name] = weight
            self.model.delete_adapters(ADAPTER_NAME)
            if keep:
                self.model.set_adapters(list(keep), list(keep.values()))
            return
        params = dict(self.model.named_parameters())
        with torch.no_grad():
            for key, value in self._saved.items():
                params[key.removeprefix("transformer.")].copy_(value)
        self._saved.clear()


def _merged_layers(model: torch.nn.Module) -> bool:
    from peft.tuners.tuners_utils import BaseTunerLayer

    return any(isinstance(m, BaseTunerLayer) and m.merged for m in model.modules())


def active_adapter_weights(model: torch.nn.Module) -> list[tuple[str, float]]:
    """[(adapter, weight)] of the model's active LoRA adapters, the weights read back from the
    layers' scaling (``set_adapters`` weight = scaling / (alpha / r), or alpha / sqrt(r) with rsLoRA)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    names = list(model.active_adapters()) if getattr(model, "peft_config", None) else []
    weights = {}
    for module in model.modules():
        if isinstance(module, BaseTunerLayer) and hasattr(module, "scaling"):
            for name in names:
                if name in module.scaling and name not in weights:
                    r, alpha = module.r[name], module.lora_alpha[name]
                    base = alpha / (r ** 0.5 if module.use_rslora.get(name, False) else r)
                    weights[name] = module.scaling[name] / base
    return [(n, float(weights.get(n, 1.0))) for n in names]


def trained_steps(model: torch.nn.Module, path: Any, method: str, options: dict, scale: float = 1.0) -> tuple[dict, list]:
    """(options merged with the trained ones, [the install step]) for ``apply(..., lora=path)``."""
    folder, meta = read_meta(path)
    if meta["kind"] != "lora" and scale != 1.0:
        raise ValueError("diffattn: lora_scale= weighs a LoRA; these are fine-tuned weights (full_weights.safetensors): leave it out")
    merged = check_compatible(meta, method, model, options)
    return merged, [TrainedWeightsLoad(model, folder, meta["kind"], combinable=bool(meta.get("combinable")), scale=scale)]
