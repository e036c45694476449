"""blockrag's engine: Block-Attention prefill over cached passage blocks, on a local Hugging Face model."""

from .blocks import (BLOCK_MODES, Block, BlockMode, BlockStore, StoppingCache, assemble, block_key, context_id,
                     encode_blocks, write_kv)
from .decoding import (DECODE_MODES, DecodeMode, DecodeOptions, Decoding, FixedStride, FullDecoding, QuerySimilarity,
                       RecycledDecoding, StreamingDecoding, start_decoding)
from .errors import BlockragError, ModelNotFoundError, PromptTooLongError, UnsupportedModelError
from .generate import (PREFILL_MODES, BlockEngine, BlockMismatchError, GenerationResult, PrefillMode,
                       SamplingOptions, TextStream)
from .model import DEFAULT_MODEL, LoadedModel, blockrag_home, load_model, model_fingerprint
from .prompt import PromptTemplate
from .recovery import Recovery
from .rope import rerotate

__all__ = [
    "BLOCK_MODES", "DEFAULT_MODEL", "PREFILL_MODES", "Block", "BlockEngine", "BlockMismatchError", "BlockMode",
    "BlockStore", "BlockragError", "GenerationResult", "LoadedModel", "ModelNotFoundError", "PrefillMode", "PromptTemplate",
    "PromptTooLongError", "SamplingOptions", "TextStream", "UnsupportedModelError", "assemble", "blockrag_home",
    "block_key", "context_id", "encode_blocks", "StoppingCache", "write_kv", "load_model", "model_fingerprint", "rerotate",
    "DECODE_MODES", "DecodeMode", "DecodeOptions", "Decoding", "FixedStride", "FullDecoding", "QuerySimilarity",
    "RecycledDecoding", "StreamingDecoding", "start_decoding", "Recovery",
]
