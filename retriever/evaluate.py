"""``blockrag eval``: answer NQ-open questions in several prefill modes over the same passages, and score them.

Every mode of a question sees the very same passages (top-k retrieved from the index built over
the file's own passages, or the gold passage among random ones), so modes differ only in how the
prompt is prefilled and accuracy differences are paired: McNemar's exact test on the questions one
mode got right and the other wrong. Answers are greedy and scored by Lost in the Middle's
best-subspan rule on their first line. Each (question, mode) result is appended to a JSONL file as
it is computed, so a stopped run resumes without redoing finished pairs.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import platform
import random
import statistics
import tempfile
from collections.abc import Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
from tqdm.auto import tqdm

from blockrag.engine import (BLOCK_MODES, BlockEngine, BlockMode, GenerationResult, PrefillMode, Recovery,
                             load_model)
from blockrag.engine.model import package_versions
from blockrag.engine.prompt import DEFAULT_PASSAGE_ORDER, PASSAGE_ORDERS, PassageOrder, in_prompt_order
from blockrag.kvstore import KVStore, open_store

from blockrag.errors import InvalidArgumentError, EvaluationError
from .index import Index
from .ingest import ingest
from .qa import QAItem, best_subspan_match, first_line, load_qa, oracle_plus_random, qa_documents, retrieved_nodes
from .retrieve import Retriever

#: Short answers, taken from the documents: on 10 dev questions (gold among 3, full attention) SmolLM2-135M got 4
#: right with it, against 2 with the engine's default prompt and 2-3 with three other wordings. No system prompt
#: made it answer in a few words: it restates the question in a sentence, hence 32 new tokens (24 cut answers).
DEFAULT_SYSTEM_PROMPT = "Answer the question with a short phrase from the documents. Do not explain."
DEFAULT_MODES = "full,block"
DEFAULT_MAX_NEW_TOKENS = 32
#: Only an answer's first line is scored, so decoding stops there.
STOP = ("\n",)
DEFAULT_TOP_K = 10
Z_95 = 1.959963984540054
"""The standard normal quantile of 0.975."""

#: Option name in a mode spec -> Recovery field.
RECOVERY_OPTIONS = {"recompute": "recompute", "check": "check_layer", "sink": "sink_tokens"}
MODE_HELP = ("modes are full, block (the index's block mode), naive and prefix; a block mode may be followed by "
             "recovery options +recompute=FRACTION, +check=LAYER, +sink=TOKENS, e.g. prefix+recompute=0.15+check=1")


# --- modes ------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class EvalMode:
    """How one mode prefills: ``full``, or block mode with a block mode (None: the engine's) and recovery."""

    name: str
    prefill: PrefillMode
    block_mode: BlockMode | None = None
    recovery: Recovery | None = None


def parse_mode(spec: str) -> EvalMode:
    """``full``, ``block``, ``naive`` or ``prefix``, then ``+option=value`` recovery options for block modes."""
    base, *options = [part.strip() for part in spec.strip().split("+")]
    if base not in ("full", "block", *BLOCK_MODES):
        raise EvaluationError(f"unknown mode {spec!r}: {MODE_HELP}.")
    if base == "full" and options:
        raise EvaluationError(f"{spec!r}: full attention has nothing to recover; recovery options go after a block "
                              "mode, e.g. prefix+recompute=0.15.")
    fields: dict[str, float | int] = {}
    for option in options:
        key, _, value = option.partition("=")
        if key not in RECOVERY_OPTIONS or not value:
            raise EvaluationError(f"{spec!r}: cannot read the option {option!r}: {MODE_HELP}.")
        if RECOVERY_OPTIONS[key] in fields:
            raise EvaluationError(f"{spec!r} gives {key} twice.")
        try:
            number: float | int = float(value) if key == "recompute" else int(value)
        except ValueError:
            kind = "a fraction such as 0.15" if key == "recompute" else "a whole number"
            raise EvaluationError(f"{spec!r}: {key} must be {kind}, got {value!r}.") from None
        fields[RECOVERY_OPTIONS[key]] = number
    name = "+".join([base, *options])
    if base == "full":
        return EvalMode(name, "full")
    try:
        recovery = Recovery(**fields) if fields else None
    except ValueError as exc:
        raise EvaluationError(f"{spec!r}: {exc}.") from None
    return EvalMode(name, "block", None if base == "block" else base, recovery)


def parse_modes(text: str) -> list[EvalMode]:
    """Comma-separated mode specs, each at most once; the first is what the others are compared against."""
    modes = [parse_mode(spec) for spec in text.split(",") if spec.strip()]
    if not modes:
        raise EvaluationError(f"no modes given: {MODE_HELP}.")
    names = [m.name for m in modes]
    if len(set(names)) != len(names):
        raise EvaluationError(f"a mode is listed twice in {text!r}; list each once.")
    return modes


# --- statistics -------------------------------------------------------------------------------------------------


def wilson_interval(successes: int, n: int, z: float = Z_95) -> tuple[float, float]:
    """Wilson score interval of a proportion: unlike the normal approximation, sensible near 0% and 100%."""
    if n == 0:
        return 0.0, 1.0
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return max(0.0, centre - half), min(1.0, centre + half)


def mcnemar_exact(b: int, c: int) -> float:
    """Two-sided exact McNemar p-value: the binomial test of ``b`` against ``b + c`` discordant pairs at 1/2."""
    n = b + c
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(min(b, c) + 1)) / 2 ** n
    return min(1.0, 2 * tail)


