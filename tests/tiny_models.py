"""Tiny randomly initialised models of each supported family, for exactness tests that need no weights."""

from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM, LlamaConfig, MistralConfig, Qwen2Config, Qwen3Config

TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=512, vocab_size=49152)
ROPES = {
    "default": {"rope_type": "default", "rope_theta": 10000.0},
    "linear": {"rope_type": "linear", "rope_theta": 10000.0, "factor": 4.0},
    "dynamic": {"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 2.0},
    "yarn": {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 128},
    "llama3": {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 128},
    "longrope": {"rope_type": "longrope", "rope_theta": 10000.0, "short_factor": [1.0] * 8,
                 "long_factor": [1.0 + i / 4 for i in range(8)], "original_max_position_embeddings": 128},
}
FAMILIES = {
    "llama": lambda **kw: LlamaConfig(**TINY, **kw),
    "mistral": lambda **kw: MistralConfig(**TINY, sliding_window=None, **kw),
    "qwen2": lambda **kw: Qwen2Config(**TINY, use_sliding_window=False, **kw),
    "qwen3": lambda **kw: Qwen3Config(**TINY, head_dim=16, use_sliding_window=False, **kw),
}


def tiny_model(family: str = "llama", rope: str = "default", attn: str = "eager", head_dim: int | None = None):
    """A tiny model of ``family``; ``head_dim`` other than the family's tiny one (16) for kernels that need larger."""
    torch.manual_seed(0)
    config = FAMILIES[family](rope_parameters=dict(ROPES[rope]))
    if head_dim is not None:
        config.head_dim = head_dim
    config._attn_implementation = attn
    return AutoModelForCausalLM.from_config(config).eval()


def on_grid(model):
    """``model`` with every projection's weight (the layers' and the LM head) moved to its four-bit grid, as a Q4_1
    checkpoint's layers are."""
    from blockrag.engine.fourbit import dequantize, quantize
    from blockrag.engine.transformer import decode_projections

    with torch.no_grad():
        for projection in decode_projections(model):
            projection.weight.copy_(dequantize(*quantize(projection.weight)))
    return model


def block_attention_mask(segments: list[tuple[int, str]], dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The naive Block-Attention mask over one contiguous sequence, as an additive ``[1, 1, T, T]`` tensor: the
    paper's training mask, an independent reference for what assembled naive blocks compute.

    ``"block"`` segments attend causally to themselves only; ``"text"`` segments to everything before them.
    """
    total = sum(n for n, _ in segments)
    allowed = torch.zeros(total, total, dtype=torch.bool)
    pos = 0
    for n, kind in segments:
        if kind not in ("block", "text"):
            raise ValueError(f"segment kind must be 'block' or 'text', got {kind!r}")
        rows = slice(pos, pos + n)
        allowed[rows, (pos if kind == "block" else 0): pos + n] = True
        pos += n
    allowed &= torch.ones(total, total, dtype=torch.bool).tril()
    return torch.zeros(total, total, dtype=dtype).masked_fill(~allowed, torch.finfo(dtype).min)[None, None]
