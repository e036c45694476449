"""Framework integrations: LlamaIndex (``blockrag.integrations.llamaindex``) and LangChain (``...langchain``).

Importing this package never imports a framework; each adapter module needs its extra installed.
The framework-free parts (content matching, running prompts) live in :mod:`.matching` and :mod:`.runner`.
"""

from blockrag.errors import GenerationTimeoutError, MissingExtraError

from .matching import Passage, PassageIndex
from .runner import Completion, GenerationOptions, PromptRunner, ReuseReport, Usage

__all__ = ["Completion", "GenerationOptions", "GenerationTimeoutError", "MissingExtraError", "Passage",
           "PassageIndex", "PromptRunner", "ReuseReport", "Usage"]
