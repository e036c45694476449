"""An evaluation run: answer NQ-open questions in several prefill modes over the same passages, and score them.

Every mode of a question sees the very same passages (top-k retrieved from the index built over
the file's own passages, or the gold passage among random ones), so modes differ only in how the
prompt is prefilled and accuracy differences are paired: McNemar's exact test on the questions one
mode got right and the other wrong. Answers are greedy and scored by Lost in the Middle's
best-subspan rule on their first line. Each (question, mode) result is appended to a results file
as it is computed, so a stopped run resumes without redoing finished pairs. The engine a run
answers with is its own, built over the loaded model with the store and block mode it needs.
"""

from __future__ import annotations

import os
import platform
import tempfile
from collections.abc import Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from tqdm.auto import tqdm

from blockrag.engine import (DEFAULT_MODEL, BlockEngine, BlockMode, DecodeWeights, GenerationResult, LoadedModel,
                             load_model)
from blockrag.engine.adapter import file_sha256
from blockrag.engine.model import package_versions
from blockrag.engine.prompt import PassageOrder
from blockrag.errors import EvaluationError, InvalidArgumentError
from blockrag.kvstore import KVStore, open_store
from blockrag.retriever import Index, Retriever, ingest

from .modes import DEFAULT_MODES, EvalMode, parse_modes
from .qa import DEFAULT_SYSTEM_PROMPT, DEFAULT_TOP_K, load_qa, qa_documents
from .questions import EvalQuestion, oracle_questions, retrieved_questions
from .report import markdown_table, summarize
from .results import ResultsFile, answer_record
from .trained import check_untrained

#: No system prompt made SmolLM2-135M answer in a few words: it restates the question in a sentence first.
DEFAULT_MAX_NEW_TOKENS = 32
#: Only an answer's first line is scored, so decoding stops there.
STOP = ("\n",)


@dataclass(frozen=True)
class EvalConfig:
    """What one evaluation run answers, over which passages, with which model: checked when made."""

    data: str | os.PathLike
    """NQ-open questions, JSONL (``.gz``)."""
    index: str | os.PathLike | None = None
    """Index over the file's passages (built if missing); needed unless ``oracle_plus_random``."""
    top_k: int = DEFAULT_TOP_K
    order: PassageOrder | None = None
    """Where the retrieved passages' best goes in the prompt; None: the model's (an adapter's training order)."""
    modes: tuple[EvalMode, ...] = field(default_factory=lambda: tuple(parse_modes(DEFAULT_MODES)))
    limit: int | None = None
    start: int = 0
    seed: int = 0
    """Seeds the oracle passages and gold positions."""
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS
    system_prompt: str = DEFAULT_SYSTEM_PROMPT
    oracle_plus_random: int | None = None
    """Instead of retrieving, the gold passage among this many passages (the others random ones of the file)."""
    gold_position: int | None = None
    """With ``oracle_plus_random``: the gold passage's place, from 0; None: random per question, seeded."""
    model: str = DEFAULT_MODEL
    adapter: str | os.PathLike | None = None
    """LoRA adapter folder merged into the model; the rows it was trained on are refused."""
    device: str = "cpu"
    dtype: str = "auto"
    decode_weights: DecodeWeights = "auto"
    """What decode steps read (:func:`~blockrag.engine.load_model`'s ``decode_weights``)."""
    results: str | os.PathLike | None = None
    """Per-answer results file, resumed if present; None: kept in memory only."""
    progress: bool = True

    def __post_init__(self) -> None:
        if not self.modes:
            raise EvaluationError("no modes given: pass at least one, e.g. parse_modes('full,block').")
        if self.oracle_plus_random is None:
            if self.index is None:
                raise EvaluationError("pass --index DIR (built over the file's passages if missing), or "
                                      "--oracle-plus-random K to give each question its gold passage among random "
                                      "ones.")
            if self.gold_position is not None:
                raise EvaluationError("--gold-position places the gold passage of --oracle-plus-random K; pass "
                                      "both.")
            if self.top_k < 1:
                raise EvaluationError(f"--top-k must be at least 1, got {self.top_k}.")
        else:
            if self.index is not None:
                raise EvaluationError("--oracle-plus-random gives the passages itself and reads no index; leave out "
                                      "--index.")
            if self.oracle_plus_random < 1:
                raise EvaluationError(f"--oracle-plus-random must be at least 1, got {self.oracle_plus_random}.")
        if self.max_new_tokens < 1:
            raise EvaluationError(f"--max-new-tokens must be at least 1, got {self.max_new_tokens}.")


