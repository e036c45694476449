"""Exception classes of the retriever. Every message says what the user can do about it."""

from blockrag.engine import BlockragError


class RetrieverError(BlockragError):
    """Base class of the errors the retriever raises on purpose."""


class DocumentFormatError(RetrieverError):
    """An input file could not be read as documents (unknown extension, bad JSONL line)."""


class EmbeddingModelNotFoundError(RetrieverError):
    """The sentence-transformers model could not be found on this machine."""


class IndexNotFoundError(RetrieverError):
    """No index exists in the folder given."""


class IndexMismatchError(RetrieverError):
    """The index was built with another LLM, prompt, embedding model or setting than the one asked for."""


class NodeNotFoundError(RetrieverError, KeyError):
    """No passage with this node ID is in the index."""


class IndexFullError(RetrieverError):
    """The disk holding the index folder is full; what was committed is kept and a re-run resumes."""
