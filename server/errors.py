"""Errors the server answers with, each in OpenAI's shape ``{"error": {"message", "type", "param", "code"}}``.

Every message says what the client can change; none of them is raised by a server fault.
"""

from __future__ import annotations

from typing import Any, ClassVar

from blockrag.engine import BlockragError


class ServerError(BlockragError):
    """Base class of the errors a request gets as its HTTP answer."""

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
