"""The retriever on the real models: SmolLM2 for the KV, all-MiniLM-L6-v2 for embeddings, the bundled corpus."""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from blockrag.cli import main as cli_main
from blockrag.engine import BlockEngine
from blockrag.kvstore import EntryStore, open_store
from blockrag.retriever import (Document, DocumentFormatError, Embedder, Index, IndexConfig, IndexMismatchError,
                                IndexNotFoundError, Node, NodeNotFoundError, Retriever, bundled_corpus,
                                bundled_questions, ingest, load_documents, node_id, split_text)
from blockrag.retriever.embedding import native_bf16, resolve_embedding_dtype

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def engine() -> BlockEngine:
    return BlockEngine.from_pretrained("smollm2-135m")


@pytest.fixture(scope="module")
def embedder() -> Embedder:
    return Embedder()


@pytest.fixture(scope="module")
def built(tmp_path_factory, engine, embedder):
    """The bundled corpus ingested once; tests that change an index work on a copy."""
    folder = tmp_path_factory.mktemp("index")
    report = ingest(bundled_corpus(), folder, engine=engine, embedder=embedder, progress=False)
    return folder, report


@pytest.fixture
def model_calls(engine, embedder):
    """Counts forward passes of the LLM and of the embedding model while a test runs."""
    calls = {"llm": 0, "embedder": 0}
    hooks = [engine.model.get_input_embeddings().register_forward_pre_hook(
                 lambda *_: calls.__setitem__("llm", calls["llm"] + 1)),
             embedder.model.register_forward_pre_hook(
                 lambda *_: calls.__setitem__("embedder", calls["embedder"] + 1))]
    yield calls
    for hook in hooks:
        hook.remove()


def _copy(built, tmp_path):
    folder = tmp_path / "index"
    shutil.copytree(built[0], folder)
    return folder


def test_split_text_packs_whole_sentences_within_the_budget(engine):
    sentences = [f"Sentence number {i} tells of the {i}th lighthouse on the coast of Varn." for i in range(12)]
    text = "# Lighthouses\n\n" + " ".join(sentences[:6]) + "\n\n" + " ".join(sentences[6:])
    passages = split_text(text, engine.tokenizer, max_tokens=40)
    count = lambda s: len(engine.tokenizer(s, add_special_tokens=False)["input_ids"])  # noqa: E731
    assert len(passages) > 3
    assert passages[0].startswith("# Lighthouses\n\nSentence number 0")  # a heading opens a passage, never ends one
    for p in passages:
        assert p.endswith(".")  # cut at sentence ends only
        assert count(p) <= 40 + 2  # sentence counts are summed; each join may shift the total by a token
    assert " ".join(passages).split() == text.split()

    long_sentence = " ".join(["granite"] * 120)
    pieces = split_text(long_sentence, engine.tokenizer, max_tokens=30)
    assert len(pieces) > 1 and all(count(p) <= 30 for p in pieces)
    assert " ".join(pieces).split() == long_sentence.split()


def test_node_ids_are_stable_and_distinct():
    assert node_id("doc", 0, "text") == node_id("doc", 0, "text")
    assert len({node_id("doc", 0, "text"), node_id("doc", 1, "text"), node_id("other", 0, "text"),
                node_id("doc", 0, "text!")}) == 4
    assert 0 <= int(node_id("doc", 0, "text"), 16) < 2 ** 63  # a FAISS int64 ID