# --- the questions and what each mode answered -----------------------------------------------------------------


@dataclass(frozen=True)
class EvalQuestion:
    """A question with the passages every mode answers it over."""

    item: QAItem
    passages: tuple[str, ...]
    passage_ids: tuple[str, ...]
    """Document ID of each passage."""

    @property
    def gold_rank(self) -> int | None:
        """Where the gold passage sits among the passages in the prompt (from 0), None if it was not retrieved."""
        return self.passage_ids.index(self.item.gold_id) if self.item.gold_id in self.passage_ids else None


def retrieved_questions(items: Sequence[QAItem], retriever: Retriever, top_k: int,
                        order: PassageOrder = DEFAULT_PASSAGE_ORDER) -> list[EvalQuestion]:
    """Each question with its ``top_k`` passages from the index, placed in the prompt by ``order``."""
    out = []
    for item in items:
        nodes = in_prompt_order(retrieved_nodes(retriever, item.question, top_k), order)
        out.append(EvalQuestion(item, tuple(n.text for n in nodes), tuple(n.doc_id for n in nodes)))
    return out


def oracle_questions(items: Sequence[QAItem], corpus: Sequence[QAItem], k: int, gold_position: int | None,
                     seed: int) -> list[EvalQuestion]:
    """Each question with its gold passage among ``k - 1`` random ones of ``corpus``, at ``gold_position`` or at a
    random one; each question draws from its own generator, so it gets the same passages in any subset."""
    ids = {}
    for other in corpus:
        ids.setdefault(other.gold, other.gold_id)
    out = []
    for item in items:
        rng = random.Random(f"{seed}:{item.index}")
        position = rng.randrange(k) if gold_position is None else gold_position
        passages = oracle_plus_random(corpus, item, k, position, rng)
        out.append(EvalQuestion(item, tuple(passages), tuple(item.gold_id if i == position else ids[p]
                                                              for i, p in enumerate(passages))))
    return out


class Reader(Protocol):
    """Answers a question over passages in one mode (the engine; tests pass a stand-in)."""

    def answer(self, question: str, passages: Sequence[str], mode: EvalMode) -> GenerationResult: ...


class EngineReader:
    """Greedy answers from a :class:`BlockEngine`, up to the first newline (only the first line is scored).

    Block modes answer from the engine's store: a passage's block is encoded and stored the first
    time any question needs it, before the clock starts, so block-mode TTFT is what a server with
    the passages ingested sees (blocks read through the store's memory tier, assembled, question
    prefilled).
    """

    def __init__(self, engine: BlockEngine, max_new_tokens: int):
        if engine.store is None:
            raise InvalidArgumentError("EngineReader needs an engine with a block store (engine.store)")
        self.engine = engine
        self.max_new_tokens = max_new_tokens

    def answer(self, question: str, passages: Sequence[str], mode: EvalMode) -> GenerationResult:
        engine = self.engine
        if mode.prefill == "full":
            return engine.generate(None, list(passages), question, mode="full", max_new_tokens=self.max_new_tokens,
                                   stop=STOP)
        block_mode = mode.block_mode or engine.block_mode
        engine.blocks(passages, block_mode=block_mode)  # stores any block no earlier question needed
        return engine.generate(None, list(passages), question, mode="block", block_mode=block_mode,
                               max_new_tokens=self.max_new_tokens, stop=STOP, recovery=mode.recovery)


