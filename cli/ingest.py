"""``blockrag ingest``: index documents and store their passages' KV blocks, in one pass that a re-run resumes."""

from __future__ import annotations

import argparse
import sys

from blockrag.engine import DEFAULT_MODEL
from blockrag.errors import BlockragError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("paths", nargs="+", metavar="PATH", help="files, or folders searched recursively")
    parser.add_argument("--index", required=True, metavar="DIR", help="index folder (created if needed)")
    parser.add_argument("--model", help=f"LLM for a new index (default {DEFAULT_MODEL}); an existing index keeps "
                        "its own")
    parser.add_argument("--chunk-tokens", type=int, help="passage length in LLM tokens for a new index (default 200)")
    parser.add_argument("--vector-index", choices=("flat", "hnsw"), help="FAISS index for a new index (default flat)")
    parser.add_argument("--batch-passages", type=int, default=32, help="passages per committed batch")


def run(args: argparse.Namespace) -> int:
    """Exit status 1 with the error's own advice for bad input, a full disk, another model's store...: every
    such error is raised before anything is written, or leaves what was committed for a re-run to resume."""
    from blockrag.retriever import ingest, load_documents

    try:
        documents = load_documents(args.paths)
        report = ingest(documents, args.index, model=args.model, chunk_tokens=args.chunk_tokens,
                        vector_index=args.vector_index, batch_passages=args.batch_passages)
    except BlockragError as exc:
        print(f"blockrag ingest: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    print(f"{args.index}: {report}")
    return 0
