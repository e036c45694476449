"""What the reliability tests share: a tiny engine, a hashing embedder, generated corpora and the index checks."""

from __future__ import annotations

import hashlib
import json
import os
import random
from dataclasses import dataclass, field
from pathlib import Path

import faiss
import numpy as np
import torch
from transformers import AutoTokenizer

from blockrag.engine import BlockEngine, LoadedModel, model_fingerprint
from blockrag.kvstore import DiskKVStore
from blockrag.retriever import Document, Index, IngestReport, ingest
from tiny_models import tiny_model

#: Passages whose fp32 KV on the tiny model (512 bytes a token) mostly exceeds diskcache's 32 KB, so entries
#: are files of their own as SmolLM2's are, while shorter ones live in SQLite rows: both paths are exercised.
CHUNK_TOKENS = 100
BATCH_PASSAGES = 4
_WORDS = ("heron lantern granite bridge cider harbour orchard beacon ferry willow quarry meadow tower river "
          "signal market chapel mill lighthouse valley ridge archive festival railway").split()


def tiny_engine(tokenizer_dir: str | os.PathLike) -> BlockEngine:
    """A random-weight Llama of two layers with the bundled model's tokenizer: the same fingerprint in
    every process (its weights are seeded), and fast enough to encode hundreds of passages."""
    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    model = tiny_model("llama")
    return BlockEngine(LoadedModel(model, tokenizer, model_fingerprint(model, tokenizer)))


def ingest_tiny(documents: list[Document], folder: Path, engine: BlockEngine, **options) -> IngestReport:
    """:func:`ingest` as every reliability test runs it: tiny engine, hashing embedder, small passages,
    small batches and an fp32 store in the index's own ``kv`` folder."""
    store = DiskKVStore(folder / "kv", dtype="fp32", fingerprint=engine.fingerprint)
    try:
        return ingest(documents, folder, engine=engine, embedder=HashEmbedder(), chunk_tokens=CHUNK_TOKENS,
                      batch_passages=BATCH_PASSAGES, kv_store=store, progress=False, **options)
    finally:
        store.close()


class HashEmbedder:
    """Deterministic unit vectors from the words of a text: the embedder's interface without a model."""

    name = "hash-embedder-32"
    dimension = 32

    def embed(self, texts) -> np.ndarray:
        out = np.zeros((len(texts), self.dimension), dtype=np.float32)
        for row, text in enumerate(texts):
            for word in text.split():
                digest = hashlib.sha256(word.encode()).digest()
                out[row, digest[0] % self.dimension] += 1.0 if digest[1] % 2 else -1.0
        out[:, 0] += 1e-3  # never a zero vector
        return out / np.linalg.norm(out, axis=1, keepdims=True)


def corpus(seed: int, documents: int = 8, version: int = 1) -> list[Document]:
    """Generated documents of a few passages each; ``version`` 2 rewrites every third and adds two."""
    rng = random.Random(seed)
    out = []
    for d in range(documents + (2 if version > 1 else 0)):
        sentences = [" ".join(rng.choice(_WORDS) for _ in range(rng.randint(6, 14))).capitalize() + "."
                     for _ in range(rng.randint(6, 14))]
        if version > 1 and d % 3 == 0:
            sentences = sentences[::-1] + ["Revised."]
        out.append(Document(f"doc-{d}", " ".join(sentences), {"n": d}))
    return out


def write_jsonl(documents: list[Document], path: Path) -> Path:
    path.write_text("".join(json.dumps({"id": d.id, "text": d.text, "metadata": d.metadata}) + "\n"
                            for d in documents))
    return path


@dataclass
class Verdict:
    """What a check of an index folder found."""

    passages: int = 0
    served: int = 0
    problems: list[str] = field(default_factory=list)

    @property
    def lost(self) -> int:
        return self.passages - self.served


def check_index(folder: Path, engine: BlockEngine) -> Verdict:
    """Open the index as a reader would and check that every passage it lists is served from an intact block
    of exactly its tokens (KV as the engine computes it, to bf16 rounding) and that FAISS and the document
    store list the same passages with the same vectors."""
    verdict = Verdict()
    with Index.open(folder) as index:
        nodes = [n for doc in index.document_ids() for n in index.document_nodes(doc)]
        verdict.passages = len(nodes)
        vectors = index._vectors  # the FAISS IndexIDMap2 itself: what a search returns
        faiss_ids = set(faiss.vector_to_array(vectors.id_map).tolist())
        if faiss_ids != {int(n.id, 16) for n in nodes} or vectors.ntotal != len(nodes):
            verdict.problems.append(f"FAISS holds {vectors.ntotal} vectors, the document store {len(nodes)} passages")
        stored = dict(index._db.execute("SELECT id, vector FROM nodes"))
        for n in nodes:
            if int(n.id, 16) in faiss_ids and not np.array_equal(
                    vectors.reconstruct(int(n.id, 16)), np.frombuffer(stored[n.id], dtype=np.float32)):
                verdict.problems.append(f"{n.id}: FAISS vector differs from the document store's")
        blocks = index.kv.get_many([n.kv_key for n in nodes])
        fresh = engine.encode([n.text for n in nodes]) if nodes else []
        for n, block, want in zip(nodes, blocks, fresh):
            if block is None:
                verdict.problems.append(f"{n.id}: listed but its KV is not served")
            elif block.token_ids.tolist() != engine.passage_token_ids(n.text) or \
                    engine.block_keys([n.text])[0] != n.kv_key:
                verdict.problems.append(f"{n.id}: served for other tokens than its text's")
            elif not (torch.allclose(block.keys, want.keys, rtol=2**-7, atol=1e-6) and
                      torch.allclose(block.values, want.values, rtol=2**-7, atol=1e-6)):
                verdict.problems.append(f"{n.id}: served KV differs from the engine's")
            else:
                verdict.served += 1
    return verdict


def node_keys(folder: Path) -> set[tuple[str, str]]:
    """(node ID, KV key) of every passage in the index."""
    with Index.open(folder) as index:
        return {(n.id, n.kv_key) for doc in index.document_ids() for n in index.document_nodes(doc)}


def tree(folder: Path) -> dict[str, str]:
    """Path -> sha256 of every file under ``folder``: equal before and after means nothing was written."""
    if not folder.exists():
        return {}
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}