# --- the results file -------------------------------------------------------------------------------------------

#: Settings a results file must share with a run that resumes it: anything that changes an answer or its cost.
RESUME_KEYS = ("data_sha256", "passages", "top_k", "passage_order", "oracle_plus_random", "gold_position", "seed",
               "max_new_tokens", "system_prompt", "fingerprint", "block_mode", "embedding_model", "index_passages",
               "device")


class ResultsFile:
    """Per-(question, mode) records in JSONL after a first line of settings; appended to and flushed one by one."""

    def __init__(self, path: str | os.PathLike | None, settings: dict[str, Any]):
        self.path = Path(path) if path is not None else None
        self.done: dict[tuple[int, str], dict[str, Any]] = {}
        if self.path is None:
            return
        if self.path.exists() and self.path.stat().st_size:
            self._read(settings)
        else:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.path.write_text(json.dumps({"settings": settings}) + "\n")

    def _read(self, settings: dict[str, Any]) -> None:
        assert self.path is not None
        raw = self.path.read_bytes()
        complete = raw[:raw.rfind(b"\n") + 1]  # a run stopped mid-write leaves a partial last line: dropped
        lines = complete.decode("utf-8").splitlines()
        try:
            rows = [json.loads(line) for line in lines]
        except json.JSONDecodeError:
            raise EvaluationError(f"{self.path} is not a results file of `blockrag eval` (a line is not JSON); "
                                  "pass another --results file or delete it to start over.") from None
        if not rows or "settings" not in rows[0]:
            raise EvaluationError(f"{self.path} does not start with the settings line of `blockrag eval`; pass "
                                  "another --results file or delete it to start over.")
        saved = rows[0]["settings"]
        differ = [f"{key} {saved.get(key)!r} (now {settings.get(key)!r})" for key in RESUME_KEYS
                  if saved.get(key) != settings.get(key)]
        if differ:
            raise EvaluationError(f"{self.path} holds results of a run with other settings: {'; '.join(differ)}. "
                                  "Pass another --results file (or --json), or delete it to start over.")
        if len(complete) != len(raw):
            with self.path.open("r+b") as f:
                f.truncate(len(complete))
        self.done = {(row["question"], row["mode"]): row for row in rows[1:]}

    def add(self, record: dict[str, Any]) -> None:
        self.done[record["question"], record["mode"]] = record
        if self.path is not None:
            with self.path.open("a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")


def _record(question: EvalQuestion, mode: EvalMode, result: GenerationResult) -> dict[str, Any]:
    return {"question": question.item.index, "mode": mode.name,
            "correct": best_subspan_match(first_line(result.text), question.item.answers),
            "prediction": result.text, "prompt_tokens": result.prompt_tokens, "block_tokens": result.block_tokens,
            "ttft_s": result.ttft_s, "answer_tokens": result.completion_tokens, "finish_reason": result.finish_reason,
            "passages": list(question.passage_ids), "gold_rank": question.gold_rank}


def evaluate(questions: Sequence[EvalQuestion], modes: Sequence[EvalMode], reader: Reader, results: ResultsFile,
             progress: bool = True) -> None:
    """Answer every question in every mode not yet in ``results``, question by question (its modes back to back,
    so that a shared machine's load weighs on every mode alike), recording each answer as it comes."""
    for q in questions:
        for mode in modes:
            done = results.done.get((q.item.index, mode.name))
            if done is not None and done["passages"] != list(q.passage_ids):
                raise EvaluationError(
                    f"question {q.item.index} now gets other passages than the results file recorded for it (the "
                    "index changed?); pass another --results file or delete it to start over.")
    todo = [(q, m) for q in questions for m in modes if (q.item.index, m.name) not in results.done]
    with tqdm(total=len(todo), desc="evaluating", unit="answer", disable=not progress or not todo) as bar:
        for q, mode in todo:
            results.add(_record(q, mode, reader.answer(q.item.question, q.passages, mode)))
            bar.update(1)


