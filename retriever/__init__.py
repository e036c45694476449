"""blockrag's retriever: documents to passages that are both searchable (FAISS) and already encoded (KV store).

    report = ingest(load_documents(["docs/"]), "my-index")   # one pass: embeddings and KV blocks
    index = Index.open("my-index")
    hits = Retriever(index).retrieve("question", top_k=5)    # [ScoredNode(node, score), ...], best first
    index.node(hits[0][0]).text
"""

from .chunking import DEFAULT_CHUNK_TOKENS, node_id, split_text
from .documents import Document, SampleQuestion, bundled_corpus, bundled_questions, load_documents
from .embedding import DEFAULT_EMBEDDING_MODEL, Embedder, EmbeddingDtype
from blockrag.errors import (DocumentFormatError, EmbeddingModelNotFoundError, IndexFullError, IndexMismatchError,
                     IndexNotFoundError, NodeNotFoundError, RetrieverError)
from .index import VECTOR_INDEX_KINDS, Index, IndexConfig, Node, VectorIndexKind, read_config
from .ingest import IngestReport, ingest
from .retrieve import Answer, Retriever, ScoredNode, answer, load_engine

__all__ = [
    "DEFAULT_CHUNK_TOKENS", "DEFAULT_EMBEDDING_MODEL", "VECTOR_INDEX_KINDS", "Answer", "Document",
    "DocumentFormatError", "Embedder", "EmbeddingDtype", "EmbeddingModelNotFoundError", "Index", "IndexConfig",
    "IndexFullError",
    "IndexMismatchError", "IndexNotFoundError", "IngestReport", "Node", "NodeNotFoundError", "Retriever", "ScoredNode",
    "RetrieverError", "SampleQuestion", "VectorIndexKind", "answer", "bundled_corpus", "bundled_questions", "ingest", "load_documents",
    "load_engine", "node_id", "read_config", "split_text",
]