def test_load_documents_reads_text_markdown_and_jsonl(tmp_path):
    (tmp_path / "docs" / "sub").mkdir(parents=True)
    (tmp_path / "docs" / "a.md").write_text("# Alpha\n\nAlpha text.")
    (tmp_path / "docs" / "sub" / "b.txt").write_text("Beta text.")
    (tmp_path / "docs" / "ignored.csv").write_text("x")
    rows = [{"id": "c1", "text": "Gamma.", "metadata": {"year": 1911}}, {"text": "Delta."}]
    (tmp_path / "more.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    docs = load_documents([tmp_path / "docs", tmp_path / "more.jsonl"])
    assert [(d.id, d.text) for d in docs] == [("a.md", "# Alpha\n\nAlpha text."), ("sub/b.txt", "Beta text."),
                                               ("c1", "Gamma."), ("more.jsonl:2", "Delta.")]
    assert docs[0].metadata["title"] == "Alpha" and docs[2].metadata == {"year": 1911}

    (tmp_path / "bad.jsonl").write_text('{"id": "x", "text": "fine"}\n{"id": "y"}\n')
    with pytest.raises(DocumentFormatError, match="bad.jsonl:2"):
        load_documents([tmp_path / "bad.jsonl"])
    with pytest.raises(DocumentFormatError, match="ingests"):
        load_documents([tmp_path / "docs" / "ignored.csv"])


def test_first_ingestion_encodes_and_embeds_every_passage(built):
    folder, report = built
    with Index.open(folder) as index:
        assert report.passages == len(index) == index.vector_count
        assert report.added == report.encoded == report.passages > len(bundled_corpus())  # one document has two
        assert report.removed == 0
        assert report.encoded_tokens == sum(n.tokens for d in index.document_ids() for n in index.document_nodes(d))


def test_retrieval_returns_the_passage_that_answers(built, embedder):
    with Index.open(built[0]) as index:
        assert Retriever(index).embedder.dtype == torch.float32  # queries: exact rankings, nothing to save
        retriever = Retriever(index, embedder)
        for sample in bundled_questions():
            hits = retriever.retrieve(sample.question, top_k=3)
            assert len(hits) == 3 and hits[0].score >= hits[1].score >= hits[2].score
            assert [h.node for h in hits] == index.nodes([h.id for h in hits])  # the index's own passages
            best = hits[0].node
            assert best.doc_id == sample.document, sample.question
            assert sample.answer in best.text, sample.question
            assert best.metadata["title"] and best.metadata["source"].endswith(f"{sample.document}.md")


def test_an_index_is_read_from_several_threads_at_once(built, embedder):
    from concurrent.futures import ThreadPoolExecutor

    questions = [sample.question for sample in bundled_questions()] * 4
    with Index.open(built[0]) as index:  # opened here, read from the framework threads below
        retriever = Retriever(index, embedder)
        alone = [[(h.id, h.text) for h in retriever.retrieve(q, top_k=3)] for q in questions]
        with ThreadPoolExecutor(4) as pool:
            together = list(pool.map(lambda q: [(h.id, h.text) for h in retriever.retrieve(q, top_k=3)], questions))
    assert together == alone


def test_embeddings_are_unit_vectors_and_bf16_ranks_as_fp32_does(embedder):
    assert embedder.dtype == resolve_embedding_dtype("auto", torch.device("cpu"))
    assert embedder.dtype == (torch.bfloat16 if native_bf16(torch.device("cpu")) else torch.float32)
    texts = [d.text for d in bundled_corpus()]
    questions = [s.question for s in bundled_questions()]
    vectors = {}
    for dtype in ("float32", "bfloat16"):
        model = Embedder(dtype=dtype)
        assert model.dtype == getattr(torch, dtype)
        vectors[dtype] = model.embed(texts), model.embed(questions)
        for v in vectors[dtype]:
            assert v.dtype == np.float32
            np.testing.assert_allclose(np.linalg.norm(v, axis=1), 1, atol=1e-6)  # normalised in fp32
    (p32, q32), (p16, q16) = vectors["float32"], vectors["bfloat16"]
    assert (p32 * p16).sum(1).min() > 0.99  # 8 significant bits; on 1,000 NQ documents the least was 0.996
    assert ((q32 @ p32.T).argmax(1) == (q16 @ p16.T).argmax(1)).all()
    with pytest.raises(ValueError, match="embedding dtype"):
        Embedder(dtype="int8")  # type: ignore[arg-type]


def test_kv_of_every_passage_is_stored_and_equals_the_engines(built, engine):
    with Index.open(built[0]) as index:
        nodes = [n for d in index.document_ids() for n in index.document_nodes(d)]
        stored = index.kv.get_many([n.kv_key for n in nodes])
        assert all(b is not None for b in stored)
        fresh = engine.encode([n.text for n in nodes])
    for node, s, f in zip(nodes, stored, fresh):
        assert torch.equal(s.token_ids, f.token_ids) and len(s) == node.tokens
        assert (s.start, s.context) == (f.start, f.context)
        # The store keeps bf16 (8 significant bits: rounding moves a value by at most 2^-8 of it), and the
        # passages were batched differently at ingestion (fp32 sums then differ by ~1e-5). One bf16 unit
        # (2^-7) plus 1e-4 covers both; another passage's KV would be off by O(1).
        torch.testing.assert_close(s.keys, f.keys, rtol=2 ** -7, atol=1e-4)
        torch.testing.assert_close(s.values, f.values, rtol=2 ** -7, atol=1e-4)


def test_second_run_does_no_model_work(built, engine, embedder, model_calls, monkeypatch):
    def refuse(*_):
        raise AssertionError("the store was written to")

    monkeypatch.setattr(EntryStore, "put", refuse)
    report = ingest(bundled_corpus(), built[0], engine=engine, embedder=embedder, progress=False)
    assert not report.model_work and report.removed == 0 and report.passages == built[1].passages
    assert model_calls == {"llm": 0, "embedder": 0}


def test_persistence_round_trip_in_a_new_process(built, engine, embedder, tmp_path):
    queries = embedder.embed([s.question for s in bundled_questions()])
    np.save(tmp_path / "queries.npy", queries)  # the embedder is not what persists: the child only searches
    with Index.open(built[0]) as index:
        here = index.search(queries, top_k=4)
        nodes = {i: index.node(i) for hits in here for i, _ in hits}
    script = textwrap.dedent(f"""
        import json, sys
        import numpy as np
        from blockrag.retriever import Index
        with Index.open({str(built[0])!r}) as index:
            hits = index.search(np.load({str(tmp_path / "queries.npy")!r}), top_k=4)
            nodes = {{i: index.node(i) for h in hits for i, _ in h}}
            blocks = dict(zip(nodes, index.kv.get_many([n.kv_key for n in nodes.values()])))
            out = {{"hits": hits, "texts": {{i: n.text for i, n in nodes.items()}},
                    "block_tokens": {{i: b.token_ids.tolist() for i, b in blocks.items()}}}}
        json.dump(out, sys.stdout)
    """)
    out = json.loads(subprocess.run([sys.executable, "-c", script], check=True, capture_output=True, text=True).stdout)
    assert [[i for i, _ in h] for h in out["hits"]] == [[i for i, _ in h] for h in here]
    # The same vectors searched exactly: the scores are the same inner products.
    assert [[s for _, s in h] for h in out["hits"]] == [[s for _, s in h] for h in here]
    assert out["texts"] == {i: n.text for i, n in nodes.items()}
    assert out["block_tokens"] == {i: engine.passage_token_ids(n.text) for i, n in nodes.items()}


def test_update_replaces_changed_passages_and_delete_removes_everything(built, tmp_path, engine, embedder,
                                                                        model_calls):
    folder = _copy(built, tmp_path)
    tesk = next(d for d in bundled_corpus() if d.id == "isle-of-tesk")
    changed = Document(tesk.id, tesk.text.replace("wind farm of eight turbines", "wind farm of twelve turbines"),
                       {**tesk.metadata, "edition": 2})
    with Index.open(folder) as index:
        before = index.document_nodes(tesk.id)
        kept, old = before
        count = len(index)
    report = ingest([changed], folder, engine=engine, embedder=embedder, progress=False)
    assert (report.added, report.removed, report.encoded, report.passages) == (1, 1, 1, 2)
    assert model_calls == {"llm": 1, "embedder": 1}  # the one new passage, nothing else
    question = "How many turbines does the island's wind farm have?"
    with Index.open(folder) as index:
        assert len(index) == index.vector_count == count
        with pytest.raises(NodeNotFoundError):
            index.node(old.id)
        assert not index.kv.contains(old.kv_key)
        first, new = index.document_nodes(tesk.id)
        assert first == Node(**{**kept.__dict__, "metadata": changed.metadata})  # untouched, new metadata
        assert "twelve" in new.text and index.kv.contains(new.kv_key)
        assert Retriever(index, embedder).retrieve(question, top_k=1)[0].id == new.id

        gone = index.document_nodes("marrowbridge")
        assert index.delete_document("marrowbridge") == len(gone) == 1
        assert "marrowbridge" not in index.document_ids()
        assert index.document_nodes("marrowbridge") == []
        assert not any(index.kv.contains(n.kv_key) for n in gone)
        assert len(index) == index.vector_count == count - 1
        hits = Retriever(index, embedder).retrieve("Which month is the Marrowbridge cheese fair held in?", top_k=20)
        assert gone[0].id not in {h.id for h in hits} and len(hits) == count - 1
    with Index.open(folder) as index:  # both changes persisted
        assert index.vector_count == count - 1 and index.document_nodes(tesk.id)[1] == new


def test_a_failed_kv_write_stops_ingestion_without_listing_passages_it_cannot_serve(built, tmp_path, engine,
                                                                                    embedder):
    class Full(Exception):
        pass

    with open_store(tmp_path / "kv") as store:
        put, written = store.put, []

        def failing_put(key, block):  # runs on ingestion's writer thread
            if len(written) == 6:
                raise Full
            put(key, block)
            written.append(key)

        store.put = failing_put
        with pytest.raises(Full):
            ingest(bundled_corpus(), tmp_path / "index", engine=engine, embedder=embedder, batch_passages=4,
                   kv_store=store, progress=False)
        with Index.open(tmp_path / "index", kv_store=store) as index:
            listed = [n for d in index.document_ids() for n in index.document_nodes(d)]
            assert len(listed) == len(index) == index.vector_count == 4  # the first batch; the second failed
            assert all(store.contains(n.kv_key) for n in listed)


def test_kv_writes_run_on_one_openmp_thread_and_leave_the_callers_threads_alone(tmp_path, engine, embedder):
    from threadpoolctl import threadpool_info

    def openmp_threads() -> set[int]:
        return {pool["num_threads"] for pool in threadpool_info() if pool["user_api"] == "openmp"}

    # As after a caller set torch's threads (a CLI's --threads): a new thread then takes that count on its first
    # torch call, which must not undo the writer's limit.
    torch.set_num_threads(torch.get_num_threads())
    caller = openmp_threads()
    if caller == {1}:
        pytest.skip("OpenMP runs one thread here already: the writer's limit cannot be told apart")
    with open_store(tmp_path / "kv") as store:
        put, seen = store.put, []

        def recording_put(key, block):  # runs on ingestion's writer thread
            seen.append(openmp_threads())
            put(key, block)

        store.put = recording_put
        ingest(bundled_corpus()[:2], tmp_path / "index", engine=engine, embedder=embedder, kv_store=store,
               progress=False)
    assert seen and all(threads == {1} for threads in seen)
    assert openmp_threads() == caller  # the forward keeps its threads


def test_a_stopped_run_keeps_its_batches_and_the_next_run_resumes(built, tmp_path, engine, embedder, model_calls,
                                                                  caplog):
    class Stopped(Exception):
        pass

    class StopsAtSecondBatch:
        name, dimension, calls = embedder.name, embedder.dimension, 0

        def embed(self, texts):
            self.calls += 1
            if self.calls == 2:
                raise Stopped
            return embedder.embed(texts)

    folder = tmp_path / "index"
    with open_store(built[0] / "kv") as store:  # every passage's KV is there already
        with pytest.raises(Stopped):
            ingest(bundled_corpus(), folder, engine=engine, embedder=StopsAtSecondBatch(), batch_passages=4,
                   kv_store=store, progress=False)
        with Index.open(folder, kv_store=store) as index:
            assert len(index) == index.vector_count == 4
        report = ingest(bundled_corpus(), folder, engine=engine, embedder=embedder, kv_store=store, progress=False)
    assert (report.added, report.encoded, report.passages) == (built[1].passages - 4, 0, built[1].passages)
    assert model_calls["llm"] == 0

    # A process killed before saving FAISS: the document store is the truth, FAISS is rebuilt from it.
    (folder / "vectors.json").write_text('{"generation": -1}')
    with caplog.at_level(logging.WARNING), open_store(built[0] / "kv") as store, \
            Index.open(folder, kv_store=store) as index:
        assert index.vector_count == len(index) == built[1].passages
        assert "rebuilding" in caplog.text
        sample = bundled_questions()[0]
        assert Retriever(index, embedder).retrieve(sample.question)[0].node.doc_id == sample.document


def test_hnsw_index_deletes_by_rebuilding(tmp_path):
    config = IndexConfig(model="m", fingerprint="f", system_prompt=None, block_mode="prefix", embedding_model="e",
                         dimension=8, vector_index="hnsw")
    rng = np.random.default_rng(0)
    vectors = rng.normal(size=(50, 8)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    nodes = [Node(node_id("d", i, f"t{i}"), "d", i, f"t{i}", 1, f"f-naive-{i}") for i in range(50)]
    with Index.create(tmp_path / "ix", config) as index:
        index.set_documents([("d", {})])
        index.add(nodes, vectors)
        assert index.search(vectors[7:8], 1)[0][0][0] == nodes[7].id
        index.remove_nodes([nodes[7].id])
        assert index.vector_count == 49 and nodes[7].id not in {i for i, _ in index.search(vectors[7:8], 49)[0]}
    with Index.open(tmp_path / "ix") as index:
        assert index.vector_count == 49 and index.search(vectors[8:9], 1)[0][0][0] == nodes[8].id
    with pytest.raises(IndexMismatchError, match="already holds"):
        Index.create(tmp_path / "ix", config)
    with pytest.raises(IndexNotFoundError, match="blockrag ingest"):
        Index.open(tmp_path / "nothing")


def test_ingest_refuses_an_index_built_differently(built, engine, embedder):
    other = BlockEngine(engine.loaded, system_prompt="You answer in French.")
    with pytest.raises(IndexMismatchError, match="system_prompt"):
        ingest(bundled_corpus()[:1], built[0], engine=other, embedder=embedder, progress=False)
    with pytest.raises(IndexMismatchError, match="chunk_tokens"):
        ingest(bundled_corpus()[:1], built[0], engine=engine, embedder=embedder, chunk_tokens=100, progress=False)
    with pytest.raises(DocumentFormatError, match="twice"):
        ingest([Document("a", "x"), Document("a", "y")], built[0], engine=engine, progress=False)


def test_cli_ingest_and_query(tmp_path, capsys):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "kettle.md").write_text("# Kettle Cove\n\nKettle Cove has a blue pier built in 1903.")
    (tmp_path / "docs" / "notes.jsonl").write_text(json.dumps({"id": "owl", "text": "The owl of Brenn is grey."}))
    assert cli_main(["ingest", str(tmp_path / "docs"), "--index", str(tmp_path / "ix")]) == 0
    assert "2 documents, 2 passages: 2 added" in capsys.readouterr().out
    assert cli_main(["query", str(tmp_path / "ix"), "What colour is the owl of Brenn?", "--top-k", "1",
                     "--max-new-tokens", "4"]) == 0
    out = capsys.readouterr().out
    assert "Passages used:\n  1. [" in out and "owl #0" in out
    tokens = int(out.split("tokens prefilled, ")[1].split()[0])
    assert tokens > 0 and "served from the KV store" in out
