"""``blockrag ingest``: index documents and store their passages' KV blocks, in one pass that a re-run resumes."""

from __future__ import annotations

import argparse

from blockrag.engine import DEFAULT_MODEL


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("paths", nargs="+", metavar="PATH", help="files, or folders searched recursively")
    parser.add_argument("--index", required=True, metavar="DIR", help="index folder (created if needed)")
    parser.add_argument("--model", help=f"LLM for a new index (default {DEFAULT_MODEL}); an existing index keeps "
                        "its own")
    parser.add_argument("--chunk-tokens", type=int, help="passage length in LLM tokens for a new index (default 200)")
    parser.add_argument("--vector-index", choices=("flat", "hnsw"), help="FAISS index for a new index (default flat)")
    parser.add_argument("--batch-passages", type=int, default=32, help="passages per committed batch")


def run(args: argparse.Namespace) -> int:
    """Every error blockrag raises here (bad input, a full disk, another model's store...) comes before anything is
    written, or leaves what was committed for a re-run to resume."""
    from blockrag.retriever import ingest, load_documents

    report = ingest(load_documents(args.paths), args.index, model=args.model, chunk_tokens=args.chunk_tokens,
                    vector_index=args.vector_index, batch_passages=args.batch_passages)
    print(f"{args.index}: {report}")
    return 0
