"""Retrieval of scored passages, and answering a question over the passages retrieved."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from blockrag.engine import BlockEngine, GenerationResult, LoadedModel, PrefillMode, StoredPassage, load_model
from blockrag.engine.prompt import PassageOrder, in_prompt_order
from blockrag.errors import IndexMismatchError

from .embedding import Embedder
from .index import Index, Node


@dataclass(frozen=True)
class ScoredNode:
    """A retrieved passage and its cosine similarity to the query."""

    node: Node
    score: float

    @property
    def id(self) -> str:
        return self.node.id

    @property
    def text(self) -> str:
        return self.node.text

    @property
    def metadata(self) -> dict[str, Any]:
        return self.node.metadata

    @property
    def block_key(self) -> str:
        """The store key of the passage's KV block, as ingestion stored it."""
        return self.node.kv_key

    def passage(self) -> StoredPassage:
        """The passage as the engine takes it: its block is looked up by the key ingestion stored it under."""
        return StoredPassage(self.node.text, self.node.kv_key)


class Retriever:
    """Finds the passages of an index nearest to a query in the index's embedding space."""

    def __init__(self, index: Index, embedder: Embedder | None = None, *, device: str = "cpu"):
        # Queries come one at a time, where bf16 saves nothing: fp32 keeps their rankings exact.
        embedder = embedder or Embedder(index.config.embedding_model, device=device, dtype="float32")
        if embedder.dimension != index.config.dimension:
            raise IndexMismatchError(
                f"the index in {index.folder} holds {index.config.dimension}-dimensional vectors of "
                f"{index.config.embedding_model!r}, but {embedder.name!r} makes {embedder.dimension}-dimensional ones; "
                "retrieve with the index's own embedding model.")
        self.index = index
        self.embedder = embedder

    def retrieve(self, query: str, top_k: int = 5) -> list[ScoredNode]:
        """Up to ``top_k`` passages nearest to ``query``, best first, with their scores and block keys."""
        hits = self.index.search(self.embedder.embed([query]), top_k)[0]
        nodes = {node.id: node for node in self.index.nodes([node_id for node_id, _ in hits])}
        return [ScoredNode(nodes[node_id], score) for node_id, score in hits if node_id in nodes]


def load_engine(index: Index, model: str | None = None, *, loaded: LoadedModel | None = None,
                **kwargs) -> BlockEngine:
    """The LLM an index was built with, its prompt and block mode, serving blocks from the index's KV store.

    ``model`` overrides where the LLM is loaded from, and ``loaded`` reuses a model already in
    memory; either must still be the index's model. ``kwargs`` go to :class:`BlockEngine`.
    """
    config = index.config
    loaded = loaded or load_model(model or config.model)
    engine = BlockEngine(loaded, system_prompt=config.system_prompt, block_mode=config.block_mode, store=index.kv,
                         **kwargs)
    if engine.fingerprint != config.fingerprint:
        raise IndexMismatchError(
            f"the index in {index.folder} was built with the LLM {config.model!r} (fingerprint {config.fingerprint}), "
            f"but {model or config.model!r} loads as {engine.fingerprint}: its stored KV would not apply. Load the "
            "index's model with --model, or ingest the documents again into a new folder with this one.")
    return engine


@dataclass
class Answer:
    """An answer and the passages it was given, best first, with their retrieval scores."""

    question: str
    result: GenerationResult
    passages: list[ScoredNode]

    @property
    def text(self) -> str:
        return self.result.text.strip()


def answer(retriever: Retriever, engine: BlockEngine, question: str, *, top_k: int = 5,
           mode: PrefillMode = "block", order: PassageOrder | None = None, max_new_tokens: int = 128,
           **sampling) -> Answer:
    """Retrieve ``top_k`` passages and answer over them, placed in the prompt by ``order`` (None: the engine's
    ``passage_order``, by default the best last, next to the question).

    In block mode the passages' KV comes from ``engine.store`` (see :func:`load_engine`) and only
    the question is prefilled; in full mode the whole prompt is.
    """
    hits = retriever.retrieve(question, top_k)
    placed = in_prompt_order([hit.passage() for hit in hits], order or engine.passage_order)
    result = engine.generate(None, placed, question, mode=mode, max_new_tokens=max_new_tokens, **sampling)
    return Answer(question, result, hits)
