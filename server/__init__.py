"""``blockrag serve``: an OpenAI-compatible server whose prompts are answered over cached passage blocks.

Any OpenAI client (the ``openai`` package, LlamaIndex's ``OpenAILike``, LangChain's ``ChatOpenAI``)
gets the passages it quotes served from the block store. Needs the ``serve`` extra
(``pip install "blockrag[serve]"``); the names below import it on first use, so that the
``blockrag`` command lists ``serve`` without it.
"""

from __future__ import annotations

import importlib
from typing import Any

from blockrag.engine import ExtraNotInstalledError

_EXPORTS = {
    "BlockragServer": ".app", "ServerSettings": ".app", "ServerThread": ".thread", "ServerStartError": ".thread",
    "ContextLengthError": ".errors", "InternalServerError": ".errors", "InvalidRequestError": ".errors",
    "ModelNotServedError": ".errors", "QueueFullError": ".errors", "ServerError": ".errors",
    "UnknownBlockError": ".errors",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    try:
        module = importlib.import_module(_EXPORTS[name], __name__)
    except ImportError as exc:
        raise ExtraNotInstalledError(f"the server needs {exc.name}; install it with "
                                     '`pip install "blockrag[serve]"`.') from exc
    return getattr(module, name)
