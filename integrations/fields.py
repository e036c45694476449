"""What both framework adapters share, declared once (both frameworks build on pydantic): the settings they take
as fields, and the runner, engine, gate and passages behind them."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field, PrivateAttr

from blockrag.engine import DEFAULT_MODEL, BlockEngine, DecodeMode, PrefillMode

from .gate import Gate
from .matching import PassageIndex
from .runner import DECODE_DESCRIPTION, GATE_DESCRIPTION, PromptRunner


class AdapterFields(BaseModel):
    """The model and store an adapter loads, how it generates and decodes (as
    :class:`blockrag.engine.GenerationOptions` describes; each may be given per call too) and how often its
    correctness gate checks an answer; and the runner that answers its prompts."""

    model: str = Field(default=DEFAULT_MODEL, description="Bundled alias, model folder or GGUF file.")
    store: str | None = Field(default=None, description="KV store folder or redis:// URL (default $BLOCKRAG_HOME/kv).")
    mode: PrefillMode = Field(default="block", description="'block' serves passages from blocks; 'full' prefills all.")
    max_tokens: int = Field(default=256, gt=0, description="Most tokens generated per call.")
    temperature: float = Field(default=0.0, ge=0.0, description="0 decodes greedily.")
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    top_k: int = Field(default=0, ge=0, description="0 disables top-k filtering.")
    seed: int | None = Field(default=None, description="Seed for sampling when temperature > 0.")
    decode: DecodeMode | Literal["auto"] = Field(default="auto", description=DECODE_DESCRIPTION)
    recycle_k: int | float = Field(default=1 / 8, description="Recycled and streaming budget: tokens or a fraction.")
    stride: int = Field(default=10, gt=0, description="Steps between Recycled Attention's full steps.")
    dynamic_threshold: float | None = Field(default=None, description="Query similarity that triggers a full step.")
    gate_fraction: float = Field(default=0.0, ge=0.0, le=1.0, description=GATE_DESCRIPTION)

    _runner: PromptRunner = PrivateAttr()

    @property
    def engine(self) -> BlockEngine:
        return self._runner.engine

    @property
    def gate(self) -> Gate:
        """The correctness gate: ``gate.record.summary()`` totals its checks (``gate.wait()`` for pending ones)."""
        return self._runner.gate  # type: ignore[return-value]

    @property
    def passages(self) -> PassageIndex:
        """Passages known for content matching and for resolving passage ids; shared with bound copies."""
        return self._runner.passages