# --- the summary ------------------------------------------------------------------------------------------------


def _mean(values: Sequence[float]) -> float | None:
    return statistics.fmean(values) if values else None


def summarize(questions: Sequence[EvalQuestion], modes: Sequence[EvalMode],
              done: dict[tuple[int, str], dict[str, Any]]) -> dict[str, Any]:
    """Per mode accuracy with its Wilson 95% interval and mean costs; every mode paired against the first."""
    per_mode: dict[str, Any] = {}
    for mode in modes:
        rows = [done[q.item.index, mode.name] for q in questions if (q.item.index, mode.name) in done]
        correct = sum(r["correct"] for r in rows)
        low, high = wilson_interval(correct, len(rows))
        per_mode[mode.name] = {
            "n": len(rows), "correct": correct, "accuracy": correct / len(rows) if rows else None,
            "ci95": [low, high],
            "mean_prompt_tokens": _mean([r["prompt_tokens"] for r in rows]),
            "mean_block_tokens": _mean([r["block_tokens"] for r in rows]),
            "mean_ttft_s": _mean([r["ttft_s"] for r in rows]),
            "mean_answer_tokens": _mean([r["answer_tokens"] for r in rows]),
        }
    first = modes[0].name
    paired: dict[str, Any] = {}
    for mode in modes[1:]:
        pairs = [(done[q.item.index, first]["correct"], done[q.item.index, mode.name]["correct"])
                 for q in questions if (q.item.index, first) in done and (q.item.index, mode.name) in done]
        b = sum(1 for x, y in pairs if x and not y)
        c = sum(1 for x, y in pairs if y and not x)
        paired[mode.name] = {"against": first, "n": len(pairs), "b": b, "c": c, "p_value": mcnemar_exact(b, c),
                             "accuracy_difference": (c - b) / len(pairs) if pairs else None}
    ranks = [q.gold_rank for q in questions]
    return {"recall": sum(r is not None for r in ranks) / len(ranks) if ranks else None,
            "modes": per_mode, "paired": paired}


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}%"


