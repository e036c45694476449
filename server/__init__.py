"""``blockrag serve``: an OpenAI-compatible server whose prompts are answered over cached passage blocks.

Any OpenAI client (the ``openai`` package, LlamaIndex's ``OpenAILike``, LangChain's ``ChatOpenAI``)
gets the passages it quotes served from the block store. Needs the ``serve`` extra
(``pip install "blockrag[serve]"``); the names below import it on first use, so that the
``blockrag`` command lists ``serve`` without it.
"""

from __future__ import annotations

import importlib
from typing import Any

from blockrag.errors import MissingExtraError

_EXPORTS = {
    "BlockragServer": ".app", "ServerSettings": ".app", "ServerThread": ".thread", "ServerStartError": "blockrag.errors",
    "ContextLengthError": "blockrag.errors", "InternalServerError": "blockrag.errors", "InvalidRequestError": "blockrag.errors",
    "ModelNotServedError": "blockrag.errors", "QueueFullError": "blockrag.errors", "ServerError": "blockrag.errors",
    "UnknownBlockError": "blockrag.errors",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    try:
        module = importlib.import_module(_EXPORTS[name], __name__)
    except ImportError as exc:
        raise MissingExtraError("the server", "serve", exc) from exc
    return getattr(module, name)
