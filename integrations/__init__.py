"""Framework integrations: LlamaIndex (``blockrag.integrations.llamaindex``) and LangChain (``...langchain``).

Importing this package never imports a framework; each adapter module needs its extra installed.
The framework-free parts (content matching, running prompts) live in :mod:`.matching` and :mod:`.runner`.
"""

from blockrag.engine import BlockragError

from .matching import Passage, PassageIndex
from .runner import Completion, GenerationOptions, GenerationTimeoutError, PromptRunner, ReuseReport, Usage

EXTRAS = {"llama-index": "LlamaIndex", "langchain": "LangChain"}


class MissingExtraError(BlockragError, ImportError):
    """An adapter's framework is not installed."""

    def __init__(self, extra: str, cause: ImportError):
        super().__init__(f"the {EXTRAS[extra]} integration needs its framework ({cause.name or cause}); "
                         f'install it with `pip install "blockrag[{extra}]"`.')


__all__ = ["Completion", "GenerationOptions", "GenerationTimeoutError", "MissingExtraError", "Passage",
           "PassageIndex", "PromptRunner", "ReuseReport", "Usage"]
