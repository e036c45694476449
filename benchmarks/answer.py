"""``blockrag bench answer``: a whole answer, side by side: block mode, full mode, no passages, llama.cpp.

For each passage count, one prompt of that many passages (random tokens decoded to text, stored as
blocks beforehand as ingestion would) and a question is answered greedily, ``--new-tokens`` tokens
whatever the model would end with: in block mode, in full
mode, as the same question with no passages at all (the limit block mode approaches), and by
llama.cpp (``llama-cpp-python``, the ``llamacpp`` extra) on the GGUF file the model was loaded
from, over the very prompt text full mode prefills. Each row gives time to first token, decoding
milliseconds per token after it, and end-to-end seconds; the rows of one passage count take turns
``--repeats`` times and the fastest of each is kept. Without llama-cpp-python, or for a model
that is not a GGUF file, the llama.cpp row is skipped with the reason. ``--plot`` draws TTFT
against prompt length for the four rows (log scale).
"""

from __future__ import annotations

import argparse
import importlib.util
import multiprocessing
import os
import time
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import Any

import torch

from blockrag.engine import BlockEngine, GenerationResult, load_model
from blockrag.engine.model import BUNDLED_MODELS, bundled_gguf
from blockrag.engine.prompt import passage_text
from blockrag.errors import BenchmarkError, InvalidArgumentError, MissingExtraError

from .common import add_model_argument, machine, random_texts

#: About fifty tokens of question, as a RAG user asks it.
QUESTION = ("Reading every document above carefully, which of them describes the main event in the most detail, "
            "who took part in it, where and when did it happen, and what happened right after it ended?")
ROWS = ("block", "full", "none", "llama.cpp")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_argument(parser)
    parser.add_argument("--passages", default="10,40", help="passage counts, comma separated")
    parser.add_argument("--passage-tokens", type=int, default=200)
    parser.add_argument("--new-tokens", type=int, default=32, help="tokens each answer decodes (greedy)")
    parser.add_argument("--repeats", type=int, default=2, help="runs per row; the fastest is reported")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="threads of torch and llama.cpp")
    parser.add_argument("--gguf", help="GGUF file for llama.cpp (default: the model's, where it is one)")
    parser.add_argument("--plot", metavar="OUT.png", help="also draw TTFT against prompt length to this file")


def _gguf(args: argparse.Namespace) -> Path | None:
    if args.gguf:
        return Path(args.gguf)
    if args.model in BUNDLED_MODELS:
        return bundled_gguf(args.model)
    return Path(args.model) if args.model.endswith(".gguf") else None


def _row(result: GenerationResult) -> dict[str, Any]:
    decoded = result.completion_tokens - 1
    return {"ttft_s": round(result.ttft_s, 4), "total_s": round(result.total_s, 3),
            "decode_ms_per_token": round((result.total_s - result.ttft_s) / decoded * 1000, 2)
            if decoded > 0 else None,
            "prompt_tokens": result.prompt_tokens, "prefilled_tokens": result.prefilled_tokens,
            "new_tokens": result.completion_tokens}


class _LlamaCpp:
    """llama.cpp over a GGUF file, in a process of its own: its threads beside torch's in one process slowed
    the engine's rows. Time to the first streamed token, then per token, greedy."""

    def __init__(self, gguf: Path, context: int, threads: int):
        if importlib.util.find_spec("llama_cpp") is None:
            raise MissingExtraError("the llama.cpp row of `blockrag bench answer`", "llamacpp", "llama_cpp")
        self.worker = ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"),
                                          initializer=_load_llama, initargs=(str(gguf), context, threads))
        try:
            self.answer("Hello", 2)  # loads and warms it, as the engine is warmed
        except BrokenProcessPool as exc:
            self.close()
            raise BenchmarkError(f"llama.cpp could not load {gguf}: its error is printed above") from exc

    def answer(self, prompt: str, new_tokens: int) -> dict[str, Any]:
        return self.worker.submit(_llama_answer, prompt, new_tokens).result()

    def close(self) -> None:
        self.worker.shutdown()


_LLAMA: Any = None  # the worker process's llama_cpp.Llama


def _load_llama(gguf: str, context: int, threads: int) -> None:
    from llama_cpp import Llama

    global _LLAMA
    _LLAMA = Llama(model_path=gguf, n_ctx=context, n_threads=threads, n_threads_batch=threads, verbose=False)


def _llama_answer(prompt: str, new_tokens: int) -> dict[str, Any]:
    tokens = _LLAMA.tokenize(prompt.encode("utf-8"), add_bos=False, special=True)
    _LLAMA.reset()  # no prefix reuse between runs: every run prefills the whole prompt
    started = time.perf_counter()
    first, count = None, 0
    for _ in _LLAMA.generate(tokens, temp=0.0, top_k=1, reset=True):
        count += 1
        first = first or time.perf_counter()
        if count == new_tokens:
            break
    done = time.perf_counter()
    assert first is not None
    return {"ttft_s": round(first - started, 4), "total_s": round(done - started, 3),
            "decode_ms_per_token": round((done - first) / (count - 1) * 1000, 2) if count > 1 else None,
            "prompt_tokens": len(tokens), "prefilled_tokens": len(tokens), "new_tokens": count}