# --- answering --------------------------------------------------------------------------------------------------


class Reader(Protocol):
    """Answers a question over passages in one mode (the engine; tests pass a stand-in)."""

    def answer(self, question: str, passages: Sequence[str], mode: EvalMode) -> GenerationResult: ...


class EngineReader:
    """Greedy answers from a :class:`BlockEngine`, up to the first newline (only the first line is scored).

    Block modes answer from the engine's store: a passage's block is encoded and stored the first
    time any question needs it, before the clock starts, so block-mode TTFT is what a server with
    the passages ingested sees: the blocks read from its store (memory tier, else below it) once,
    assembled, the question prefilled. Which passages are stored is remembered, so a question's
    blocks are looked up once, by the timed generation.
    """

    def __init__(self, engine: BlockEngine, max_new_tokens: int):
        if engine.store is None:
            raise InvalidArgumentError("EngineReader needs an engine with a block store: "
                                       "BlockEngine(loaded, store=open_store(folder))")
        self.engine = engine
        self.max_new_tokens = max_new_tokens
        self._stored: set[tuple[str, BlockMode]] = set()

    def _store_new(self, passages: Sequence[str], block_mode: BlockMode) -> None:
        """Store the blocks of passages no earlier question needed, unless the store holds them already."""
        engine, store = self.engine, self.engine.store
        assert store is not None
        unknown = [p for p in dict.fromkeys(passages) if (p, block_mode) not in self._stored]
        if not unknown:
            return
        keys = engine.block_keys(unknown, block_mode=block_mode)
        missing = [p for p, key in zip(unknown, keys) if not store.contains(key)]
        if missing:
            engine.blocks(missing, block_mode=block_mode)
        self._stored.update((p, block_mode) for p in unknown)

    def answer(self, question: str, passages: Sequence[str], mode: EvalMode) -> GenerationResult:
        engine = self.engine
        if mode.prefill == "full":
            return engine.generate(None, list(passages), question, mode="full", max_new_tokens=self.max_new_tokens,
                                   stop=STOP)
        block_mode = mode.block_mode or engine.block_mode
        self._store_new(passages, block_mode)
        return engine.generate(None, list(passages), question, mode="block", block_mode=block_mode,
                               max_new_tokens=self.max_new_tokens, stop=STOP, recovery=mode.recovery)


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
            results.add(answer_record(q, mode, reader.answer(q.item.question, q.passages, mode)))
            bar.update(1)


# --- the run ----------------------------------------------------------------------------------------------------


def _open_index(stack: ExitStack, config: EvalConfig, loaded: LoadedModel) -> Index:
    """The index over the file's passages, built (or its stopped build finished) if needed."""
    assert config.index is not None
    folder = Path(config.index).expanduser()
    documents = qa_documents(config.data)
    if not Index.exists(folder):
        ingest(documents, folder, engine=BlockEngine(loaded, system_prompt=config.system_prompt), model=config.model,
               progress=config.progress)
    else:
        with Index.open(folder) as index:
            built = index.config
            incomplete = any(not index.document_nodes(d.id) for d in documents)
        if incomplete and built.fingerprint != loaded.fingerprint:
            raise EvaluationError(f"the index in {folder} lacks some of {config.data}'s passages and was built with "
                                  "another model; evaluate with that model to finish it, or pass a new --index "
                                  "folder.")
        if incomplete:  # a build that was stopped: finish it with the index's own settings
            ingest(documents, folder, engine=BlockEngine(loaded, system_prompt=built.system_prompt,
                                                         block_mode=built.block_mode), progress=config.progress)
    return stack.enter_context(Index.open(folder))