def markdown_table(summary: dict[str, Any], settings: dict[str, Any]) -> str:
    """The summary as a table for benchmarks/RESULTS.md, with a line saying what it was measured on."""
    lines = ["| mode | n | accuracy | 95% CI | Δ vs first | b / c | McNemar p | prompt tokens | block tokens | "
             "TTFT (ms) | answer tokens |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name, m in summary["modes"].items():
        pair = summary["paired"].get(name)
        diff = "" if pair is None or pair["accuracy_difference"] is None else \
            f"{100 * pair['accuracy_difference']:+.1f} pts"
        bc = "" if pair is None else f"{pair['b']} / {pair['c']}"
        p = "" if pair is None else f"{pair['p_value']:.3g}"
        ttft = "n/a" if m["mean_ttft_s"] is None else f"{1000 * m['mean_ttft_s']:.1f}"
        tokens = [("n/a" if m[k] is None else f"{m[k]:.1f}")
                  for k in ("mean_prompt_tokens", "mean_block_tokens", "mean_answer_tokens")]
        lines.append(f"| {name} | {m['n']} | {_pct(m['accuracy'])} | {_pct(m['ci95'][0])}–{_pct(m['ci95'][1])} | "
                     f"{diff} | {bc} | {p} | {tokens[0]} | {tokens[1]} | {ttft} | {tokens[2]} |")
    if settings["passages"] == "retrieved":
        source = f"top-{settings['top_k']} of {settings['index_passages']} passages (recall@{settings['top_k']} " \
                 f"{_pct(summary['recall'])}), {settings['passage_order']}"
    else:
        where = "a random position" if settings["gold_position"] is None else f"position {settings['gold_position']}"
        source = f"gold passage at {where} among {settings['oracle_plus_random']}"
    lines.append("")
    lines.append(f"{settings['questions']} questions (lines {settings['start']}–"
                 f"{settings['start'] + settings['questions'] - 1} of {Path(settings['data']).name}), {source}; "
                 f"greedy, {settings['max_new_tokens']} new tokens at most; b / c: questions only the first mode / "
                 "only this mode answered correctly.")
    return "\n".join(lines)


# --- the command ------------------------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("data", metavar="QA.jsonl.gz", help="NQ-open questions (see ../shared/data/README.md)")
    parser.add_argument("--index", metavar="DIR", help="index over the file's passages (built here if missing); "
                        "needed unless --oracle-plus-random")
    parser.add_argument("--top-k", type=int, default=DEFAULT_TOP_K, help="passages retrieved per question")
    parser.add_argument("--order", choices=PASSAGE_ORDERS,
                        help="where the retrieved passages' best goes in the prompt (default: the model's: last, "
                        "next to the question, unless --adapter was trained otherwise)")
    parser.add_argument("--modes", default=DEFAULT_MODES, help=f"comma separated; {MODE_HELP}")
    parser.add_argument("--limit", type=int, help="evaluate at most N questions")
    parser.add_argument("--start", type=int, default=0, help="first question's line (from 0)")
    parser.add_argument("--seed", type=int, default=0, help="seeds the oracle passages and gold positions")
    parser.add_argument("--max-new-tokens", type=int, default=DEFAULT_MAX_NEW_TOKENS)
    parser.add_argument("--system-prompt", default=DEFAULT_SYSTEM_PROMPT)
    parser.add_argument("--oracle-plus-random", type=int, metavar="K",
                        help="instead of retrieving, give the gold passage among K-1 random ones of the file")
    parser.add_argument("--gold-position", type=int, metavar="P",
                        help="with --oracle-plus-random: the gold passage's place, from 0 (default: random per "
                        "question, seeded)")
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--adapter", metavar="PATH", help="LoRA adapter folder merged into the model")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="auto", 
                        help="float32, bfloat16 or auto (bf16 where the device computes it natively, else fp32)")
    parser.add_argument("--results", metavar="RESULTS.jsonl",
                        help="per-question results, resumed if present (default: beside --json as .results.jsonl)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def _check_args(args: argparse.Namespace) -> None:
    if args.oracle_plus_random is None:
        if args.index is None:
            raise EvaluationError("pass --index DIR (built over the file's passages if missing), or "
                                  "--oracle-plus-random K to give each question its gold passage among random ones.")
        if args.gold_position is not None:
            raise EvaluationError("--gold-position places the gold passage of --oracle-plus-random K; pass both.")
        if args.top_k < 1:
            raise EvaluationError(f"--top-k must be at least 1, got {args.top_k}.")
    else:
        if args.index is not None:
            raise EvaluationError("--oracle-plus-random gives the passages itself and reads no index; leave out "
                                  "--index.")
        if args.oracle_plus_random < 1:
            raise EvaluationError(f"--oracle-plus-random must be at least 1, got {args.oracle_plus_random}.")
    if args.max_new_tokens < 1:
        raise EvaluationError(f"--max-new-tokens must be at least 1, got {args.max_new_tokens}.")


def results_path(args: argparse.Namespace) -> Path | None:
    """Where per-question results go: ``--results``, else beside ``--json`` (``OUT.results.jsonl``)."""
    if args.results:
        return Path(args.results)
    return Path(args.json).with_suffix(".results.jsonl") if getattr(args, "json", None) else None


def _file_sha256(path: str | os.PathLike) -> str:
    return hashlib.sha256(Path(path).expanduser().read_bytes()).hexdigest()


def _open_index(stack: ExitStack, args: argparse.Namespace, engine: BlockEngine, progress: bool) -> Index:
    """The index over the file's passages, built (or its stopped build finished) if needed.

    Its KV store serves the engine if both share the model fingerprint; a model with another
    fingerprint (an adapter, another dtype) gets its own store ``DIR/kv-FINGERPRINT``.
    """
    folder = Path(args.index).expanduser()
    documents = qa_documents(args.data)
    if not Index.exists(folder):
        ingest(documents, folder, engine=engine, model=args.model, progress=progress)
    else:
        with Index.open(folder) as index:
            config = index.config
            incomplete = any(not index.document_nodes(d.id) for d in documents)
        if incomplete and config.fingerprint != engine.fingerprint:
            raise EvaluationError(f"the index in {folder} lacks some of {args.data}'s passages and was built with "
                                  "another model; evaluate with that model to finish it, or pass a new --index "
                                  "folder.")
        if incomplete:  # a build that was stopped: finish it with the index's own settings
            ingest(documents, folder, engine=BlockEngine(engine.loaded, system_prompt=config.system_prompt,
                                                         block_mode=config.block_mode), progress=progress)
    return stack.enter_context(Index.open(folder))


def run(args: argparse.Namespace) -> dict[str, Any]:
    _check_args(args)
    modes = parse_modes(args.modes)
    progress = not args.no_progress
    items = load_qa(args.data, args.limit, args.start)
    if not items:
        raise EvaluationError(f"{args.data} has no questions from line {args.start}; lower --start.")
    loaded = load_model(args.model, dtype=args.dtype, device=args.device, adapter=args.adapter)
    engine = BlockEngine(loaded, system_prompt=args.system_prompt)
    oracle = args.oracle_plus_random is not None
    settings: dict[str, Any] = {
        "data": str(args.data), "data_sha256": _file_sha256(args.data), "start": args.start, "limit": args.limit,
        "questions": len(items), "passages": "oracle-plus-random" if oracle else "retrieved",
        "top_k": None if oracle else args.top_k,
        "passage_order": None if oracle else args.order or engine.passage_order,
        "oracle_plus_random": args.oracle_plus_random,
        "gold_position": args.gold_position, "seed": args.seed, "index": args.index, "index_passages": None,
        "embedding_model": None, "kv_store": None, "max_new_tokens": args.max_new_tokens,
        "decoding": "greedy, up to the first newline",
        "system_prompt": args.system_prompt, "model": args.model, "adapter": args.adapter,
        "fingerprint": engine.fingerprint, "block_mode": engine.block_mode, "modes": [m.name for m in modes],
        "device": str(engine.device), "dtype": str(next(engine.model.parameters()).dtype),
        "scoring": "best-subspan match (Lost in the Middle) on the answer's first line",
        "ttft": "full: prefill of the whole prompt; block modes: stored blocks read through the store's memory "
                "tier, assembled, recovery (if any) and the question prefilled",
    }
    with ExitStack() as stack:
        if oracle:
            questions = oracle_questions(items, load_qa(args.data), args.oracle_plus_random, args.gold_position,
                                         args.seed)
            scratch = stack.enter_context(tempfile.TemporaryDirectory(prefix="blockrag-eval-kv-"))
            engine.store = stack.enter_context(open_store(scratch, fingerprint=engine.fingerprint))
        else:
            index = _open_index(stack, args, engine, progress)
            questions = _retrieve(stack, index, engine, args, settings, items)
        results = ResultsFile(results_path(args), settings)
        evaluate(questions, modes, EngineReader(engine, args.max_new_tokens), results, progress)
    summary = summarize(questions, modes, results.done)
    return {
        "evaluation": "qa", "settings": settings,
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "threads": torch.get_num_threads(),
                    "gpu": torch.cuda.get_device_name() if engine.device.type == "cuda" else None},
        "versions": package_versions(),
        "retrieval": None if oracle else {"k": args.top_k, "recall": summary["recall"]},
        "modes": summary["modes"], "paired": summary["paired"], "table": markdown_table(summary, settings),
    }


def _retrieve(stack: ExitStack, index: Index, engine: BlockEngine, args: argparse.Namespace,
              settings: dict[str, Any], items: Sequence[QAItem]) -> list[EvalQuestion]:
    """Serve the engine from the index's block store (if it can) and retrieve every question's passages."""
    config = index.config
    engine.block_mode = config.block_mode  # "block" is the block mode the index's blocks were encoded in
    # Keys name the prompt and block mode a block was encoded after, so one store holds every mode's blocks.
    store: KVStore = index.kv
    if engine.fingerprint != config.fingerprint:
        store = stack.enter_context(open_store(index.folder / f"kv-{engine.fingerprint}",
                                               fingerprint=engine.fingerprint))
    engine.store = store
    settings["kv_store"] = store.location
    settings.update(block_mode=config.block_mode, index_passages=len(index), embedding_model=config.embedding_model)
    retriever = Retriever(index, device=args.device)
    return retrieved_questions(items, retriever, args.top_k, settings["passage_order"])
