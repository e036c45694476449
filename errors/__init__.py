"""Every exception class blockrag raises on purpose, in one place. Each message says what the user can do.

The classes form one tree under :class:`BlockragError`, by the part of blockrag that raises them:
the engine (models, prompts, options), the block store, the retriever and index, evaluation and
training, the integrations and the server. Where an error is also a built-in kind (a bad value, a
missing import, a timeout), it subclasses that built-in too, so ``except ValueError`` keeps working.
"""

from __future__ import annotations

from typing import Any, ClassVar


class BlockragError(Exception):
    """Base class of every error blockrag raises on purpose."""


class InvalidArgumentError(BlockragError, ValueError, TypeError):
    """An argument or option is out of range, or of the wrong type, kind or shape."""


class UnknownOptionError(InvalidArgumentError):
    """An option or keyword argument that blockrag does not know: nothing is silently ignored."""


class MissingExtraError(BlockragError, ImportError):
    """A feature needs an optional dependency group (an extra) that is not installed."""

    def __init__(self, feature: str, extra: str, cause: ImportError | str):
        name = cause.name if isinstance(cause, ImportError) and cause.name else cause
        super().__init__(f"{feature} needs {name}; install it with `pip install \"blockrag[{extra}]\"`.")
        self.extra = extra


# --- engine ------------------------------------------------------------------------------------------------------


class UnsupportedModelError(BlockragError):
    """The model is not a decoder-only transformer with rotary position embeddings that blockrag can re-position."""


class ModelNotFoundError(BlockragError):
    """A model name, alias or path could not be resolved to weights on this machine."""


class PromptTooLongError(BlockragError):
    """The assembled prompt does not fit the model's context window."""


class CacheFullError(BlockragError, RuntimeError):
    """A request's KV cache has no room for another token (its capacity is fixed when the request starts)."""


class InvalidConstraintError(BlockragError, ValueError):
    """A JSON schema or grammar given to constrain generation cannot be compiled."""


class StructuredRequestError(BlockragError, ValueError):
    """A request's tools, tool choice or response format cannot be used as given."""


class BlockMismatchError(BlockragError):
    """A precomputed block was encoded after another prefix or in another block mode than the request's."""


class AdapterNotFoundError(BlockragError):
    """A LoRA adapter folder is missing or holds no adapter saved as safetensors."""


class AdapterMismatchError(BlockragError):
    """A LoRA adapter was trained for another base model, or with other settings, than the ones asked for."""


# --- block store -------------------------------------------------------------------------------------------------


class StoreError(BlockragError):
    """Base class of the errors a block store raises on purpose."""


class StoreFullError(StoreError):
    """The store's disk or server memory is full; the entry was not written and no existing entry was lost."""


class WrongModelError(StoreError):
    """The store holds blocks of another model than the one asking: each store serves one model."""


class StoreUnavailableError(StoreError):
    """The store's server cannot be reached."""


class CorruptEntryError(StoreError):
    """A stored entry failed its header, checksum or key check. Stores delete such entries and report a miss."""


# --- retriever and index -----------------------------------------------------------------------------------------


class RetrieverError(BlockragError):
    """Base class of the errors the retriever and its index raise on purpose."""


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


# --- evaluation, training and benchmarks -------------------------------------------------------------------------


class DataFileError(BlockragError, FileNotFoundError):
    """A data file (QA questions, a benchmark's prompts) is not where it was looked for."""


class EvaluationError(BlockragError):
    """The evaluation was asked for something it cannot do, or its results file belongs to another run."""


class TrainedRowsError(EvaluationError):
    """An evaluation would score questions the adapter under test was trained on."""


# --- integrations ------------------------------------------------------------------------------------------------


class GenerationTimeoutError(BlockragError, TimeoutError):
    """Generation ran past the caller's ``timeout``."""


class BenchmarkError(BlockragError, RuntimeError):
    """A benchmark's own check of what it measured failed (a block not served, a request answered with an error)."""


# --- server ------------------------------------------------------------------------------------------------------


class ServerStartError(BlockragError, RuntimeError):
    """uvicorn did not start listening (the port is taken, or the app failed at start-up)."""


class ServerError(BlockragError):
    """Base class of the errors a server request gets as its HTTP answer, in OpenAI's error shape.

    ``{"error": {"message", "type", "param", "code"}}``; none of them is raised by a server fault
    except :class:`InternalServerError`.
    """

    status: ClassVar[int] = 400
    type: ClassVar[str] = "invalid_request_error"
    default_code: ClassVar[str | None] = None

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code or self.default_code

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def headers(self) -> dict[str, str]:
        return {}


class InvalidRequestError(ServerError):
    """The request's JSON, a field's value or an option is not one the server accepts."""


class ModelNotServedError(ServerError):
    """The request names another model than the one this server serves."""

    status = 404
    default_code = "model_not_found"


class UnknownBlockError(ServerError):
    """``blockrag.block_ids`` names a block that neither the server's passages nor its store hold."""

    default_code = "unknown_block_id"


class ContextLengthError(ServerError):
    """The prompt does not fit the model's context window."""

    default_code = "context_length_exceeded"


class QueueFullError(ServerError):
    """Every place in the request queue is taken; the client should retry after ``retry_after_s``."""

    status = 503
    type = "server_overloaded"
    default_code = "queue_full"

    def __init__(self, message: str, *, retry_after_s: int):
        super().__init__(message)
        self.retry_after_s = retry_after_s

    def headers(self) -> dict[str, str]:
        return {"Retry-After": str(self.retry_after_s)}


class StoreFailedError(ServerError):
    """The block store could not be read or written (its server is down, or it is full); retry later."""

    status = 503
    type = "server_error"
    default_code = "store_unavailable"


class RouteNotFoundError(ServerError):
    """No endpoint at this path, or not for this method."""

    status = 404
    default_code = "not_found"

    def __init__(self, message: str, *, status: int = 404):
        super().__init__(message)
        self.status = status  # type: ignore[misc]  # 404 or 405, as the router found it


class InternalServerError(ServerError):
    """A fault of the server itself (a bug): logged with its traceback, answered without details."""

    status = 500
    type = "server_error"
    default_code = "internal_error"
