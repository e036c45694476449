"""``blockrag finetune``: train a LoRA adapter under the Block-Attention mask on questions of a QA file.

Each question from line ``--start`` on (so training never sees the questions ``blockrag eval``
scores, which start at line 0) becomes one example over its ``--top-k`` passages from the index
(see :mod:`blockrag.training.examples`). Prompts use ``blockrag eval``'s system prompt and passage
count by default, so training sees what evaluation asks: on NQ, training with the evaluation's
passage count is what lifted block accuracy (benchmarks/RESULTS.md). The adapter records the QA
file's hash and the rows trained on, and ``blockrag eval --adapter`` refuses to score them.
"""

from __future__ import annotations

import argparse

from blockrag.engine import BLOCK_MODES, DEFAULT_MODEL, DEFAULT_PASSAGE_ORDER, PASSAGE_ORDERS
from blockrag.evaluation.qa import DEFAULT_SYSTEM_PROMPT, DEFAULT_TOP_K
from blockrag.training import FinetuneSettings

#: First line trained on by default: the questions before it are left for `blockrag eval` to score.
DEFAULT_START = 300


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("qa", metavar="QA.jsonl.gz", help="NQ-open questions with their gold passages")
    parser.add_argument("--index", required=True, metavar="DIR", help="the index `blockrag eval` built for QA file")
    parser.add_argument("--out", required=True, metavar="ADAPTER_DIR", help="folder for the LoRA adapter")
    parser.add_argument("--start", type=int, default=DEFAULT_START, help="first question (line from 0) to train on")
    parser.add_argument("--limit", type=int, help="questions to train on (default: all from --start)")
    parser.add_argument("--top-k", type=int, default=DEFAULT_TOP_K,
                        help="passages per question: as many as the model will read (default: as `blockrag eval`)")
    parser.add_argument("--order", choices=PASSAGE_ORDERS,
                        help=f"where the best passage goes in the prompt, recorded in the adapter (default: "
                        f"{DEFAULT_PASSAGE_ORDER}, or the resumed adapter's order)")
    defaults = FinetuneSettings()
    parser.add_argument("--epochs", type=int, default=defaults.epochs)
    parser.add_argument("--lr", type=float, default=defaults.lr, help="AdamW learning rate")
    parser.add_argument("--rank", type=int, help=f"LoRA rank, alpha twice the rank (default: {defaults.rank}, or "
                        "the resumed adapter's LoRA settings)")
    parser.add_argument("--resume", metavar="ADAPTER_DIR", help="go on training this adapter (of the same base model)")
    parser.add_argument("--full-fraction", type=float, default=defaults.full_fraction,
                        help="share of steps trained with full attention, so one model serves both modes")
    parser.add_argument("--block-mode", choices=BLOCK_MODES, default=defaults.block_mode, help="block mask to train")
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--max-tokens", type=int, help="skip examples longer than this (default: model context)")
    parser.add_argument("--model", default=DEFAULT_MODEL, help="base model to train an adapter of")
    parser.add_argument("--system-prompt", default=DEFAULT_SYSTEM_PROMPT, help="as `blockrag eval` prompts")
    parser.add_argument("--device", help="cuda where available, else cpu (default)")
    parser.add_argument("--dtype", default="float32", help="float32 (default: LoRA weights and their updates keep "
                        "full precision), bfloat16 or auto; load the adapter's base model in the same dtype")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    import torch

    from blockrag.engine import BlockEngine, load_model
    from blockrag.engine.adapter import adapter_passage_order, lora_shape
    from blockrag.errors import InvalidArgumentError
    from blockrag.evaluation.qa import load_qa
    from blockrag.retriever import Index, Retriever
    from blockrag.training import example_source, finetune, training_examples

    if args.top_k < 1:
        raise InvalidArgumentError(f"--top-k must be at least 1, got {args.top_k}")
    items = load_qa(args.qa, limit=args.limit, start=args.start)
    if not items:
        raise InvalidArgumentError(f"{args.qa} has no questions from line {args.start}; lower --start.")
    order = args.order or (adapter_passage_order(args.resume) if args.resume else DEFAULT_PASSAGE_ORDER)
    with Index.open(args.index) as index:
        examples = training_examples(Retriever(index), items, args.top_k, args.seed, order)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    engine = BlockEngine(load_model(args.model, dtype=args.dtype, device=device), system_prompt=args.system_prompt)
    if args.rank is not None:
        shape = {"rank": args.rank, "alpha": 2 * args.rank}
    else:
        shape = lora_shape(args.resume) if args.resume else {}
    settings = FinetuneSettings(epochs=args.epochs, lr=args.lr, full_fraction=args.full_fraction,
                                block_mode=args.block_mode, seed=args.seed, max_tokens=args.max_tokens,
                                passage_order=order, **shape)
    report = finetune(engine, examples, args.out, settings, base_model=args.model, resume=args.resume,
                      source=example_source(args.qa, items), progress=not args.no_progress)
    print(report)
    print(f"Evaluate it with `blockrag eval {args.qa} --index {args.index} --model {args.model} --adapter {args.out}` "
          f"(the same --dtype; passages placed {order}, as trained; on rows other than {args.start}-{items[-1].index}: "
          "the adapter records the rows it was trained on, and eval refuses them); the adapter's model has its own "
          "fingerprint, so it gets its own KV blocks.")
    return 0
