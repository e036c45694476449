"""`blockrag ingest` loads the LLM and the embedder only when a passage needs them."""

from __future__ import annotations

import importlib
import sqlite3

import pytest

from blockrag.cli import main as cli_main
from blockrag.engine import BlockEngine
from blockrag.kvstore import open_store
from blockrag.retriever import Index
from reliability_support import HashEmbedder, corpus

pytestmark = pytest.mark.reliability
ingest_module = importlib.import_module("blockrag.retriever.ingest")  # the package's `ingest` is the function


@pytest.fixture
def loads(monkeypatch, engine):
    """Counts model loads by ingestion: the tiny engine stands in for the bundled LLM, a hashing embedder
    for MiniLM."""
    counts = {"llm": 0, "embedder": 0}

    def from_pretrained(cls, name_or_path, **kwargs):
        counts["llm"] += 1
        return cls(engine.loaded, **kwargs)

    def embedder(name):
        counts["embedder"] += 1
        return HashEmbedder()

    monkeypatch.setattr(BlockEngine, "from_pretrained", classmethod(from_pretrained))
    monkeypatch.setattr(ingest_module, "Embedder", embedder)
    return counts


def _ingest(docs, index) -> None:
    assert cli_main(["ingest", str(docs), "--index", str(index), "--chunk-tokens", "100"]) == 0


def test_an_unchanged_rerun_of_blockrag_ingest_loads_no_model(tmp_path, loads, capsys):
    """Protects: the text digests recorded once a document's passages are all committed, and loading models
    on first use: a re-run over unchanged documents needs neither the LLM nor the embedder (not even the
    tokenizer); a changed document loads both, a passage whose KV went missing the LLM only."""
    docs = tmp_path / "docs"
    docs.mkdir()
    for doc in corpus(3):
        (docs / f"{doc.id}.txt").write_text(doc.text)
    index = tmp_path / "index"

    _ingest(docs, index)
    assert loads == {"llm": 1, "embedder": 1}
    _ingest(docs, index)
    assert loads == {"llm": 1, "embedder": 1}  # nothing loaded the second time
    assert "0 added, 0 removed, 0 encoded" in capsys.readouterr().out

    (docs / "doc-2.txt").write_text((docs / "doc-2.txt").read_text() + " A new closing sentence.")
    _ingest(docs, index)
    assert loads == {"llm": 2, "embedder": 2}

    with Index.open(index) as opened:
        key = opened.document_nodes("doc-4.txt")[0].kv_key
    with open_store(index / "kv") as store:
        assert store.delete(key)
    _ingest(docs, index)
    assert loads == {"llm": 3, "embedder": 2}  # the KV recomputed; no passage needed embedding
    out = capsys.readouterr().out
    assert "0 added, 0 removed, 1 encoded" in out

    with sqlite3.connect(index / "docstore.sqlite") as db:  # an index from before digests were recorded
        db.execute("DELETE FROM ingested")
    _ingest(docs, index)
    _ingest(docs, index)
    assert loads == {"llm": 4, "embedder": 2}  # chunked once with the LLM's tokenizer, then recorded
