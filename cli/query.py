"""``blockrag query``: answer a question over an index, printing the passages used and the time to first token."""

from __future__ import annotations

import argparse
import textwrap
from typing import TYPE_CHECKING

from blockrag.engine import PASSAGE_ORDERS, PREFILL_MODES

if TYPE_CHECKING:
    from blockrag.retriever import Answer


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("index", metavar="DIR")
    parser.add_argument("question")
    parser.add_argument("--top-k", type=int, default=5)
    parser.add_argument("--mode", choices=PREFILL_MODES, default="block")
    parser.add_argument("--order", choices=PASSAGE_ORDERS,
                        help="where the best passage goes in the prompt (default: the model's, best last unless an "
                        "adapter was trained otherwise)")
    parser.add_argument("--model", help="where to load the index's LLM from (default: as recorded in the index)")
    parser.add_argument("--max-new-tokens", type=int, default=128)


def print_passages(result: Answer, indent: str = "  ") -> None:
    """The retrieved passages, best first, with their scores and a snippet each."""
    for rank, hit in enumerate(result.passages, 1):
        node = hit.node
        snippet = textwrap.shorten(node.text, 100, placeholder=" ...")
        print(f"{indent}{rank}. [{hit.score:.3f}] {node.doc_id} #{node.position} ({node.tokens} tokens): {snippet}")


def run(args: argparse.Namespace) -> int:
    from blockrag.retriever import Index, Retriever, answer, load_engine

    with Index.open(args.index) as index:
        engine = load_engine(index, args.model)
        head = engine.passage_context().block  # the prompt's head: encoded once per process, as a server would
        result = answer(Retriever(index), engine, args.question, top_k=args.top_k, mode=args.mode,
                        order=args.order, max_new_tokens=args.max_new_tokens)
    r = result.result
    print(f"Answer: {result.text}\n\nPassages used:")
    print_passages(result)
    head_tokens = len(head) if head is not None else 0
    served = f", {r.block_tokens - head_tokens} served from the KV store" if args.mode == "block" else ""
    print(f"\nTTFT {r.ttft_s * 1000:.1f} ms ({args.mode} mode): {r.prefilled_tokens} of {r.prompt_tokens} prompt "
          f"tokens prefilled{served}; {r.completion_tokens} tokens generated in {r.total_s:.2f} s")
    return 0