def _index_engine(stack: ExitStack, index: Index, loaded: LoadedModel, system_prompt: str) -> BlockEngine:
    """An engine in the index's block mode ("block" means it), over the index's store if it serves this model.

    A model with another fingerprint (an adapter, another dtype) gets its own store ``DIR/kv-FINGERPRINT``;
    keys name the prompt and block mode a block was encoded after, so one store holds every mode's blocks.
    """
    built = index.config
    store: KVStore = index.kv
    if loaded.fingerprint != built.fingerprint:
        store = stack.enter_context(open_store(index.folder / f"kv-{loaded.fingerprint}",
                                               fingerprint=loaded.fingerprint))
    return BlockEngine(loaded, system_prompt=system_prompt, block_mode=built.block_mode, store=store)


def run_evaluation(config: EvalConfig) -> dict[str, Any]:
    """Answer, score and summarize: the report ``blockrag eval`` prints, with every setting that produced it.

    With an adapter, rows of ``config.data`` it records as trained on are refused
    (:class:`~blockrag.errors.TrainedRowsError`) before any model is loaded.
    """
    items = load_qa(config.data, config.limit, config.start)
    if not items:
        raise EvaluationError(f"{config.data} has no questions from line {config.start}; lower --start.")
    data_sha256 = file_sha256(config.data)
    trained_on = None
    if config.adapter is not None:
        trained_on = check_untrained(config.adapter, config.data, data_sha256, [item.index for item in items])
    loaded = load_model(config.model, dtype=config.dtype, device=config.device, adapter=config.adapter,
                        decode_weights=config.decode_weights)
    weights = next(loaded.model.parameters())
    oracle = config.oracle_plus_random is not None
    modes = list(config.modes)
    settings: dict[str, Any] = {
        "data": str(config.data), "data_sha256": data_sha256, "start": config.start, "limit": config.limit,
        "questions": len(items), "passages": "oracle-plus-random" if oracle else "retrieved",
        "top_k": None if oracle else config.top_k,
        "passage_order": None if oracle else config.order or loaded.passage_order,
        "oracle_plus_random": config.oracle_plus_random,
        "gold_position": config.gold_position, "seed": config.seed,
        "index": None if config.index is None else str(config.index), "index_passages": None,
        "embedding_model": None, "kv_store": None, "max_new_tokens": config.max_new_tokens,
        "decoding": "greedy, up to the first newline",
        "system_prompt": config.system_prompt, "model": config.model,
        "adapter": None if config.adapter is None else str(config.adapter),
        "adapter_trained_on": None if trained_on is None else [rows.to_json() for rows in trained_on],
        "fingerprint": loaded.fingerprint, "block_mode": None, "modes": [m.name for m in modes],
        "device": str(weights.device), "dtype": str(weights.dtype),
        "decode_weights": config.decode_weights, "four_bit_projections": loaded.four_bit_projections,
        "scoring": "best-subspan match (Lost in the Middle) on the answer's first line",
        "ttft": "full: prefill of the whole prompt; block modes: stored blocks read once from the store (its "
                "memory tier, else below it), assembled, recovery (if any) and the question prefilled",
    }
    with ExitStack() as stack:
        if oracle:
            questions = oracle_questions(items, load_qa(config.data), config.oracle_plus_random, config.gold_position,
                                         config.seed)
            scratch = stack.enter_context(tempfile.TemporaryDirectory(prefix="blockrag-eval-kv-"))
            engine = BlockEngine(loaded, system_prompt=config.system_prompt,
                                 store=stack.enter_context(open_store(scratch, fingerprint=loaded.fingerprint)))
        else:
            index = _open_index(stack, config, loaded)
            engine = _index_engine(stack, index, loaded, config.system_prompt)
            settings.update(index_passages=len(index), embedding_model=index.config.embedding_model)
            questions = retrieved_questions(items, Retriever(index, device=config.device), config.top_k,
                                            settings["passage_order"])
        assert engine.store is not None
        settings.update(block_mode=engine.block_mode, kv_store=None if oracle else engine.store.location)
        results = ResultsFile(config.results, settings)
        evaluate(questions, modes, EngineReader(engine, config.max_new_tokens), results, config.progress)
    summary = summarize(questions, modes, results.done)
    return {
        "evaluation": "qa", "settings": settings,
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "threads": torch.get_num_threads(),
                    "gpu": torch.cuda.get_device_name() if weights.device.type == "cuda" else None},
        "versions": package_versions(),
        "retrieval": None if oracle else {"k": config.top_k, "recall": summary["recall"]},
        "modes": summary["modes"], "paired": summary["paired"], "table": markdown_table(summary, settings),
    }
