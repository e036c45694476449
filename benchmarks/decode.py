"""``blockrag bench decode``: speed and fidelity of Recycled Attention and StreamingLLM against full decoding.

For each context length, prompts are built from real passages (Natural Questions, ``../shared/data``)
and each is prefilled once (fully, or over blocks with ``--prefill block``); every strategy decodes
from its own copy of that cache, whose free slots take its new tokens. Full decoding runs greedily,
with end-of-sequence suppressed so that every run has ``--new-tokens`` steps; the other strategies
are teacher-forced along its output, so each step compares next-token predictions in the same
context: top-1 agreement and KL(full || strategy). Where the model decodes from four-bit copies of its
weights, ``full_dense`` is full decoding from the dense weights beside it. Speed is decode tokens per
second, the setup of a strategy's cache included. As the machine may be shared, the strategies take
turns on every prompt, a whole answer each (``--turns answer``: consecutive steps, as a request decodes) or
one step each (``--turns step``), in an order that rotates between rounds, and every step (and setup) keeps
its fastest time over ``--rounds`` rounds.
"""

from __future__ import annotations

import argparse
import contextlib
import gzip
import json
import time
from pathlib import Path

import torch
from tqdm import tqdm

from blockrag.engine import BlockEngine, DecodeOptions, KVCache, RecycledDecoding, load_model, start_decoding
from blockrag.engine.transformer import dense_weights
from blockrag.errors import DataFileError

from .common import add_model_argument, machine

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "nq-open-dev.jsonl.gz"
PREFIX = ("You are a helpful assistant. Using the documents given by the user, answer the question in detail: "
          "explain what each relevant document says about it, in several sentences.")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_argument(parser)
    parser.add_argument("--contexts", default="2048,4096,8000", help="prompt lengths in tokens, comma separated")
    parser.add_argument("--new-tokens", type=int, default=64, help="decode steps per strategy")
    parser.add_argument("--recycle-k", type=float, default=1 / 8, help="K as a fraction of the context")
    parser.add_argument("--stride", type=int, default=10, help="steps between full steps (fixed schedule)")
    parser.add_argument("--dynamic-threshold", type=float, default=0.8,
                        help="query cosine similarity below which a layer runs a full step (dynamic schedule); "
                             "0.8 was calibrated on SmolLM2 with 2K-token prompts of questions 5 and 6")
    parser.add_argument("--dynamic-stride", type=int, default=5, help="steps between query checks (dynamic)")
    parser.add_argument("--pool-kernel", type=int, default=7, help="max-pooling of scores before the top-K")
    parser.add_argument("--prompt-tail", type=int, default=DecodeOptions.prompt_tail,
                        help="the prompt's last positions (the question) that the recycle set always holds")
    parser.add_argument("--prefill", choices=("full", "block"), default="full", help="how the prompt is prefilled")
    parser.add_argument("--prompts", type=int, default=1, help="prompts (questions) per context length")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--rounds", type=int, default=2, help="timed runs per strategy; the fastest is reported")
    parser.add_argument("--turns", choices=("answer", "step"), default="answer",
                        help="strategies take turns a whole answer each, as requests decode, or one step each, "
                             "which leaves every step the memory the others left cold")
    parser.add_argument("--data", type=Path, default=DATA, help="nq-open-dev.jsonl.gz (see ../shared/data/README.md)")


