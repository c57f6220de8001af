"""What every guidance method shares: the weak-branch config, the step window, the per-layer plan.

Every guidance method here is one extra forward of the *conditional* model with a weakened internal
computation (research/guidance.md §0). The pipeline's output becomes (the pipeline convention of
every official PAG / SEG / STG / HeadHunter release, §1.2)

    eps = eps_u + w_cfg (eps_c - eps_u) + s (eps_c - eps_weak)          with CFG
    eps = eps_c + s (eps_c - eps_weak)                                  without (guidance-distilled)

A config says *what* the weak model is: which layers (and heads) are perturbed and how, the scale
``s``, the step window and PAG's adaptive decay. ``plan(info)`` turns it into a ``Plan`` for one
model: per layer a ``Perturbation`` (an identity blend with per-head weights ``u``, a query blur, or
a skipped block), checked against the model's real layer and head counts. The plan is pure data; the
processors (``pipelines/``) apply it inside diffattn's own attention, so it composes with every
method and kernel.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields, replace
from typing import Any, ClassVar

from diffattn.core.checks import check_bool, check_choice, check_number

BATCH_MODES = ("auto", "joint", "separate")

# Default perturbed layers per family, as (reference layer indices, reference depth): a model of
# another depth (a tiny test model, Wan 1.3B vs 14B) gets round(i * depth / reference depth).
# Sources (research/guidance.md): SD U-Nets "mid" (diffusers PAG pipelines, the original PAG
# release); SD3 PAG layer 13 of 24 (the SD3 PR's and the docstring's example), SD3 STG/SLG 7-9 of 24
# (StabilityAI's SD3.5-Medium recommendation); the video families' STG blocks from the official STG
# inference scripts (Wan 2 of 30, HunyuanVideo 2 of 20 double blocks, CogVideoX 11 of 42, LTX 19 of
# 28, Mochi 34 of 48). Wan PAG: layer 8 of 30 (Wan2GP found skip layers 8-9 the helpful ones).
# FLUX has no reference (no PAG pipeline in diffusers; HeadHunter's FLUX heads sit in layers 34-54
# of 57): the middle layer. Families not listed use the middle layer.
PAG_LAYERS = {
    "wan2.1": ((8,), 30), "wan2.2": ((8,), 30), "skyreels_v2": ((8,), 30),
    "hunyuan_video": ((2,), 60), "hunyuan_video15": ((2,), 54),
    "cogvideox": ((11,), 42), "ltx": ((19,), 28), "mochi": ((34,), 48), "sd3": ((13,), 24),
}
STG_LAYERS = {**PAG_LAYERS, "wan2.1": ((2,), 30), "wan2.2": ((2,), 30), "skyreels_v2": ((2,), 30), "sd3": ((7, 8, 9), 24)}
UNET_FAMILIES = ("sd1.5", "sd2.1", "sdxl", "sdxl-turbo")


@dataclass(frozen=True)
class ModelInfo:
    """What a plan needs to know about one model (built by the adapter layer).

    layers:  number of attention layers in the adapter's numbering (0..layers-1).
    heads:   ``{layer: heads}`` of each attention layer.
    named:   named layer groups (U-Nets: ``{"mid": (...), "down": (...), "up": (...)}``).
    family:  the model family.
    """

    layers: int
    heads: dict[int, int]
    named: dict[str, tuple[int, ...]] = field(default_factory=dict)
    family: str = ""


@dataclass(frozen=True)
class Perturbation:
    """What the weak branch does at one layer.

    kind:   "blend" (attention output -> (1 - u_h) O_h + u_h V_h per head h), "seg" (queries blurred
            over the token grid with ``sigma`` tokens, ``frame_sigma`` across frames; inf = the mean),
            or "skip" (the whole block returns its input: STG's residual skip).
    u:      per-head weights (blend), or per-head 0/1 (seg: which heads see the blurred queries).
    """

    kind: str
    u: tuple[float, ...] = ()
    sigma: float = math.inf
    frame_sigma: float = 0.0

    @property
    def full_identity(self) -> bool:
        """Every head is replaced by V: the attention itself need not run."""
        return self.kind == "blend" and all(w == 1.0 for w in self.u)


@dataclass(frozen=True)
class Plan:
    """The weak model of one guidance branch on one model: ``{layer: Perturbation}``."""

    name: str
    layers: dict[int, Perturbation]

    @property
    def first_layer(self) -> int:
        return min(self.layers)

    def skipped(self) -> tuple[int, ...]:
        return tuple(sorted(l for l, p in self.layers.items() if p.kind == "skip"))


@dataclass(frozen=True)
class GuidanceConfig:
    """Options every guidance method has.

    scale:        s, the weight of (eps_c - eps_weak). PAG/SEG: 3.0 in their releases; smaller on
                  guidance-distilled or step-distilled models (they burn, research §8).
    layers:       perturbed layers (the adapter's numbering, ``diffattn.attention_modules``), "mid" /
                  "down" / "up" on U-Nets, "all", or None for the family's default.
    steps:        (start, end) fractions of the denoising steps where the weak branch runs: step i of
                  T runs it when start * T <= i < end * T. (0, 1) is every step (the papers);
                  diffusers' guiders use about (0.01, 0.2), which costs a fifth.
    adaptive:     PAG's decay: s(t) = max(0, s - adaptive * (1000 - t)), t the scheduler timestep on
                  0..1000 (flow models: sigma * 1000). 0 keeps s constant.
    batch:        "auto" (joint where the pipeline batches its CFG passes, separate calls where it
                  calls the model once per branch), "joint" (the weak rows appended to the batch:
                  faster, more activation memory), "separate" (one more forward call: the memory-safe
                  choice for long videos, and the one that can share the prefix).
    share_prefix: separate calls: the blocks before the first perturbed layer are identical in the
                  conditional and the weak branch; the weak forward reuses the conditional one's
                  output of the last of them instead of recomputing them.
    """

    name: ClassVar[str] = ""
    DEFAULT_SCALE: ClassVar[float] = 3.0

    scale: float = 3.0
    layers: Any = None
    steps: tuple[float, float] = (0.0, 1.0)
    adaptive: float = 0.0
    batch: str = "auto"
    share_prefix: bool = True

    def __post_init__(self):
        check_number("scale", self.scale, hint=" (the weight of the weak branch; to turn guidance off, remove it)")
        check_number("adaptive", self.adaptive, positive=False)
        if self.adaptive < 0:
            raise ValueError(f"adaptive must be >= 0 (PAG's decay per timestep), got adaptive={self.adaptive!r}")
        steps = self.steps
        if (not isinstance(steps, (tuple, list)) or len(steps) != 2
                or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in steps)):
            raise ValueError(f"steps must be (start, end) fractions of the denoising steps, got steps={steps!r}")
        start, end = float(steps[0]), float(steps[1])
        if not 0.0 <= start < end <= 1.0:
            raise ValueError(
                f"steps=(start, end) needs 0 <= start < end <= 1, got steps={steps!r}; an empty window runs no "
                "guidance at all: remove the guidance instead"
            )
        object.__setattr__(self, "steps", (start, end))
        check_choice("batch", self.batch, BATCH_MODES)
        check_bool("share_prefix", self.share_prefix)
        object.__setattr__(self, "layers", _normal_layers(self.layers))

    # -- the window and the scale --------------------------------------------------------------------
    def in_window(self, step: int, num_steps: int | None) -> bool:
        start, end = self.steps
        if num_steps is None:
            if (start, end) != (0.0, 1.0):
                raise ValueError(
                    f"{self.name}: steps={self.steps} needs the number of denoising steps; apply diffattn to the "
                    "pipeline (not the bare model), or use steps=(0, 1)"
                )
            return True
        return start * num_steps <= step < end * num_steps

    def scale_at(self, timestep: float | None) -> float:
        if not self.adaptive:
            return self.scale
        if timestep is None:
            raise ValueError(f"{self.name}: adaptive= needs the timestep of each forward; the model was called without one")
        return max(0.0, self.scale - self.adaptive * (1000.0 - timestep))

    # -- the plan ----------------------------------------------------------------------------------------
    def default_layers(self, info: ModelInfo) -> tuple[int, ...]:
        return scaled_default(PAG_LAYERS, info)

    def chosen_layers(self, info: ModelInfo) -> tuple[int, ...]:
        layers = self.layers
        if layers is None:
            return self.default_layers(info)
        if layers == "all":
            return tuple(range(info.layers))
        if isinstance(layers, str):
            if layers not in info.named:
                valid = ["all", *info.named] if info.named else ["all"]
                raise ValueError(f"{self.name}: layers={layers!r} is not a layer group of this model; use layer indices "
                                 f"0..{info.layers - 1} or one of {valid}")
            return info.named[layers]
        check_layers(self.name, layers, info)
        return layers

    def perturbation(self, layer: int, heads: int) -> Perturbation:
        raise NotImplementedError

    def plan(self, info: ModelInfo) -> Plan:
        layers = self.chosen_layers(info)
        if not layers:
            raise ValueError(f"{self.name}: no layer is perturbed (layers={self.layers!r}); name at least one layer")
        return Plan(self.name, {l: self.perturbation(l, info.heads[l]) for l in layers})

    def with_options(self, **options):
        return replace(self, **options)


def _normal_layers(layers):
    if layers is None or isinstance(layers, str):
        return layers
    if isinstance(layers, int) and not isinstance(layers, bool):
        return (layers,)
    if isinstance(layers, range):
        layers = tuple(layers)
    if not isinstance(layers, (tuple, list)) or not all(isinstance(l, int) and not isinstance(l, bool) for l in layers):
        raise ValueError(f"layers must be layer indices (ints), a layer group name or None, got layers={layers!r}")
    if len(set(layers)) != len(layers):
        raise ValueError(f"layers has repeated indices: layers={layers!r}")
    return tuple(sorted(layers))


def check_layers(name: str, layers, info: ModelInfo) -> None:
    bad = [l for l in layers if not 0 <= l < info.layers]
    if bad:
        raise ValueError(f"{name}: layer(s) {bad} out of range; this model has attention layers 0..{info.layers - 1} "
                         "(diffattn.attention_modules(model) lists them)")


def check_heads(name: str, layer: int, heads, count: int) -> None:
    bad = [h for h in heads if not (isinstance(h, int) and not isinstance(h, bool) and 0 <= h < count)]
    if bad:
        raise ValueError(f"{name}: head(s) {bad} out of range for layer {layer}, which has heads 0..{count - 1}")


def scaled_default(table: dict, info: ModelInfo) -> tuple[int, ...]:
    """The family's default layers at this model's depth (see ``PAG_LAYERS``)."""
    if info.family in UNET_FAMILIES and "mid" in info.named:
        return info.named["mid"]
    entry = table.get(info.family)
    if entry is None:
        return (info.layers // 2,)
    indices, depth = entry
    return tuple(sorted({min(info.layers - 1, round(i * info.layers / depth)) for i in indices}))


def config_names(cls) -> set[str]:
    return {f.name for f in fields(cls)}
