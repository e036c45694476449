"""LlamaIndex end to end on the bundled SmolLM2: ingestion into FAISS and a disk KV store, stock and
block-aware query engines (sync, streaming, async), and the LLM's own API."""

from __future__ import annotations

import asyncio

import faiss
import pytest

pytest.importorskip("llama_index.core", reason='needs pip install "blockrag[llama-index]"')

from llama_index.core import Document, StorageContext, VectorStoreIndex  # noqa: E402
from llama_index.core.callbacks import CallbackManager, TokenCountingHandler  # noqa: E402
from llama_index.core.ingestion import IngestionPipeline  # noqa: E402
from llama_index.core.instrumentation import get_dispatcher  # noqa: E402
from llama_index.core.llms import ChatMessage  # noqa: E402
from llama_index.core.node_parser import SentenceSplitter  # noqa: E402
from llama_index.core.schema import MetadataMode  # noqa: E402
from llama_index.vector_stores.faiss import FaissVectorStore  # noqa: E402

from llamaindex_events import ChatEnds  # noqa: E402

from blockrag.engine import BlockEngine  # noqa: E402
from blockrag.integrations import Passage, PassageIndex  # noqa: E402
from blockrag.integrations.llamaindex import (BLOCK_KEY_METADATA, BlockAttentionLLM, BlockKVPrecomputer,  # noqa: E402
                                              SentenceTransformerEmbedding, block_query_engine)
from blockrag.kvstore import open_store  # noqa: E402
from blockrag.retriever import bundled_corpus, bundled_questions  # noqa: E402

pytestmark = pytest.mark.slow
QUESTIONS = {q.document: q for q in bundled_questions()}
LARKSPUR, MARROWBRIDGE = QUESTIONS["larkspur-observatory"], QUESTIONS["marrowbridge"]


@pytest.fixture(scope="module")
def engine(tmp_path_factory) -> BlockEngine:
    return BlockEngine.from_pretrained(store=open_store(tmp_path_factory.mktemp("kv")))


@pytest.fixture(scope="module")
def llm(engine) -> BlockAttentionLLM:
    return BlockAttentionLLM(engine=engine, max_tokens=24)


@pytest.fixture(scope="module")
def embed_model() -> SentenceTransformerEmbedding:
    return SentenceTransformerEmbedding()


@pytest.fixture(scope="module")
def nodes(llm, embed_model):
    documents = [Document(text=d.text, doc_id=d.id, metadata=d.metadata) for d in bundled_corpus()]
    pipeline = IngestionPipeline(transformations=[SentenceSplitter(chunk_size=256, chunk_overlap=0),
                                                  BlockKVPrecomputer(llm, batch_size=8), embed_model])
    return pipeline.run(documents=documents)


@pytest.fixture(scope="module")
def index(nodes, embed_model) -> VectorStoreIndex:
    """Over FAISS (the default vector store of blockrag's own index), inner product on unit vectors."""
    store = FaissVectorStore(faiss_index=faiss.IndexFlatIP(len(nodes[0].embedding)))
    return VectorStoreIndex(nodes, embed_model=embed_model,
                            storage_context=StorageContext.from_defaults(vector_store=store))


@pytest.fixture
def chat_ends():
    handler = ChatEnds(responses=[])
    dispatcher = get_dispatcher()
    dispatcher.add_event_handler(handler)
    yield handler.responses
    dispatcher.event_handlers.remove(handler)


def source_docs(response) -> list[str]:
    return [n.node.ref_doc_id for n in response.source_nodes]


def test_ingestion_stores_every_nodes_block_and_keeps_the_key_out_of_prompts(engine, llm, nodes):
    assert len(nodes) >= len(bundled_corpus())
    for node in nodes:
        key = node.metadata[BLOCK_KEY_METADATA]
        llm_text = node.get_content(metadata_mode=MetadataMode.LLM)
        assert key not in llm_text and key not in node.get_content(metadata_mode=MetadataMode.EMBED)
        block = engine.store.get(key)  # the body alone: found with or without the metadata header
        body = node.get_content(metadata_mode=MetadataMode.NONE)
        assert body != llm_text and block.token_ids.tolist() == engine.passage_token_ids(body.strip(),
                                                                                          exact_text=True)
    assert len(llm.passages) == len({n.get_content(metadata_mode=MetadataMode.NONE).strip() for n in nodes})


