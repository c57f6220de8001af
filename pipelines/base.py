"""What every model adapter shares: the processor plumbing and the layout hook.

An adapter module (one per diffusers model family) provides:
- ``FAMILY`` and ``MODEL_CLASSES`` (the diffusers class names it handles);
- ``family(model, pipe)``: the family name used for method defaults (e.g. "wan2.1" / "wan2.2");
- ``targets(model)``: ``{processor key: layer index}`` of the attention modules the methods replace;
- ``grid(model, hidden_states)``: the ``TokenLayout`` of the video tokens of one forward;
- ``Processor``: the diffusers processor that reproduces the stock one and calls the method.
"""

from __future__ import annotations

import torch

from diffattn.core.context import AttnContext
from diffattn.core.handle import Handle
from diffattn.core.layout import TokenLayout


class DiffattnProcessor:
    """Base of the adapters' processors: holds the handle and this module's layer index.

    ``_attention_backend`` and ``_parallel_config`` follow the diffusers convention, so
    ``set_attention_backend`` and ``enable_parallelism`` reach the dense path. They are copied from
    the stock processor this one replaces, so dense steps behave exactly as before.
    """

    _attention_backend = None
    _parallel_config = None

    def __init__(self, handle: Handle, layer: int, stock=None):
        self.handle = handle
        self.layer = layer
        if stock is not None:
            self._attention_backend = getattr(stock, "_attention_backend", None)
            self._parallel_config = getattr(stock, "_parallel_config", None)

    def context(self, layout: TokenLayout, kv_len: torch.Tensor | None = None) -> AttnContext:
        state = self.handle.state
        return AttnContext(
            layout=layout, step=state.step, num_steps=state.num_steps, layer=self.layer,
            kv_len=kv_len, cache=self.handle.cache, note=self.handle.note_once,
        )

    def video_layout(self) -> TokenLayout:
        layout = self.handle.state.layout
        if layout is None:
            raise RuntimeError(
                "diffattn: the attention processor ran before the layout hook; call the transformer "
                "(or pipeline) it was installed on, not the attention module directly"
            )
        return layout

    def check_parallel(self) -> None:
        if self._parallel_config is not None:
            raise NotImplementedError(
                f"diffattn {self.handle.method_name}: diffusers context parallelism is not supported for "
                "sparse steps yet; call transformer.enable_parallelism only without diffattn, or remove diffattn"
            )

    def run_method(self, query, key, value, ctx: AttnContext) -> torch.Tensor:
        """query/key/value in diffusers' [B, S, heads, D]; returns [B, S, heads, D]."""
        self.check_parallel()
        out = self.handle.method(query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2), ctx)  # [B, H, S, D]
        return out.transpose(1, 2)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(method={self.handle.method_name!r}, layer={self.layer})"


def register_layout_hook(model: torch.nn.Module, handle: Handle, grid):
    """Forward pre-hook on the transformer: record the layout and step before every forward."""

    def hook(module, args, kwargs):
        hidden_states = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        timestep = kwargs["timestep"] if "timestep" in kwargs else (args[1] if len(args) > 1 else None)
        handle.begin_forward(grid(module, hidden_states), timestep)

    return model.register_forward_pre_hook(hook, with_kwargs=True)
