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


def tiny_model(family: str = "llama", rope: str = "default", attn: str = "eager"):
    torch.manual_seed(0)
    config = FAMILIES[family](rope_parameters=dict(ROPES[rope]))
    config._attn_implementation = attn
    return AutoModelForCausalLM.from_config(config).eval()