def load_records(path: Path) -> list[dict]:
    if not path.is_file():
        raise DataFileError(f"{path} is missing: this benchmark builds its prompts from the Natural Questions "
                                 "file of the project's shared data; pass its location with --data.")
    with gzip.open(path, "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def build_prompt(engine: BlockEngine, records: list[dict], index: int, tokens: int) -> tuple[str, list[str]]:
    """Question ``index`` and passages of the corpus (its own in the middle) filling about ``tokens`` tokens."""
    record = records[index % len(records)]
    template = engine.template(PREFIX)
    gold = record["ctxs"][0]
    gold_text = f"{gold['title']}\n{gold['text']}"
    used = len(engine.tokenizer(template.head + template.question_text(record["question"]))["input_ids"]) + \
        len(engine.passage_token_ids(gold_text))
    passages: list[str] = []
    for other in records[index + 1:] + records[:index]:
        ctx = other["ctxs"][0]
        text = f"{ctx['title']}\n{ctx['text']}"
        n = len(engine.passage_token_ids(text))
        if used + n > tokens:
            break
        passages.append(text)
        used += n
    passages.insert(len(passages) // 2, gold_text)
    return record["question"], passages


DENSE = "full_dense"
"""The strategy that decodes fully from the dense weights, where the others read four-bit copies."""


def _side_by_side(engine: BlockEngine, cache: KVCache, strategies: dict[str, DecodeOptions], first: int,
                  steps: int, rounds: int, turns: str) -> tuple[list[int], dict[str, torch.Tensor],
                                                                dict[str, float], dict[str, float]]:
    """Decode with every strategy in turn, a whole answer each (``turns="answer"``) or one step each
    (``turns="step"``), so that they share the machine's conditions.

    The first strategy decodes greedily from ``first`` (end of sequence suppressed), the others
    are fed its tokens. Returns those tokens, each strategy's logits of every step, its seconds
    (setup and each step timed separately, the fastest round of each kept) and, for Recycled
    Attention, its share of full layer-steps.
    """
    eos = torch.tensor(sorted(engine.eos_ids), device=engine.device)
    layers = engine.model.config.num_hidden_layers
    tokens = [first]
    logits: dict[str, list[torch.Tensor]] = {name: [] for name in strategies}
    best = {name: [float("inf")] * (steps + 1) for name in strategies}  # setup, then each step
    shares: dict[str, float] = {}

    def timed(name: str, at: int, call):
        weights = dense_weights(engine.model) if name == DENSE else contextlib.nullcontext()
        with weights:
            started = time.perf_counter()
            out = call()
            if engine.device.type == "cuda":
                torch.cuda.synchronize()
            best[name][at] = min(best[name][at], time.perf_counter() - started)
        return out

    names = list(strategies)
    for round_ in range(rounds):
        copies = {name: cache.clone() for name in strategies}  # outside the timing: a request owns its cache
        # Round 0 starts with the first strategy, whose tokens the others follow; later rounds rotate the order.
        order = names[round_ % len(names):] + names[:round_ % len(names)]
        decodings = {}

        def start(name: str) -> None:
            decodings[name] = timed(name, 0, lambda: start_decoding(engine.model, copies[name], strategies[name],
                                                                    steps))

        def step(name: str, i: int) -> None:
            out = timed(name, i + 1, lambda: decodings[name].step(tokens[i]))
            if round_ == 0:
                logits[name].append(out.float())
                if len(tokens) == i + 1 and i + 1 < steps:
                    tokens.append(int(out.float().index_fill(0, eos, float("-inf")).argmax()))

        if turns == "answer":
            for name in order:
                start(name)
                for i in range(steps):
                    step(name, i)
        else:
            for name in order:
                start(name)
            for i in range(steps):
                for name in order:
                    step(name, i)
        shares = {name: d.full_layer_steps / (steps * layers) for name, d in decodings.items()
                  if isinstance(d, RecycledDecoding)}
        del decodings, copies
    return tokens, {n: torch.stack(x) for n, x in logits.items()}, {n: sum(b) for n, b in best.items()}, shares


def fidelity(reference: torch.Tensor, logits: torch.Tensor) -> dict:
    """Top-1 agreement with the reference's next-token predictions, and mean KL(reference || logits)."""
    p = torch.log_softmax(reference.double(), -1)
    q = torch.log_softmax(logits.double(), -1)
    kl = (p.exp() * (p - q)).sum(-1)
    return {"top1_agreement": round(float((reference.argmax(-1) == logits.argmax(-1)).double().mean()), 4),
            "mean_kl": round(float(kl.mean()), 5)}


@torch.inference_mode()
def run(args: argparse.Namespace) -> dict:
    records = load_records(args.data)
    if args.threads:
        torch.set_num_threads(args.threads)
    loaded = load_model(args.model)
    engine = BlockEngine(loaded, system_prompt=PREFIX)
    strategies = {
        "full": DecodeOptions("full"),
        **({DENSE: DecodeOptions("full")} if loaded.four_bit_projections else {}),
        "recycled_stride": DecodeOptions("recycled", args.recycle_k, args.stride, pool_kernel=args.pool_kernel,
                                         prompt_tail=args.prompt_tail),
        "recycled_dynamic": DecodeOptions("recycled", args.recycle_k, args.dynamic_stride, args.dynamic_threshold,
                                          args.pool_kernel, prompt_tail=args.prompt_tail),
        "streaming": DecodeOptions("streaming", args.recycle_k),
    }
    results = []
    for c, target in enumerate(int(x) for x in args.contexts.split(",")):
        seconds = {name: 0.0 for name in strategies}
        logits: dict[str, list[torch.Tensor]] = {name: [] for name in strategies}
        shares: dict[str, list[float]] = {}
        prompts = []
        for p in tqdm(range(args.prompts), desc=f"{target}-token prompts", leave=False):
            question, passages = build_prompt(engine, records, c * args.prompts + p, target)
            started = time.perf_counter()
            done = engine.prefill(None, passages, question, mode=args.prefill, max_new_tokens=args.new_tokens)
            prefill_s = time.perf_counter() - started
            first = int(done.logits.float().index_fill(0, torch.tensor(sorted(engine.eos_ids), device=engine.device),
                                                       float("-inf")).argmax())
            tokens, out, s, share = _side_by_side(engine, done.cache, strategies, first, args.new_tokens,
                                                  args.rounds, args.turns)
            for name in strategies:
                seconds[name] += s[name]
                logits[name].append(out[name])
                if name in share:
                    shares.setdefault(name, []).append(share[name])
            prompts.append({"context_tokens": done.cache.length, "passages": len(passages),
                            "question": question, "prefill_s": round(prefill_s, 2),
                            "answer": engine.tokenizer.decode(tokens)})
            del done
        decoded = args.new_tokens * args.prompts
        reference = torch.cat(logits["full"])
        rows = {}
        for name, options in strategies.items():
            row = {"tokens_per_s": round(decoded / seconds[name], 3),
                   "ms_per_token": round(1000 * seconds[name] / decoded, 1),
                   "speedup": round(seconds["full"] / seconds[name], 3)}
            if name != "full":
                row["k"] = options.budget(prompts[0]["context_tokens"])
                row.update(fidelity(reference, torch.cat(logits[name])))
            if name in shares:
                row["full_step_share"] = round(sum(shares[name]) / len(shares[name]), 4)
            rows[name] = row
        results.append({"target_tokens": target, "prompts": prompts, "strategies": rows})
    return {
        "benchmark": "decode", "model": args.model, "prefill": args.prefill, "new_tokens": args.new_tokens,
        "prompts": args.prompts, "recycle_k": args.recycle_k, "stride": args.stride,
        "dynamic_threshold": args.dynamic_threshold, "dynamic_stride": args.dynamic_stride,
        "pool_kernel": args.pool_kernel, "sinks": DecodeOptions.sinks, "prompt_tail": args.prompt_tail,
        "rounds": args.rounds, "turns": args.turns, "device": str(engine.device),
        "dtype": str(next(engine.model.parameters()).dtype), "four_bit_projections": loaded.four_bit_projections,
        "machine": machine(engine.device), "results": results,
    }