def test_stock_query_engine_answers_from_cached_blocks(index, llm, engine, chat_ends):
    response = index.as_query_engine(llm=llm, similarity_top_k=3).query(LARKSPUR.question)
    assert source_docs(response)[0] == LARKSPUR.document
    assert LARKSPUR.answer in response.response
    raw = chat_ends[-1].raw
    served = [b["id"] for b in raw["blocks"]]
    assert served == [n.node.node_id for n in response.source_nodes]  # found by content, in prompt order
    # Every passage is served by the block ingestion stored for its exact text and the blank line after it: whole
    # where the prompt has that blank line after the passage too, and the last one, which the compact prompt follows
    # with the template's rule instead, by the block's first tokens (the passage alone).
    stored = [len(engine.store.get(n.node.metadata[BLOCK_KEY_METADATA])) for n in response.source_nodes]
    served_tokens = [*stored[:-1], stored[-1] - len(engine.separator_ids)]
    assert [b["tokens"] for b in raw["blocks"]] == served_tokens
    assert raw["usage"]["prompt_tokens_details"]["cached_tokens"] == sum(served_tokens)


def test_default_vector_store_works_too(nodes, embed_model, llm):
    index = VectorStoreIndex(nodes, embed_model=embed_model)
    response = index.as_query_engine(llm=llm, similarity_top_k=2).query(MARROWBRIDGE.question)
    assert source_docs(response)[0] == MARROWBRIDGE.document and MARROWBRIDGE.answer in response.response


def test_block_query_engine_passes_node_ids_and_reports_reuse(index, llm):
    engine = block_query_engine(index, llm, similarity_top_k=3)
    first = engine.query(MARROWBRIDGE.question)
    second = engine.query(MARROWBRIDGE.question)
    ids = [n.node.node_id for n in first.source_nodes]  # best first, as retrieved
    assert first.source_nodes[0].score >= first.source_nodes[-1].score and MARROWBRIDGE.answer in first.response
    placed = ids[::-1]  # the prompt puts the best node last, next to the question
    assert [b.id for b in first.metadata["blockrag"].completions[0].blocks] == placed  # every passage is a block
    assert first.metadata["blockrag"].reused_ids == second.metadata["blockrag"].reused_ids == placed
    best_first = block_query_engine(index, llm, similarity_top_k=3, passage_order="best-first").query(
        MARROWBRIDGE.question)
    assert best_first.metadata["blockrag"].reused_ids == [n.node.node_id for n in best_first.source_nodes] == ids
    with pytest.raises(ValueError, match="order must be one of"):
        block_query_engine(index, llm, passage_order="best-middle")
    usage = second.metadata["blockrag"].usage
    assert usage.cached_tokens == sum(b.tokens for b in second.metadata["blockrag"].completions[0].blocks)
    assert first.metadata[ids[0]] == first.source_nodes[0].node.metadata  # LlamaIndex's own metadata is kept


def test_streaming_gives_the_same_answer_and_report(index, llm):
    block_query_engine(index, llm, similarity_top_k=3).query(LARKSPUR.question)  # stores any block still missing
    plain = block_query_engine(index, llm, similarity_top_k=3).query(LARKSPUR.question)
    streaming = block_query_engine(index, llm, similarity_top_k=3, streaming=True).query(LARKSPUR.question)
    assert "".join(streaming.response_gen) == plain.response
    report = streaming.metadata["blockrag"]
    assert report.reused_ids == plain.metadata["blockrag"].reused_ids == [n.node.node_id
                                                                         for n in plain.source_nodes][::-1]
    assert report.usage == plain.metadata["blockrag"].usage


@pytest.mark.parametrize("mode", ["refine", "tree_summarize"])
def test_other_response_modes(index, llm, mode):
    response = block_query_engine(index, llm, similarity_top_k=2, response_mode=mode).query(LARKSPUR.question)
    report = response.metadata["blockrag"]
    assert response.response.strip() and report.completions
    served = {b.id for c in report.completions for b in c.blocks}
    assert served <= {n.node.node_id for n in response.source_nodes} and served


def test_async_query_engines_give_the_sync_answers(index, llm):
    # Synchronously first: the store then holds every block (in its dtype) that the async runs will read.
    expected = index.as_query_engine(llm=llm, similarity_top_k=3).query(LARKSPUR.question).response
    expected_block = block_query_engine(index, llm, similarity_top_k=3).query(LARKSPUR.question).response

    async def main():
        stock = await index.as_query_engine(llm=llm, similarity_top_k=3).aquery(LARKSPUR.question)
        block = await block_query_engine(index, llm, similarity_top_k=3).aquery(LARKSPUR.question)
        streamed = await block_query_engine(index, llm, similarity_top_k=3, streaming=True).aquery(
            LARKSPUR.question)
        return stock, block, "".join([t async for t in streamed.async_response_gen()])

    stock, block, streamed = asyncio.run(main())
    assert stock.response == expected and block.response == streamed == expected_block
    assert block.metadata["blockrag"].reused_ids == [n.node.node_id for n in block.source_nodes][::-1]


