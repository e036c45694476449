"""Settings both framework adapters take as fields, declared once (both frameworks build on pydantic)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field

from blockrag.engine import DecodeMode

from .runner import DECODE_DESCRIPTION, GATE_DESCRIPTION


class DecodeFields(BaseModel):
    """How an adapter decodes (as :class:`blockrag.engine.GenerationOptions` describes) and how often its
    correctness gate checks an answer; each may be given per call too."""

    decode: DecodeMode | Literal["auto"] = Field(default="auto", description=DECODE_DESCRIPTION)
    recycle_k: int | float = Field(default=1 / 8, description="Recycled and streaming budget: tokens or a fraction.")
    stride: int = Field(default=10, gt=0, description="Steps between Recycled Attention's full steps.")
    dynamic_threshold: float | None = Field(default=None, description="Query similarity that triggers a full step.")
    gate_fraction: float = Field(default=0.0, ge=0.0, le=1.0, description=GATE_DESCRIPTION)
