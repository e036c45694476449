"""Exception classes of blockrag. Every message says what the user can do about it."""


class BlockragError(Exception):
    """Base class of every error blockrag raises on purpose."""


class UnsupportedModelError(BlockragError):
    """The model is not a decoder-only transformer with rotary position embeddings that blockrag can re-position."""


class ModelNotFoundError(BlockragError):
    """A model name, alias or path could not be resolved to weights on this machine."""


class PromptTooLongError(BlockragError):
    """The assembled prompt does not fit the model's context window."""


class AdapterNotFoundError(BlockragError):
    """A LoRA adapter folder is missing or holds no adapter saved as safetensors."""


class AdapterMismatchError(BlockragError):
    """A LoRA adapter was trained for another base model than the one it is applied to."""


class ExtraNotInstalledError(BlockragError, ImportError):
    """A feature needs an optional dependency group (an extra) that is not installed."""


class InvalidConstraintError(BlockragError, ValueError):
    """A JSON schema or grammar given to constrain generation cannot be compiled."""


class StructuredRequestError(BlockragError, ValueError):
    """A request's tools, tool choice or response format cannot be used as given."""
