"""The ``blockrag ingest`` and ``blockrag query`` commands (their arguments are parsed in :mod:`blockrag.cli`)."""

from __future__ import annotations

import argparse
import sys
import textwrap

from blockrag.engine import BlockragError

from .documents import load_documents
from .index import Index
from .ingest import ingest
from .retrieve import Answer, Retriever, answer, load_engine


def ingest_command(args: argparse.Namespace) -> int:
    """Exit status 1 with the error's own advice for bad input, a full disk, another model's store...: every
    such error is raised before anything is written, or leaves what was committed for a re-run to resume."""
    try:
        documents = load_documents(args.paths)
        report = ingest(documents, args.index, model=args.model, chunk_tokens=args.chunk_tokens,
                        vector_index=args.vector_index, batch_passages=args.batch_passages)
    except BlockragError as exc:
        print(f"blockrag ingest: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    print(f"{args.index}: {report}")
    return 0


def print_passages(result: Answer, indent: str = "  ") -> None:
    for rank, (node, score) in enumerate(result.passages, 1):
        snippet = textwrap.shorten(node.text, 100, placeholder=" ...")
        print(f"{indent}{rank}. [{score:.3f}] {node.doc_id} #{node.position} ({node.tokens} tokens): {snippet}")


def query_command(args: argparse.Namespace) -> int:
    with Index.open(args.index) as index:
        engine = load_engine(index, args.model)
        head = engine.block_context()  # the prompt's head: encoded once per process, as a server would
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
