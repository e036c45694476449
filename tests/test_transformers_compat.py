"""The transformers releases blockrag supports, and the one module that depends on their internals."""

from __future__ import annotations

import re
import tomllib
from importlib.metadata import version
from pathlib import Path

from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet

from blockrag.engine.transformer import SUPPORTED_TRANSFORMERS, loading_quietly

ROOT = Path(__file__).resolve().parents[1]
LIBRARY = [ROOT / d for d in ("engine", "kvstore", "retriever", "integrations", "server", "cli", "errors",
                              "evaluation", "training", "benchmarks")]
#: Names of transformers' model layout and private attributes: only engine/transformer.py may use them.
INTERNALS = re.compile(r"\.(self_attn|rotary_emb|input_layernorm|post_attention_layernorm|embed_tokens|lm_head|"
                       r"q_proj|k_proj|v_proj|o_proj|_attn_implementation|quantization_config)\b|"
                       r"AttentionInterface|ALL_ATTENTION_FUNCTIONS|lazy_initialization|modeling_gguf_pytorch_utils")


def test_the_installed_transformers_is_a_supported_release():
    assert version("transformers") in SpecifierSet(SUPPORTED_TRANSFORMERS), (
        f"transformers {version('transformers')} is outside {SUPPORTED_TRANSFORMERS}: check engine/transformer.py "
        "against the new release's model code, then widen the range there and in pyproject.toml")


def test_pyproject_allows_exactly_the_supported_releases():
    dependencies = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    (transformers,) = [Requirement(d) for d in dependencies if Requirement(d).name == "transformers"]
    assert transformers.specifier == SpecifierSet(SUPPORTED_TRANSFORMERS)


def test_only_the_compat_module_touches_transformers_internals():
    touching = sorted(str(path.relative_to(ROOT)) for folder in LIBRARY if folder.is_dir()
                      for path in folder.rglob("*.py") if INTERNALS.search(path.read_text()))
    assert touching == ["engine/transformer.py"]


def test_loading_hides_transformers_progress_bars_and_restores_them(caplog):
    from transformers import modeling_gguf_pytorch_utils as gguf_loading
    from transformers.utils import logging as transformers_logging

    bar = gguf_loading.tqdm
    transformers_logging.enable_progress_bar()  # as in a fresh process (a CLI test may have turned them off)
    with loading_quietly():
        assert not transformers_logging.is_progress_bar_enabled()
        assert gguf_loading.tqdm([1, 2]).disable  # the GGUF conversion's own bar
    assert transformers_logging.is_progress_bar_enabled() and gguf_loading.tqdm is bar
    with caplog.at_level("INFO", logger="blockrag"), loading_quietly():  # what `blockrag --verbose` shows
        assert transformers_logging.is_progress_bar_enabled() and gguf_loading.tqdm is bar


def test_generation_uses_no_deprecated_transformers_api(tiny_engine):
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)  # transformers announces removals as FutureWarnings
        for mode in ("block", "full"):
            done = tiny_engine.generate(None, ["A passage about herons."], "What is it about?", mode=mode,
                                        max_new_tokens=2)
            assert done.completion_tokens >= 1
