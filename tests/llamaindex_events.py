"""A LlamaIndex instrumentation handler shared by the tests that run query engines (needs the llama-index extra)."""

from __future__ import annotations

from llama_index.core.instrumentation.event_handlers import BaseEventHandler
from llama_index.core.instrumentation.events.llm import LLMChatEndEvent


class ChatEnds(BaseEventHandler):
    """Collects the LLM chat responses that LlamaIndex's instrumentation reports."""

    responses: list = []

    @classmethod
    def class_name(cls) -> str:
        return "ChatEnds"

    def handle(self, event, **kwargs) -> None:
        if isinstance(event, LLMChatEndEvent):
            self.responses.append(event.response)
