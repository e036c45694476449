"""LangChain on the bundled SmolLM2: the standard chat model suites, and RAG chains over blockrag's index
with documents as content blocks and as plain text."""

from __future__ import annotations

import asyncio

import pytest

pytest.importorskip("langchain_core", reason='needs pip install "blockrag[langchain]"')
pytest.importorskip("langchain_tests", reason="needs langchain-tests (the dev extra)")

from langchain_core.callbacks import get_usage_metadata_callback  # noqa: E402
from langchain_core.messages import AIMessage, HumanMessage, SystemMessage  # noqa: E402
from langchain_core.output_parsers import StrOutputParser  # noqa: E402
from langchain_core.prompts import ChatPromptTemplate  # noqa: E402
from langchain_core.runnables import RunnablePassthrough  # noqa: E402
from langchain_tests.integration_tests import ChatModelIntegrationTests  # noqa: E402
from langchain_tests.unit_tests import ChatModelUnitTests  # noqa: E402

from blockrag.engine import BlockEngine  # noqa: E402
from blockrag.integrations import GenerationTimeoutError, PassageIndex  # noqa: E402
from blockrag.integrations.langchain import (BlockAttentionRetriever, ChatBlockAttention, message_text,  # noqa: E402
                                             rag_chain)
from blockrag.kvstore import open_store  # noqa: E402
from blockrag.retriever import Index, Retriever, bundled_corpus, bundled_questions, ingest  # noqa: E402

pytestmark = pytest.mark.slow
QUESTIONS = {q.document: q for q in bundled_questions()}
PASSAGE = ("The glass-winged heron nests only in the salt marshes of the Orrin delta. Its eggs are pale green and "
           "hatch after 26 days.")
ENGINE: BlockEngine | None = None


@pytest.fixture(scope="module", autouse=True)
def engine(tmp_path_factory) -> BlockEngine:
    """One engine with a private disk store for every test here, the standard suites included."""
    global ENGINE
    ENGINE = BlockEngine.from_pretrained(store=open_store(tmp_path_factory.mktemp("kv")))
    yield ENGINE
    ENGINE = None


def with_passage(question: str = "What colour are the heron's eggs?") -> list[HumanMessage]:
    return [HumanMessage(content=[{"type": "text", "text": "Read this:"},
                                  {"type": "text-plain", "mime_type": "text/plain", "text": PASSAGE, "id": "heron"},
                                  {"type": "text", "text": question}])]


class TestChatBlockAttentionUnit(ChatModelUnitTests):
    @property
    def chat_model_class(self) -> type[ChatBlockAttention]:
        return ChatBlockAttention

    @property
    def chat_model_params(self) -> dict:
        return {"engine": ENGINE}

    @property
    def has_tool_calling(self) -> bool:
        return True

    @property
    def has_structured_output(self) -> bool:
        return True


@pytest.mark.anyio  # runs the suite's async tests (on asyncio, anyio's default backend)
class TestChatBlockAttentionIntegration(ChatModelIntegrationTests):
    @property
    def chat_model_class(self) -> type[ChatBlockAttention]:
        return ChatBlockAttention

    @property
    def chat_model_params(self) -> dict:
        return {"engine": ENGINE, "max_tokens": 48}  # room for a tool call or a small object

    @property
    def has_tool_calling(self) -> bool:
        return True

    @property
    def has_tool_choice(self) -> bool:
        return True

    @property
    def has_structured_output(self) -> bool:
        return True

    @property
    def supports_json_mode(self) -> bool:
        return True

    @property
    def supports_model_override(self) -> bool:
        return False  # one engine holds one model's weights and KV

    @pytest.mark.xfail(strict=True, reason="a wrong argument value: the 135M model fills answer_style with '' "
                                           "(the forced call itself parses)")
    def test_bind_runnables_as_tools(self, model) -> None:
        super().test_bind_runnables_as_tools(model)

    @pytest.mark.xfail(strict=True, reason="a choice, not a structure: under tool_choice='auto' the 135M model "
                                           "answers in text instead of calling (forced, its call always parses)")
    @pytest.mark.parametrize("model", [{}, {"output_version": "v1"}], indirect=True)  # the suite's own parameters
    def test_agent_loop(self, model) -> None:
        super().test_agent_loop(model)

    @property
    def supported_usage_metadata_details(self) -> dict:
        return {"invoke": ["cache_read_input"], "stream": ["cache_read_input"]}

    def invoke_with_cache_read_input(self, *, stream: bool = False) -> AIMessage:
        model = ChatBlockAttention(engine=ENGINE, max_tokens=8)
        model.invoke(with_passage())  # stores the passage's block
        if not stream:
            return model.invoke(with_passage())
        full = None
        for chunk in model.stream(with_passage()):
            full = chunk if full is None else full + chunk
        return full


@pytest.fixture(scope="module")
def index(tmp_path_factory, engine) -> Index:
    folder = tmp_path_factory.mktemp("index")
    ingest(bundled_corpus(), folder, engine=engine, progress=False)
    with Index.open(folder) as opened:
        yield opened


@pytest.fixture(scope="module")
def retriever(index) -> BlockAttentionRetriever:
    return BlockAttentionRetriever(Retriever(index), k=3)


@pytest.fixture(scope="module")
def chat(index) -> ChatBlockAttention:
    """Serving the index's store, knowing all its passages."""
    return ChatBlockAttention.from_index(index, max_tokens=24)


