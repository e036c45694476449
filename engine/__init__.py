"""blockrag's engine: Block-Attention prefill over cached passage blocks, on a local Hugging Face model."""

from blockrag.errors import (AdapterMismatchError, AdapterNotFoundError, BlockMismatchError, BlockragError,
                             InvalidArgumentError, InvalidConstraintError, MissingExtraError, ModelNotFoundError,
                             PromptTooLongError, StructuredRequestError, UnsupportedModelError)

from .blocks import (BLOCK_MODES, Block, BlockMode, BlockStore, PassageContext, StoredPassage, assemble, block_key,
                     context_id, encode_blocks)
from .constrain import (CONSTRAINT_KINDS, CompiledConstraint, Constraint, ConstraintKind, ConstraintMatcher,
                        compile_constraint)
from .decoding import (DECODE_MODES, DecodeMode, DecodeOptions, Decoding, FixedStride, FullDecoding, QuerySimilarity,
                       RecycledDecoding, StreamingDecoding, start_decoding)
from .fourbit import DECODE_WEIGHTS, DecodeWeights
from .generate import (PREFILL_MODES, BlockEngine, GenerationOptions, GenerationResult, Prefill, PrefillMode,
                       SamplingOptions, TextStream)
from .model import DEFAULT_MODEL, LoadedModel, blockrag_home, load_model, model_fingerprint
from .prompt import DEFAULT_PASSAGE_ORDER, PASSAGE_ORDERS, PassageOrder, PromptTemplate, in_prompt_order
from .recovery import Recovery
from .rope import rerotate
from .transformer import KVCache

__all__ = [
    "AdapterMismatchError", "AdapterNotFoundError", "assemble", "Block", "block_key", "BLOCK_MODES", "BlockEngine",
    "BlockMismatchError", "BlockMode", "blockrag_home", "BlockragError", "BlockStore", "compile_constraint",
    "CompiledConstraint", "Constraint", "CONSTRAINT_KINDS", "ConstraintKind", "ConstraintMatcher", "context_id",
    "DECODE_MODES", "DECODE_WEIGHTS", "DecodeMode", "DecodeOptions", "DecodeWeights", "Decoding", "DEFAULT_MODEL",
    "DEFAULT_PASSAGE_ORDER", "encode_blocks", "FixedStride", "FullDecoding", "GenerationOptions", "GenerationResult",
    "in_prompt_order", "InvalidArgumentError", "InvalidConstraintError", "KVCache", "load_model", "LoadedModel",
    "MissingExtraError", "model_fingerprint", "ModelNotFoundError", "PASSAGE_ORDERS", "PassageContext", "PassageOrder",
    "Prefill", "PREFILL_MODES", "PrefillMode", "PromptTemplate", "PromptTooLongError", "QuerySimilarity", "Recovery",
    "RecycledDecoding", "rerotate", "SamplingOptions", "start_decoding", "StoredPassage", "StreamingDecoding",
    "StructuredRequestError", "TextStream", "UnsupportedModelError",
]
