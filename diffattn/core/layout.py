"""TokenLayout: where every token of one attention call sits.

The latent grid is ``(F, Y, X)``: frames, rows and columns after patchify (the letter H is kept for
heads). Video tokens are frame-major, then row, then column: token ``t = f * Y * X + y * X + x``.
Text tokens, when the model runs joint attention, are counted and placed explicitly (HunyuanVideo
puts them after the video, CogVideoX before); they are never inferred from a magic number.
"""

from __future__ import annotations

from dataclasses import dataclass

TEXT_POSITIONS = ("none", "after", "before")


@dataclass(frozen=True)
class TokenLayout:
    frames: int
    rows: int
    cols: int
    text_tokens: int = 0
    text_position: str = "none"

    def __post_init__(self):
        for name in ("frames", "rows", "cols"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"TokenLayout.{name} must be a positive int, got {name}={value!r}")
        if not isinstance(self.text_tokens, int) or self.text_tokens < 0:
            raise ValueError(f"TokenLayout.text_tokens must be an int >= 0, got {self.text_tokens!r}")
        if self.text_position not in TEXT_POSITIONS:
            raise ValueError(
                f"TokenLayout.text_position must be one of {TEXT_POSITIONS}, got {self.text_position!r}"
            )
        if (self.text_tokens > 0) != (self.text_position != "none"):
            raise ValueError(
                "TokenLayout: text_tokens > 0 needs text_position 'after' or 'before', and "
                f"text_position 'none' needs text_tokens == 0; got text_tokens={self.text_tokens}, "
                f"text_position={self.text_position!r}"
            )

    @property
    def tokens_per_frame(self) -> int:
        return self.rows * self.cols

    @property
    def video_tokens(self) -> int:
        return self.frames * self.rows * self.cols

    @property
    def seq_len(self) -> int:
        return self.video_tokens + self.text_tokens

    @property
    def video_start(self) -> int:
        return self.text_tokens if self.text_position == "before" else 0

    def __repr__(self) -> str:
        text = f", text={self.text_tokens}@{self.text_position}" if self.text_tokens else ""
        return f"TokenLayout(F={self.frames}, Y={self.rows}, X={self.cols}{text})"
