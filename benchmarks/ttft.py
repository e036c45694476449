"""``blockrag bench ttft``: time to first token of a full prefill against Block-Attention, side by side.

Prompts are a prefix, ~``passage_tokens``-token passages and a ~``question_tokens``-token question.
Passages are random token ids encoded as blocks beforehand (as ingestion would): TTFT does not
depend on what the tokens say, and the benchmark needs no corpus. Both modes go through
:meth:`BlockEngine.generate` with one new token, beside the same question with no passages at
all: the limit block mode approaches (``none_s``, and ``block_over_none``, measured beside them).
"""

from __future__ import annotations

import argparse
import statistics

import torch

from blockrag.engine import DEFAULT_MODEL, BlockEngine, LoadedModel, encode_blocks, load_model, model_fingerprint
from blockrag.engine.model import resolve_dtype

from .common import QUESTION, add_model_argument, machine, question_tokens, random_tokens

#: Shapes of real models, for timing with random weights where their checkpoints cannot be had.
RANDOM_SHAPES = {
    "llama3-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                      num_key_value_heads=8, vocab_size=128256, max_position_embeddings=131072,
                      rope_parameters={"rope_type": "default", "rope_theta": 500000.0}),
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_argument(parser)
    parser.add_argument("--random-shape", choices=sorted(RANDOM_SHAPES),
                        help="time a random-weight model of this shape instead; --model then only gives the tokenizer")
    parser.add_argument("--lengths", default="1024,2048,4096,8000", help="prompt lengths in tokens, comma separated")
    parser.add_argument("--passage-tokens", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=2, help="runs per measurement; the minimum is reported")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="auto", 
                        help="float32, bfloat16 or auto (bf16 where the device computes it natively, else fp32)")


def _load(args: argparse.Namespace) -> LoadedModel:
    if not args.random_shape:
        return load_model(args.model, dtype=args.dtype, device=args.device)
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = load_model(args.model).tokenizer if args.model == DEFAULT_MODEL else \
        AutoTokenizer.from_pretrained(args.model)
    config = LlamaConfig(**RANDOM_SHAPES[args.random_shape], head_dim=128)
    dtype = resolve_dtype(args.dtype, args.device)
    torch.manual_seed(0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(args.device):
            model = LlamaForCausalLM(config).eval()
    finally:
        torch.set_default_dtype(default)
    return LoadedModel(model, tokenizer, model_fingerprint(model, tokenizer))


def flops_to_first_token(config, context: int, computed: int) -> float:
    """Matmul FLOPs of running ``computed`` tokens at the end of a ``context``-token prompt (one LM-head row).

    Per token: 2 x non-embedding parameters for the projections, plus 4 x layers x heads x head_dim
    x (keys attended) for scores and weighted values.
    """
    h, layers = config.hidden_size, config.num_hidden_layers
    head_dim = getattr(config, "head_dim", None) or h // config.num_attention_heads
    q_dim, kv_dim = config.num_attention_heads * head_dim, config.num_key_value_heads * head_dim
    per_layer = h * (q_dim + 2 * kv_dim) + q_dim * h + 3 * h * config.intermediate_size
    dense = 2 * layers * per_layer * computed
    attended = sum(range(context - computed + 1, context + 1))  # causal: token i sees i keys
    attention = 4 * layers * q_dim * attended
    return float(dense + attention + 2 * h * config.vocab_size)


def _timed(engine: BlockEngine, blocks, mode: str, repeats: int) -> tuple[float, int]:
    times, prefilled = [], 0
    for _ in range(repeats):
        r = engine.generate(None, blocks, QUESTION, mode=mode, max_new_tokens=1)
        if engine.device.type == "cuda":
            torch.cuda.synchronize()
        times.append(r.ttft_s)
        prefilled = r.prefilled_tokens
    return min(times), prefilled


def run(args: argparse.Namespace) -> dict:
    loaded = _load(args)
    engine = BlockEngine(loaded)
    config = loaded.model.config
    past = engine.passage_context().block
    question = question_tokens(engine)
    generator = torch.Generator().manual_seed(0)
    def passages(count: int, length: int) -> list[list[int]]:  # each block ends with its separator, as the engine's
        return [ids + engine.separator_ids for ids in random_tokens(engine, generator, count,
                                                                     length - len(engine.separator_ids))]

    warm = encode_blocks(loaded.model, passages(1, 8), past)
    _timed(engine, warm, "full", 1)  # warm-up of both paths (and of the fused re-rotation on GPUs)
    _timed(engine, warm, "block", 1)
    results = []
    for target in (int(x) for x in args.lengths.split(",")):
        n_passages = max(1, round((target - len(past) - question) / args.passage_tokens))
        blocks = encode_blocks(loaded.model, passages(n_passages, args.passage_tokens), past,
                               batch_size=engine.batch_size)
        full_s, full_prefilled = _timed(engine, blocks, "full", args.repeats)
        block_s, block_prefilled = _timed(engine, blocks, "block", args.repeats)
        none_s, _ = _timed(engine, [], "block", args.repeats)
        tokens = full_prefilled
        results.append({
            "tokens": tokens, "passages": n_passages, "full_s": round(full_s, 4), "block_s": round(block_s, 4),
            "none_s": round(none_s, 4), "ratio": round(block_s / full_s, 4),
            "block_over_none": round(block_s / none_s, 3),
            "full_gflops": round(flops_to_first_token(config, tokens, full_prefilled) / 1e9, 1),
            "block_gflops": round(flops_to_first_token(config, tokens, block_prefilled) / 1e9, 1),
        })
        del blocks
    return {
        "benchmark": "ttft",
        "model": args.random_shape and f"random-weight {args.random_shape}" or args.model,
        "device": str(engine.device), "dtype": str(next(loaded.model.parameters()).dtype),
        "machine": machine(engine.device),
        "repeats": args.repeats, "median_ratio": round(statistics.median(r["ratio"] for r in results), 4),
        "results": results,
    }
