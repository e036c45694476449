"""The ``blockrag finetune`` command: block fine-tuning on questions of a QA file, over passages from its index.

Each question from line ``--start`` on (so training never sees the questions ``blockrag eval``
scores, which start at line 0) becomes one example: the ``--top-k`` passages retrieved from the
index, placed by ``--order`` (recorded in the adapter, whose model then answers in that order), as
the prompt, and the question's first gold answer as the target. The gold passage is always among
them: if retrieval missed it, it replaces the last retrieved passage, at a seeded random position,
so the model learns to read the answer from a passage rather than to guess.
Prompts use ``blockrag eval``'s system prompt and passage count by default, so training sees what
evaluation asks: on NQ, training with the evaluation's passage count is what lifted block accuracy
(benchmarks/RESULTS.md).
"""

from __future__ import annotations

import argparse
import random

import torch

from blockrag.engine import BLOCK_MODES, DEFAULT_MODEL, BlockEngine, load_model
from blockrag.engine.finetune import FinetuneSettings, TrainingExample, finetune, lora_shape
from blockrag.engine.model import adapter_passage_order
from blockrag.engine.prompt import DEFAULT_PASSAGE_ORDER, PASSAGE_ORDERS, PassageOrder, in_prompt_order

from blockrag.errors import InvalidArgumentError, IndexMismatchError
from .evaluate import DEFAULT_SYSTEM_PROMPT, DEFAULT_TOP_K
from .index import Index
from .qa import QAItem, best_subspan_match, load_qa, retrieved_passages
from .retrieve import Retriever


def training_example(retriever: Retriever, item: QAItem, top_k: int, rng: random.Random,
                     order: PassageOrder = DEFAULT_PASSAGE_ORDER) -> TrainingExample:
    """``item``'s question over its ``top_k`` retrieved passages, the gold passage among them, and its first answer.

    The gold passage is the index's passage of ``item``'s document that holds an answer (its first
    passage if none does). The passages are placed in the prompt by ``order``.
    """
    passages = retrieved_passages(retriever, item.question, top_k)
    gold = [node.text for node in retriever.index.document_nodes(item.gold_id)]
    if not gold:
        raise IndexMismatchError(f"the index in {retriever.index.folder} does not hold document {item.gold_id!r}; "
                                 "fine-tune over the index `blockrag eval` built for this QA file.")
    if not set(passages) & set(gold):
        passages = passages[:top_k - 1]
        passages.insert(rng.randrange(len(passages) + 1),
                        next((text for text in gold if best_subspan_match(text, item.answers)), gold[0]))
    return TrainingExample(tuple(in_prompt_order(passages, order)), item.question, item.answers[0])


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("qa", metavar="QA.jsonl.gz", help="NQ-open questions with their gold passages")
    parser.add_argument("--index", required=True, metavar="DIR", help="the index `blockrag eval` built for QA file")
    parser.add_argument("--out", required=True, metavar="ADAPTER_DIR", help="folder for the LoRA adapter")
    parser.add_argument("--start", type=int, default=300, help="first question (line from 0) to train on")
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
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32", help="float32 (default: LoRA weights and their updates keep "
                        "full precision), bfloat16 or auto; load the adapter's base model in the same dtype")


def finetune_command(args: argparse.Namespace) -> int:
    if args.top_k < 1:
        raise InvalidArgumentError(f"--top-k must be at least 1, got {args.top_k}")
    items = load_qa(args.qa, limit=args.limit, start=args.start)
    if not items:
        raise InvalidArgumentError(f"{args.qa} has no questions from line {args.start}; lower --start.")
    order = args.order or (adapter_passage_order(args.resume) if args.resume else DEFAULT_PASSAGE_ORDER)
    with Index.open(args.index) as index:
        retriever = Retriever(index)
        rng = random.Random(args.seed)
        examples = [training_example(retriever, item, args.top_k, rng, order) for item in items]
    engine = BlockEngine(load_model(args.model, dtype=args.dtype, device=args.device),
                         system_prompt=args.system_prompt)
    if args.rank is not None:
        shape = {"rank": args.rank, "alpha": 2 * args.rank}
    else:
        shape = lora_shape(args.resume) if args.resume else {}
    settings = FinetuneSettings(epochs=args.epochs, lr=args.lr, full_fraction=args.full_fraction,
                                block_mode=args.block_mode, seed=args.seed, max_tokens=args.max_tokens,
                                passage_order=order, **shape)
    report = finetune(engine, examples, args.out, settings, base_model=args.model, resume=args.resume)
    print(report)
    print(f"Evaluate it with `blockrag eval {args.qa} --index {args.index} --model {args.model} --adapter {args.out}` "
          f"(the same --dtype; passages placed {order}, as trained); the adapter's model has its own fingerprint, so "
          "it gets its own KV blocks.")
    return 0