def _measure(engine: BlockEngine, args: argparse.Namespace, counts: list[int], llama: _LlamaCpp | None,
             generator: torch.Generator) -> list[dict[str, Any]]:
    """Each passage count's rows, taking turns ``args.repeats`` times; the fastest run of each row."""
    engine.generate(None, engine.encode(random_texts(engine, generator, 1, 8)), QUESTION, max_new_tokens=2)  # warm
    results = []
    for count in counts:
        texts = random_texts(engine, generator, count, args.passage_tokens)
        blocks = engine.encode(texts)  # as ingestion stores them
        template = engine.template()
        prompt = template.head + "".join(passage_text(t) + "\n\n" for t in texts) + template.question_text(QUESTION)
        best: dict[str, dict[str, Any]] = {}
        for _ in range(args.repeats):  # the rows take turns, so that changes in machine load hit all alike
            answer = dict(max_new_tokens=args.new_tokens, ignore_eos=True)  # every row decodes as many tokens
            runs = {"block": lambda: _row(engine.generate(None, blocks, QUESTION, **answer)),
                    "full": lambda: _row(engine.generate(None, texts, QUESTION, mode="full", **answer)),
                    "none": lambda: _row(engine.generate(None, [], QUESTION, **answer))}
            if llama is not None:
                runs["llama.cpp"] = lambda: llama.answer(prompt, args.new_tokens)
            for name, timed in runs.items():
                row = timed()
                if name not in best or row["ttft_s"] < best[name]["ttft_s"]:
                    best[name] = row
        if best["block"]["prompt_tokens"] != best["full"]["prompt_tokens"]:
            raise BenchmarkError("block and full mode answered prompts of different lengths")
        results.append({"passages": count, "prompt_tokens": best["full"]["prompt_tokens"], "rows": best,
                        "block_over_full_ttft": round(best["block"]["ttft_s"] / best["full"]["ttft_s"], 4),
                        "block_over_none_ttft": round(best["block"]["ttft_s"] / best["none"]["ttft_s"], 3)})
    return results


def run(args: argparse.Namespace) -> dict:
    counts = [int(c) for c in args.passages.split(",")]
    if min(counts) < 1 or args.new_tokens < 1:
        raise InvalidArgumentError("--passages takes counts of at least 1, and --new-tokens at least 1")
    torch.set_num_threads(args.threads)
    engine = BlockEngine(load_model(args.model))
    generator = torch.Generator().manual_seed(0)
    gguf = _gguf(args)
    llama: _LlamaCpp | None = None
    skipped = None
    if gguf is None:
        skipped = f"{args.model} is not a GGUF file; pass --gguf"
    else:
        try:
            llama = _LlamaCpp(gguf, min(engine.max_positions, 16384), args.threads)
        except MissingExtraError as exc:
            skipped = str(exc)
    try:
        results = _measure(engine, args, counts, llama, generator)
    finally:
        if llama is not None:
            llama.close()
    out = {"benchmark": "answer", "model": args.model, "gguf": str(gguf) if gguf else None,
           "dtype": str(next(engine.model.parameters()).dtype),
           "four_bit_projections": engine.loaded.four_bit_projections, "passage_tokens": args.passage_tokens,
           "new_tokens": args.new_tokens, "repeats": args.repeats, "llama_cpp_skipped": skipped,
           "machine": machine(engine.device), "results": results}
    if args.plot:
        plot(out, Path(args.plot))
        out["plot"] = args.plot
    return out


def plot(result: dict, path: Path) -> None:
    """TTFT against prompt length, one line per row, log scale."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    figure, axes = plt.subplots(figsize=(6.4, 4.0), dpi=120)
    lengths = [r["prompt_tokens"] for r in result["results"]]
    labels = {"block": "blockrag, block mode", "full": "blockrag, full prefill", "none": "question alone (the limit)",
              "llama.cpp": "llama.cpp, full prefill"}
    for name in ROWS:
        points = [(n, r["rows"][name]["ttft_s"]) for n, r in zip(lengths, result["results"]) if name in r["rows"]]
        if points:
            axes.plot(*zip(*points), marker="o", label=labels[name])
    axes.set_yscale("log")
    axes.set_xlabel("prompt tokens")
    axes.set_ylabel("time to first token (s)")
    cpu = result["machine"].get("cpu", {}).get("model") or "CPU"
    axes.set_title(f"{result['model']} ({result['dtype'].removeprefix('torch.')}), "
                   f"{result['machine']['cpus']} {cpu} cores")
    axes.grid(True, which="both", alpha=0.3)
    axes.legend()
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path)
    plt.close(figure)