def test_message_text_sets_documents_off_by_blank_lines():
    text, passages = message_text(with_passage()[0])
    assert text == f"Read this:\n\n{PASSAGE}\n\nWhat colour are the heron's eggs?"
    assert [(p.id, p.text) for p in passages] == [("heron", PASSAGE)]
    assert message_text(HumanMessage(content=["a", {"type": "text", "text": "b"}])) == ("ab", [])
    with pytest.raises(ValueError, match="text-plain"):
        message_text(HumanMessage(content=[{"type": "image", "url": "https://example.com/x.png"}]))


def test_content_block_chain_answers_from_stored_blocks(chat, retriever):
    question = QUESTIONS["velloran-language"]
    out = rag_chain(retriever, chat).invoke(question.question)
    ids = [d.id for d in out["context"]]
    assert out["context"][0].metadata["doc_id"] == question.document and question.answer in out["answer"].content
    report = out["answer"].response_metadata["blockrag"]
    # Ingestion stored every passage; the chain's layout finds them all, placed best last by default.
    assert report["reused_ids"] == ids[::-1]
    first = rag_chain(retriever, chat, passage_order="best-first").invoke(question.question)
    assert first["answer"].response_metadata["blockrag"]["reused_ids"] == ids
    with pytest.raises(ValueError, match="order must be one of"):
        rag_chain(retriever, chat, passage_order="best-middle")
    assert out["answer"].usage_metadata["input_token_details"]["cache_read"] == sum(
        b["tokens"] for b in report["blocks"])


def test_stock_plain_text_chain_gets_the_blocks_by_content(chat, retriever):
    prompt = ChatPromptTemplate.from_messages([
        ("system", "Answer the question using the context. Answer briefly."),
        ("human", "Context:\n\n{context}\n\nQuestion: {question}")])
    chain = ({"context": retriever | (lambda docs: "\n\n".join(d.page_content for d in docs)),
              "question": RunnablePassthrough()} | prompt | chat | StrOutputParser())
    question = QUESTIONS["larkspur-observatory"]
    with get_usage_metadata_callback() as usage:
        answer = chain.invoke(question.question)
    assert question.answer in answer
    (counts,) = usage.usage_metadata.values()
    assert counts["input_token_details"]["cache_read"] > counts["input_tokens"] // 2  # three passages of ~150 tokens
    full = chat.invoke(prompt.invoke({"context": "\n\n".join(d.page_content for d in retriever.invoke(
        question.question)), "question": question.question}), mode="full")
    assert full.usage_metadata["input_token_details"]["cache_read"] == 0 and question.answer in full.content


def test_block_ids_are_used_only_where_their_text_is(index, chat, retriever):
    docs = retriever.invoke(QUESTIONS["marrowbridge"].question)
    other = next(d for d in retriever.invoke("lighthouse") if d.id not in {d.id for d in docs})
    messages = [SystemMessage("Answer briefly."),
                HumanMessage("\n\n".join(d.page_content for d in docs) + "\n\nWhen is the cheese fair?")]
    knows_nothing = ChatBlockAttention(engine=chat.engine, passages=PassageIndex(), max_tokens=8)
    none = knows_nothing.invoke(messages)
    stale = knows_nothing.invoke(messages, block_ids=[other.id, "no-such-node"])
    assert none.response_metadata["blockrag"]["blocks"] == []
    assert stale.content == none.content and stale.usage_metadata == none.usage_metadata
    knows_other = ChatBlockAttention(engine=chat.engine, passages=PassageIndex(chat.passages.get([other.id])),
                                     max_tokens=8)
    stale = knows_other.invoke(messages, block_ids=[other.id])
    assert stale.content == none.content and stale.usage_metadata == none.usage_metadata
    hinted = chat.invoke(messages, block_ids=[docs[0].id], max_tokens=8)
    assert hinted.response_metadata["blockrag"]["reused_ids"] == [d.id for d in docs]


def test_batch_and_timeout(engine):
    chat = ChatBlockAttention(engine=engine, max_tokens=6)
    first, second = chat.batch([with_passage(), with_passage("Where does the heron nest?")])
    assert first.content and second.content
    with pytest.raises(GenerationTimeoutError):
        ChatBlockAttention(engine=engine, max_tokens=50, timeout=1e-9).invoke("Count to twenty.")


def test_async_calls_leave_the_event_loop_free(engine, loop_gate):
    chat = ChatBlockAttention(engine=engine, max_tokens=6, passages=PassageIndex())
    run = loop_gate(chat._runner)

    async def collect(stream):
        return [c async for c in stream]

    async def main():
        return await run(chat.ainvoke(with_passage())), await run(collect(chat.astream(with_passage())))

    message, chunks = asyncio.run(main())
    assert "".join(c.content for c in chunks) == message.content
    assert chunks[-1].usage_metadata == message.usage_metadata and chunks[-1].chunk_position == "last"
    assert all(c.usage_metadata is None for c in chunks[:-1])


def test_a_chain_decodes_long_prompts_with_recycled_attention_under_auto(chat, retriever, monkeypatch):
    """decode="auto" (the default) in an LCEL chain: over a prompt at least AUTO_RECYCLE_FROM tokens long, lowered
    here so that the retrieved passages make a long prompt, the chat model decodes with Recycled Attention."""
    import blockrag.engine.decoding as decoding

    question = QUESTIONS["velloran-language"].question
    assert rag_chain(retriever, chat).invoke(question)["answer"].response_metadata["blockrag"]["decode"][
        "mode"] == "full"
    monkeypatch.setattr(decoding, "AUTO_RECYCLE_FROM", 256)
    out = rag_chain(retriever, chat).invoke(question)["answer"]
    assert out.usage_metadata["input_tokens"] >= 256
    assert out.response_metadata["blockrag"]["decode"]["mode"] == "recycled"
