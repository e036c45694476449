"""``blockrag demo``: the whole RAG path on the corpus bundled with blockrag.

Ingests the corpus once into ``$BLOCKRAG_HOME/demo-index`` (a later run finds everything stored
and does no model work), then answers questions about it in full and block mode, printing the
passages retrieved and the time to first token of each mode side by side.
"""

from __future__ import annotations

import argparse
import statistics

from blockrag.engine import DEFAULT_MODEL

QUESTIONS = 5
TOP_K = 3


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=DEFAULT_MODEL, help="the LLM: bundled alias, folder or GGUF file")


def run(args: argparse.Namespace) -> int:
    from blockrag.engine import BlockEngine, blockrag_home, load_model
    from blockrag.retriever import Index, Retriever, answer, bundled_corpus, bundled_questions, ingest, load_engine
    from blockrag.cli.query import print_passages

    folder = blockrag_home() / "demo-index"
    loaded = load_model(args.model)
    print(f"Ingesting the bundled corpus into {folder}")
    report = ingest(bundled_corpus(), folder, engine=BlockEngine(loaded), model=args.model)
    print(f"  {report}" + ("" if report.model_work else " (all stored already: no model work)"))
    with Index.open(folder) as index:
        engine = load_engine(index, loaded=loaded)
        retriever = Retriever(index)
        engine.passage_context().block  # the prompt's head: encoded once per process, as a server would
        ttft: dict[str, list[float]] = {"full": [], "block": []}
        for sample in bundled_questions()[:QUESTIONS]:
            print(f"\nQ: {sample.question}  (the corpus says: {sample.answer})")
            for mode in ("full", "block"):
                a = answer(retriever, engine, sample.question, top_k=TOP_K, mode=mode, max_new_tokens=48)
                if mode == "full":
                    print_passages(a, indent="   ")
                r = a.result
                ttft[mode].append(r.ttft_s)
                print(f"  [{mode:5}] TTFT {r.ttft_s * 1000:7.1f} ms, {r.prefilled_tokens:4d} of {r.prompt_tokens} "
                      f"prompt tokens prefilled | {a.text}")
    full, block = (statistics.median(ttft[m]) for m in ("full", "block"))
    print(f"\nMedian TTFT: full {full * 1000:.1f} ms, block {block * 1000:.1f} ms ({full / block:.1f}x faster); "
          f"in block mode the passages' KV came from the store in {folder / 'kv'}.")
    return 0
