"""The handle returned by ``diffattn.apply``: it owns every piece of per-run state.

State that lives here and nowhere else:
- the install plan's executed steps (processor swaps, forward hooks, later reversible block swaps),
  undone in reverse by ``remove()``;
- the run state (layout, step index, number of steps) shared by every model of a pipeline;
- the bounded cache of block descriptions and compiled kernels, keyed by everything each entry
  depends on;
- the report: per attention call site, what ran (method or stock dense, backend, density) and why.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass, field
from typing import Any, Callable, Hashable

import torch

from .layout import TokenLayout

logger = logging.getLogger("diffattn")

HANDLE_ATTR = "_diffattn_handle"
CACHE_SIZE = 64  # descriptions per handle: a resolution sweep fits, a long-lived server stays bounded


@torch.compiler.disable
def _build(build: Callable[[], Any]) -> Any:
    # Description builds (torch.unique, host loops) run outside a torch.compile graph: only a cache
    # miss, never a hit, leaves the graph.
    return build()


@dataclass
class RunState:
    """Where the current pipeline call is. Written by the layout hook before every forward."""

    layout: TokenLayout | None = None
    no_layout: str | None = None  # why the current forward has no usable layout (its attention runs dense)
    step: int = 0
    num_steps: int | None = None
    last_timestep: float | None = None
    native: tuple[int, int] | None = None  # U-Nets: the latent (rows, cols) the model was trained at
    live: bool = True  # whether this forward's model runs our processors (an unset processors() dict: False)
    forward: dict = field(default_factory=dict)  # per-forward scratch of structural hooks (sizes, block inputs); cleared before each forward

    def observe_timestep(self, timestep: float) -> None:
        """Step tracking without a scheduler: timesteps fall within one pipeline call.

        A repeated value is the same step (CFG runs the transformer twice per step); a smaller one
        is the next step; a larger one starts a new pipeline call.
        """
        if self.last_timestep is None or timestep > self.last_timestep:
            self.step = 0
        elif timestep < self.last_timestep:
            self.step += 1
        self.last_timestep = timestep


# -- the processor slot --------------------------------------------------------------------------

def attn_processors(model: torch.nn.Module) -> dict[str, Any]:
    """``{key: processor}`` of every attention module: diffusers' ``model.attn_processors``, or, for
    models without that API (Mochi in diffusers 0.42), every submodule's ``processor`` attribute
    under the same ``<module>.processor`` keys."""
    if hasattr(model, "attn_processors"):
        return model.attn_processors
    return {f"{name}.processor": m.processor for name, m in model.named_modules() if name and hasattr(m, "processor")}


def set_attn_processors(model: torch.nn.Module, processors: dict[str, Any]) -> None:
    """``model.set_attn_processor(processors)``, or per module where the model lacks that API."""
    if hasattr(model, "set_attn_processor"):
        model.set_attn_processor(dict(processors))
        return
    current = attn_processors(model)
    if set(processors) != set(current):
        raise ValueError(
            f"diffattn: a processor dict must name every attention module of {type(model).__name__}; "
            f"missing {sorted(set(current) - set(processors))[:3]}, unknown {sorted(set(processors) - set(current))[:3]}"
        )
    for key, processor in processors.items():
        setattr(model.get_submodule(key.removesuffix(".processor")), "processor", processor)


# -- install steps: each one reversible ---------------------------------------------------------

@dataclass
class ProcessorSwap:
    """Set ``new`` processors on ``model`` (unless ``set_now`` is False: ``diffattn.processors``
    hands the dict to the user); undo restores ``original``."""

    model: torch.nn.Module
    new: dict[str, Any]
    original: dict[str, Any]
    set_now: bool = True

    def do(self) -> None:
        if self.set_now:
            set_attn_processors(self.model, self.new)

    def undo(self) -> None:
        # diffusers' set_attention_backend / enable_parallelism called while ours were installed set
        # these convention attributes on our processors only; the restored ones take them over
        for key, ours in self.new.items():
            stock = self.original.get(key)
            for name in ("_attention_backend", "_parallel_config"):
                value = getattr(ours, name, None)
                if stock is not ours and value is not None and hasattr(stock, name) and getattr(stock, name) is None:
                    setattr(stock, name, value)
        set_attn_processors(self.model, self.original)


@dataclass
class ForwardHook:
    """A forward pre-hook (with kwargs) on ``model``."""

    model: torch.nn.Module
    hook: Callable
    _removable: Any = None

    def do(self) -> None:
        self._removable = self.model.register_forward_pre_hook(self.hook, with_kwargs=True)

    def undo(self) -> None:
        if self._removable is not None:
            self._removable.remove()
            self._removable = None


@dataclass
class OutputHook:
    """A forward hook (with kwargs) on ``model``, run after its forward; it may replace the output
    (structural changes such as RAU-Net's pooling)."""

    model: torch.nn.Module
    hook: Callable
    _removable: Any = None

    def do(self) -> None:
        self._removable = self.model.register_forward_hook(self.hook, with_kwargs=True)

    def undo(self) -> None:
        if self._removable is not None:
            self._removable.remove()
            self._removable = None


@dataclass
class Marker:
    """The attribute that says "diffattn is applied here" (and to which handle)."""

    model: torch.nn.Module
    handle: "Handle"

    def do(self) -> None:
        setattr(self.model, HANDLE_ATTR, self.handle)

    def undo(self) -> None:
        if getattr(self.model, HANDLE_ATTR, None) is self.handle:
            delattr(self.model, HANDLE_ATTR)


@dataclass
class _Site:
    site: str
    model: str
    layer: int
    calls: int = 0
    method_calls: int = 0
    dense_calls: int = 0
    backends: dict[str, int] = field(default_factory=dict)
    layout: TokenLayout | None = None
    density: float | None = None
    notes: list[str] = field(default_factory=list)
    parallel: dict | None = None  # the last context-parallel call: mode, degree, key tokens moved


class Handle:
    """Per-run state of one ``apply``. Also a context manager: leaving the block removes it."""

    def __init__(self, method_name: str, method: Any, family: str, scheduler: Any = None, cache_size: int = CACHE_SIZE,
                 pipe: Any = None):
        self.method_name = method_name
        self.method = method
        self.family = family
        self.scheduler = scheduler
        self.pipe = pipe  # for the step count of pipelines whose scheduler has no step index (``_num_timesteps``)
        self.levels: dict[str, int] = {}  # U-Nets: site -> resolution level (0 = highest with attention)
        self.state = RunState()
        self.cache_size = cache_size
        self._steps: list[Any] = []
        self._cache: dict[Hashable, Any] = {}
        self._notes: set[str] = set()
        self._sites: dict[str, _Site] = {}
        self._probes: dict[int, tuple] = {}
        self.removed = False
        self.bypassed = False  # every call runs the stock dense attention (a teacher forward)
        self.guide: Any = None  # the guidance branches' runtime state (pipelines.guidance.Guide), or None
        self.captured: dict[str, Any] | None = None  # site -> core attention output, while capturing
        self._capture_sites: frozenset[str] = frozenset()

    # -- installation (used by the API layer) --------------------------------------------------
    def install(self, steps: list[Any]) -> None:
        """Run the plan's steps in order; if one fails, undo the ones done and re-raise."""
        done = []
        try:
            for step in steps:
                step.do()
                done.append(step)
        except BaseException:
            for step in reversed(done):
                step.undo()
            raise
        self._steps.extend(done)

    def add_site(self, site: str, model: str, layer: int) -> None:
        self._sites[site if not model else f"{model}.{site}"] = _Site(site, model, layer)

    @property
    def models(self) -> list[torch.nn.Module]:
        seen = []
        for step in self._steps:
            if isinstance(step, Marker) and step.model not in seen:
                seen.append(step.model)
        return seen

    def set_probe(self, model: torch.nn.Module, module: torch.nn.Module, processor: Any) -> None:
        """Remember one attention module of ``model`` and the processor this handle made for it."""
        self._probes[id(model)] = (module, processor)

    def installed(self, model: torch.nn.Module) -> bool:
        """Whether ``model`` runs this handle's processors (one attribute read: its probe module's)."""
        probe = self._probes.get(id(model))
        return probe is None or getattr(probe[0], "processor", None) is probe[1]

    def owns(self, processor: Any) -> bool:
        return getattr(processor, "handle", None) is self

    def live_on(self, model: torch.nn.Module) -> bool:
        """Whether any of this handle's processors is installed on ``model`` (a ``processors()``
        dict that was never set leaves the handle attached but not live)."""
        return any(self.owns(p) for p in attn_processors(model).values())

    def remove(self) -> None:
        """Undo every install step in reverse; drop caches. Safe to call twice."""
        if self.removed:
            return
        for step in reversed(self._steps):
            step.undo()
        self._steps.clear()
        self._cache.clear()
        self.removed = True

    def __enter__(self) -> "Handle":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()

    # -- training helpers ---------------------------------------------------------------------------
    @contextlib.contextmanager
    def bypass(self):
        """Inside the block every attention call runs the stock dense path (the model as if
        diffattn were not applied: a distillation teacher on the same weights)."""
        previous, self.bypassed = self.bypassed, True
        try:
            yield self
        finally:
            self.bypassed = previous

    @contextlib.contextmanager
    def capture(self, sites):
        """Inside the block, the core attention output ``[B, S, heads, D]`` (before any
        out-projection) of every call at ``sites`` is kept in the yielded dict (the last call per
        site). Sites are the report's names (``handle.report()[i]["site"]``)."""
        unknown = sorted(set(sites) - set(self._sites))
        if unknown:
            raise ValueError(f"diffattn: capture of unknown sites {unknown}; known sites: {sorted(self._sites)}")
        out: dict[str, Any] = {}
        previous = (self.captured, self._capture_sites)
        self.captured, self._capture_sites = out, frozenset(sites)
        try:
            yield out
        finally:
            self.captured, self._capture_sites = previous

    @contextlib.contextmanager
    def weak(self, branch: int = 0):
        """Inside the block every forward of the handle's models is the weak model of guidance
        branch ``branch`` alone (no extra branch, no combination): to look at what the weak branch
        predicts, or to check the guided output against its formula."""
        if self.guide is None:
            raise ValueError(f"diffattn: {self.method_name!r} was applied without guidance; handle.weak() needs a guidance branch")
        with self.guide.weak(branch):
            yield self

    def keep(self, site: str, output) -> None:
        if self.captured is not None and site in self._capture_sites:
            self.captured[site] = output

    # -- per-run state ----------------------------------------------------------------------------
    def begin_forward(self, layout: TokenLayout | str, timestep: torch.Tensor | float | None) -> None:
        """Record layout and step before a model forward; check the layout before any attention.
        ``layout`` may be a string: why this forward has no layout a method can use."""
        state = self.state
        state.forward.clear()
        if isinstance(layout, str):
            state.layout, state.no_layout = None, layout
        else:
            if layout != state.layout:
                self.method.check_layout(layout)
            state.layout, state.no_layout = layout, None
        has_scheduler_index = self.scheduler is not None and hasattr(self.scheduler, "step_index")
        if has_scheduler_index:
            # step_index is None until the first scheduler.step() of a call, then counts steps.
            index = self.scheduler.step_index
            begin = getattr(self.scheduler, "begin_index", None) or 0
            state.step = (index if index is not None else begin) - begin
            timesteps = getattr(self.scheduler, "timesteps", None)
            state.num_steps = len(timesteps) - begin if timesteps is not None else None
        elif timestep is not None and self.needs_step:
            # a host read of the timestep: only when the schedule depends on the step (under
            # torch.compile this is one graph break; apply to the pipeline to read its scheduler)
            value = float(timestep.max()) if torch.is_tensor(timestep) else float(timestep)
            state.observe_timestep(value)
            # pipelines record their step count before the loop (img2img: after the strength cut)
            count = getattr(self.pipe, "_num_timesteps", None)
            state.num_steps = count if isinstance(count, int) and count > 0 else None

    @property
    def needs_step(self) -> bool:
        """Whether the method's decisions depend on the denoising step."""
        needs = getattr(self.method, "needs_step", None)
        return needs if needs is not None else self.method.config.schedule.needs_step

    def cache(self, key: Hashable, build: Callable[[], Any]) -> Any:
        """Cached value for ``key`` (which names every input it depends on), built on first use.
        Bounded: past ``cache_size`` entries the oldest goes."""
        if key in self._cache:
            return self._cache[key]
        value = _build(build)
        if len(self._cache) >= self.cache_size:
            self._cache.pop(next(iter(self._cache)))
        self._cache[key] = value
        return value

    @property
    def cache_len(self) -> int:
        return len(self._cache)

    def note_once(self, message: str) -> None:
        """Log a declared fallback once per handle."""
        if message not in self._notes:
            self._notes.add(message)
            logger.info(message)

    def record(self, site: str, *, mode: str, layout: TokenLayout, backend: str | None = None,
               density: float | None = None, note: str | None = None) -> None:
        """What one attention call ran: ``mode`` "method" or "dense" (the stock path).

        Calls inside a ``torch.compile`` graph are not recorded: dynamo guards on what the graph
        reads and replays what it writes, so a counter incremented there recompiled the graph at
        every call (past its recompile limit the model ran eagerly), and any write inside a
        checkpointed block breaks the graph. The report holds the eager calls (such as the call
        that built the descriptions before compiling); see ``report``."""
        if torch.compiler.is_compiling():
            return
        entry = self._sites.get(site)
        if entry is None:
            entry = self._sites[site] = _Site(site, "", -1)
        entry.calls += 1
        entry.layout = layout
        if mode == "method":
            entry.method_calls += 1
            entry.density = density
            if backend is not None:
                entry.backends[backend] = entry.backends.get(backend, 0) + 1
        else:
            entry.dense_calls += 1
        if note and note not in entry.notes:
            entry.notes.append(note)

    def record_parallel(self, site: str, **facts) -> None:
        """How the last call at ``site`` ran under context parallelism (``mode``, ``degree``; the
        ring's ``keys_moved`` vs ``keys_all_gather`` tokens per rank)."""
        entry = self._sites.get(site)
        if entry is not None:
            entry.parallel = dict(facts)

    def report(self) -> list[dict]:
        """Per attention call site: calls, how many ran the method and how many the stock dense
        path, the backends used, the last layout and density, and every fallback note (why).
        Eager calls only: calls inside a ``torch.compile`` graph are not recorded (``record``)."""
        return [
            {
                "site": key, "layer": s.layer, "calls": s.calls, "method_calls": s.method_calls,
                "dense_calls": s.dense_calls, "backends": dict(s.backends), "layout": s.layout,
                "density": s.density, "notes": list(s.notes), "parallel": s.parallel,
            }
            for key, s in self._sites.items()
        ]

    def summary(self) -> dict:
        """One line of the report: method calls, dense calls, backends, the mean density of the
        method calls and the last layout seen."""
        rows = self.report()
        method = sum(r["method_calls"] for r in rows)
        backends: dict[str, int] = {}
        for r in rows:
            for name, n in r["backends"].items():
                backends[name] = backends.get(name, 0) + n
        weighted = [(r["density"], r["method_calls"]) for r in rows if r["density"] is not None and r["method_calls"]]
        density = sum(d * n for d, n in weighted) / sum(n for _, n in weighted) if weighted else None
        layouts = [r["layout"] for r in rows if r["layout"] is not None]
        out = {
            "method": self.method_name, "family": self.family, "method_calls": method,
            "dense_calls": sum(r["dense_calls"] for r in rows), "backends": backends, "density": density,
            "layout": self.state.layout if self.state.layout is not None else (layouts[-1] if layouts else None),
            "notes": sorted({n for r in rows for n in r["notes"]} | self._notes),
        }
        if self.guide is not None:
            out["guidance"] = {"branches": self.guide.names, **self.guide.stats}
        return out

    def __repr__(self) -> str:
        names = [type(m).__name__ for m in self.models]
        status = "removed" if self.removed else "active"
        return f"Handle(method={self.method_name!r}, family={self.family!r}, models={names}, {status})"