def test_llm_api_usage_and_callbacks(engine):
    counter = TokenCountingHandler(tokenizer=lambda text: engine.tokenizer.encode(text))
    llm = BlockAttentionLLM(engine=engine, max_tokens=12, callback_manager=CallbackManager([counter]))
    completion = llm.complete("Name a colour.")
    usage = completion.raw["usage"]
    assert usage["completion_tokens"] <= 12 and usage["prompt_tokens"] > 0
    assert counter.llm_token_counts[-1].prompt_token_count == usage["prompt_tokens"]  # read from raw["usage"]
    chat = llm.chat([ChatMessage(role="user", content="Name a colour.")])
    assert chat.message.content == completion.text  # complete() wraps the prompt in the same chat turn
    chunks = list(llm.stream_chat([ChatMessage(role="user", content="Name a colour.")]))
    assert "".join(c.delta for c in chunks) == chunks[-1].message.content == completion.text
    assert chunks[-1].raw["usage"] == usage and all(c.raw is None for c in chunks[:-1])
    with pytest.raises(TypeError, match="unexpected argument"):
        llm.complete("hi", tools=[])


def test_hints_are_used_only_where_their_text_is(llm, nodes):
    target, other = nodes[0], nodes[-1]
    text = target.get_content(metadata_mode=MetadataMode.LLM)
    prompt = llm.messages_to_prompt([ChatMessage(role="user", content=f"{text}\n\nWhat is this about?")])
    fresh = BlockAttentionLLM(engine=llm.engine, max_tokens=8)  # knows no passages: only hints can serve blocks
    none = fresh.complete(prompt, formatted=True)
    hinted = fresh.with_passages([target]).complete(prompt, formatted=True)
    stale = fresh.with_passages([other]).complete(prompt, formatted=True)
    knows_other = BlockAttentionLLM(engine=llm.engine, max_tokens=8, passages=PassageIndex([Passage.of(
        other.get_content(metadata_mode=MetadataMode.LLM), other.node_id)]))
    stale_id = knows_other.complete(prompt, formatted=True, node_ids=[other.node_id, "no-such-node"])
    assert none.raw["blocks"] == [] and stale.raw["blocks"] == [] and stale_id.raw["blocks"] == []
    assert stale.text == stale_id.text == none.text and stale.raw["usage"] == stale_id.raw["usage"] == none.raw["usage"]
    assert hinted.raw["blocks"] == [{"id": target.node_id, "tokens": hinted.raw["usage"]["prompt_tokens_details"][
        "cached_tokens"]}]


def test_passages_can_be_added_after_reloading_an_index(index, engine):
    llm = BlockAttentionLLM(engine=engine, max_tokens=16)
    llm.add_nodes(list(index.docstore.docs.values()))
    assert len(llm.passages) == len(index.docstore.docs)
    response = block_query_engine(index, llm, similarity_top_k=3).query(LARKSPUR.question)
    assert response.metadata["blockrag"].usage.cached_tokens > 0


def test_async_llm_calls_leave_the_event_loop_free(llm, loop_gate):
    run = loop_gate(llm._runner)

    async def collect(stream):
        return [c async for c in await stream]

    async def main():
        return (await run(llm.acomplete("Say yes.")),
                await run(collect(llm.astream_chat([ChatMessage(role="user", content="Say yes.")]))))

    done, chunks = asyncio.run(main())
    assert chunks[-1].message.content == done.text and chunks[-1].raw["usage"] == done.raw["usage"]


def test_a_query_engine_decodes_long_prompts_with_recycled_attention_under_auto(index, llm, monkeypatch):
    """decode="auto" (the default) in a LlamaIndex query engine: over a prompt at least AUTO_RECYCLE_FROM tokens long,
    lowered here so that three passages make a long prompt, the LLM decodes with Recycled Attention."""
    import blockrag.engine.decoding as decoding

    plain = block_query_engine(index, llm, similarity_top_k=3).query(MARROWBRIDGE.question)
    assert plain.metadata["blockrag"].completions[0].decode == "full"
    monkeypatch.setattr(decoding, "AUTO_RECYCLE_FROM", 256)
    long = block_query_engine(index, llm, similarity_top_k=3).query(MARROWBRIDGE.question)
    done = long.metadata["blockrag"].completions[0]
    assert done.usage.prompt_tokens >= 256 and done.decode == "recycled" and done.full_steps >= 1


def test_the_llm_decodes_a_long_prompt_with_recycled_attention_by_default(llm):
    """On the bundled model, an 8K-token prompt (past AUTO_RECYCLE_FROM, its real value) decodes with Recycled
    Attention."""
    from blockrag.engine.decoding import AUTO_RECYCLE_FROM

    texts = [d.text for d in bundled_corpus()]
    prompt, i = "", 0
    while len(llm.engine.tokenizer(prompt)["input_ids"]) < 7900:  # the model's context is 8,192 tokens
        prompt += f"Note {i}: {texts[i % len(texts)]}\n\n"
        i += 1
    raw = llm.complete(prompt + "Which note mentions a lighthouse?", max_tokens=6).raw
    assert raw["usage"]["prompt_tokens"] >= 7900 > AUTO_RECYCLE_FROM
    assert raw["decode"]["mode"] == "recycled"
