"""``blockrag bench ingest``: the whole ingestion pipeline against the model work it cannot avoid.

The corpus is cut into slices; for each slice the model work alone (the engine's encoding of its
passages into blocks, in the same length-sorted batches) and :func:`ingest` of its documents
into one growing index (chunking, KV computed and stored, embeddings, FAISS, document store) run
back to back, in alternating order, so that both see the same load on a shared machine. Then
:func:`ingest` runs again over the whole corpus. Wall and process CPU times are both reported.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path
from typing import get_args

import torch

from blockrag.engine import BlockEngine, encode_blocks
from blockrag.errors import BenchmarkError, InvalidArgumentError
from blockrag.retriever.chunking import split_text
from blockrag.retriever.documents import Document
from blockrag.retriever.embedding import DEFAULT_EMBEDDING_MODEL, Embedder, EmbeddingDtype
from blockrag.retriever.ingest import DEFAULT_BATCH_PASSAGES, ingest
from blockrag.evaluation.qa import qa_documents

from .common import add_model_argument, machine

DEFAULT_DATA = "../shared/data/nq-open-dev.jsonl.gz"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", default=DEFAULT_DATA, help="NQ-open JSONL.gz; its ctxs[0] passages are the corpus")
    parser.add_argument("--limit", type=int, help="use only the first N passages")
    add_model_argument(parser)
    parser.add_argument("--embedding-model", default=DEFAULT_EMBEDDING_MODEL)
    parser.add_argument("--embedding-dtype", default="auto", choices=get_args(EmbeddingDtype),
                        help="auto: bf16 where the hardware computes it natively, else fp32")
    parser.add_argument("--batch-size", type=int, default=8, help="passages per LLM forward pass")
    parser.add_argument("--batch-passages", type=int, default=DEFAULT_BATCH_PASSAGES, help="passages per commit")
    parser.add_argument("--slices", type=int, default=10, help="bare and pipeline alternate over this many slices")
    parser.add_argument("--index", help="index folder to build (must not exist); default a temporary one, deleted")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="auto", help="float32, bfloat16 or auto (fp32 on CPU, bf16 on GPU)")


class _Clock:
    """Wall and process CPU seconds of a block of code."""

    def __enter__(self) -> _Clock:
        self._sync()
        self.wall, self.cpu = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc_info) -> None:
        self._sync()
        self.wall, self.cpu = time.perf_counter() - self.wall, time.process_time() - self.cpu

    @staticmethod
    def _sync() -> None:
        if torch.cuda.is_available():
            torch.cuda.synchronize()


def _model_work(engine: BlockEngine, token_lists: list[list[int]]) -> None:
    """The model work ingestion cannot avoid: the engine's batched block encoding of the passages, nothing else."""
    encode_blocks(engine.model, token_lists, engine.passage_context().block, engine.batch_size)


def _folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def _slices(documents: list[Document], n: int) -> list[list[Document]]:
    n = max(1, min(n, len(documents)))
    return [documents[len(documents) * k // n: len(documents) * (k + 1) // n] for k in range(n)]


def run(args: argparse.Namespace) -> dict:
    documents = qa_documents(args.data, args.limit)
    with _Clock() as load_llm:
        engine = BlockEngine.from_pretrained(args.model, device=args.device, dtype=args.dtype,
                                             batch_size=args.batch_size)
    with _Clock() as load_embedder:
        embedder = Embedder(args.embedding_model, device=args.device, dtype=args.embedding_dtype)
    _model_work(engine, [engine.passage_token_ids("A warm-up passage.")] * engine.batch_size)
    embedder.embed(["A warm-up passage."])

    folder = Path(args.index) if args.index else Path(tempfile.mkdtemp(prefix="blockrag-bench-ingest-"))
    if args.index and folder.exists():
        raise InvalidArgumentError(f"{folder} exists; the benchmark builds a fresh index (pass a new folder)")
    bare = {"wall": 0.0, "cpu": 0.0}
    first = {"wall": 0.0, "cpu": 0.0, "kv": 0.0, "embed": 0.0, "write": 0.0}
    passages = tokens = 0
    seen: set[tuple[int, ...]] = set()
    ratios = []
    try:
        for k, part in enumerate(_slices(documents, args.slices)):
            texts = [t for d in part for t in split_text(d.text, engine.tokenizer)]
            passages += len(texts)
            unique = {tuple(engine.passage_token_ids(t)) for t in texts} - seen  # ingestion encodes a text once
            seen |= unique
            token_lists = sorted(map(list, unique), key=len)  # as ingestion orders them
            tokens += sum(map(len, token_lists))
            forward, pipeline = _Clock(), _Clock()
            for clock in ((forward, pipeline) if k % 2 == 0 else (pipeline, forward)):
                with clock:
                    if clock is forward:
                        _model_work(engine, token_lists)
                    else:
                        report = ingest(part, folder, engine=engine, embedder=embedder,
                                        batch_passages=args.batch_passages, progress=False)
            if report.encoded != len(token_lists):
                raise BenchmarkError(f"slice {k}: expected {len(token_lists)} passages encoded, got {report}")
            bare["wall"], bare["cpu"] = bare["wall"] + forward.wall, bare["cpu"] + forward.cpu
            for key, value in (("wall", pipeline.wall), ("cpu", pipeline.cpu), ("kv", report.kv_seconds),
                               ("embed", report.embed_seconds), ("write", report.write_seconds)):
                first[key] += value
            ratios.append(round(pipeline.wall / forward.wall, 3))
        with _Clock() as second:
            again = ingest(documents, folder, engine=engine, embedder=embedder, progress=False)
        stored = {"kv": _folder_bytes(folder / "kv"), "vectors": (folder / "vectors.faiss").stat().st_size,
                  "docstore": sum(p.stat().st_size for p in folder.glob("docstore.sqlite*"))}
    finally:
        if not args.index:
            shutil.rmtree(folder, ignore_errors=True)
    if again.passages != passages or again.model_work:
        raise BenchmarkError(f"the second run should find all {passages} passages stored, got: {again}")
    return {
        "benchmark": "ingest",
        "model": args.model, "embedding_model": args.embedding_model, "embedding_dtype": str(embedder.dtype),
        "device": str(engine.device),
        "dtype": str(next(engine.model.parameters()).dtype),
        "machine": machine(engine.device),
        "documents": len(documents), "passages": passages, "distinct_passages": len(seen), "tokens": tokens,
        "batch_size": args.batch_size, "batch_passages": args.batch_passages, "slices": len(ratios),
        "load_s": {"llm": round(load_llm.wall, 2), "embedder": round(load_embedder.wall, 2)},
        "model_work": {"wall_s": round(bare["wall"], 2), "cpu_s": round(bare["cpu"], 2),
                         "passages_per_s": round(len(seen) / bare["wall"], 3)},
        "pipeline": {"wall_s": round(first["wall"], 2), "cpu_s": round(first["cpu"], 2),
                     "passages_per_s": round(len(seen) / first["wall"], 3),
                     "kv_s": round(first["kv"], 2), "embed_s": round(first["embed"], 2),
                     "write_s": round(first["write"], 2)},
        "pipeline_over_model_work": {"wall": round(first["wall"] / bare["wall"], 4),
                               "cpu": round(first["cpu"] / bare["cpu"], 4), "per_slice_wall": ratios},
        "second_run": {"wall_s": round(second.wall, 3), "cpu_s": round(second.cpu, 3),
                       "over_first": round(second.wall / first["wall"], 4)},
        "stored_bytes": {**stored, "kv_per_token": round(stored["kv"] / tokens)},
    }
